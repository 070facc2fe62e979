"""Process setup as DESIGN.md names it (`launch/env.py`): re-exported from `longloom/runtime/`.

The code lives below every other floor, in `runtime/ranks.py` (who this process is), `runtime/process.py`
(idempotent torch.distributed init, the rank's device), `runtime/allocator.py` (CUDA allocator
settings) and `runtime/cpu_threads.py` (CPU threads per worker), so that training/ and evaluation/ can use it without importing the launchers.
"""

from longloom.runtime.allocator import (
    ALLOCATOR_SETTINGS_ENV,
    DEFAULT_ALLOCATOR_SETTINGS,
    default_allocator_settings,
    use_default_allocator_settings,
)
from longloom.runtime.cpu_threads import use_worker_cpu_threads, worker_cpu_threads
from longloom.runtime.process import device_for_rank, init_distributed
from longloom.runtime.ranks import (
    ATTEMPT_ENV,
    attempt_number,
    free_port,
    local_rank,
    rank_environment,
    under_torchrun,
)

__all__ = [
    "ALLOCATOR_SETTINGS_ENV",
    "ATTEMPT_ENV",
    "DEFAULT_ALLOCATOR_SETTINGS",
    "attempt_number",
    "default_allocator_settings",
    "device_for_rank",
    "free_port",
    "init_distributed",
    "local_rank",
    "rank_environment",
    "under_torchrun",
    "use_default_allocator_settings",
    "use_worker_cpu_threads",
    "worker_cpu_threads",
]
