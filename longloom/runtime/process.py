"""Process setup of a worker: idempotent torch.distributed initialisation from RANK / WORLD_SIZE / LOCAL_RANK,
and the device of this rank (with the allocator policy of runtime/allocator.py).

The same worker code runs under torchrun, inside a Ray worker and in a single process: whoever
started us sets the environment, and a second call is a no-op ("already initialised"), as in
torchtitan. NCCL on CUDA, gloo on CPU; a collective that waits longer than `timeout_s` (a dead
peer) raises instead of hanging forever.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from longloom.runtime.allocator import use_default_allocator_settings
from longloom.runtime.ranks import free_port, local_rank

logger = logging.getLogger(__name__)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        use_default_allocator_settings()
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialises the default process group once; returns (rank, world_size)."""
    if dist.is_initialized():
        logger.debug("torch.distributed already initialised; skipping")
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # A lone process started by hand gets torchrun's variables written back: libraries that read
    # them instead of asking torch.distributed (DeepSpeed insists on LOCAL_RANK) then agree.
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank())):
        os.environ.setdefault(name, str(value))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but MASTER_PORT is not set: start workers with torchrun, "
                "`longloom train` or set MASTER_ADDR/MASTER_PORT"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = device_for_rank()
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=backend,
        store=_torchrun_agent_store(world_size, timeout),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    return rank, world_size


def _torchrun_agent_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, its agent's store with a namespace per restart; None elsewhere (env://).

    torchrun's agent keeps one store for all restarts (TORCHELASTIC_USE_AGENT_STORE=True), so the
    addresses the failed group published for gloo/NCCL are still there when the restarted group
    looks for its peers': a rank that reads before its peer re-published connects to a dead port
    ("Connection refused"). A prefix per restart count keeps each group to its own keys. The count
    is one agent's; with several nodes set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, then
    rank 0 hosts a fresh store per restart and this does not apply.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(
        f"longloom/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store
    )
