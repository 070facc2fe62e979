"""What every training process does before the trainer starts, whoever started it (Ray, torchrun, us).

- its CPU thread count is set (launch.cpu_threads; runtime/cpu_threads.py): launchers default to one;
- DeepSpeed's ops are built (once per environment, with a message) before the ranks need them, so
  no rank stops for a minute in the middle of its first collective (runtime/extensions.py);
- third-party notices that tell a longloom user nothing are silenced, so the console shows our
  lines and real errors. Each filter names one known notice; errors and other warnings stay:
  - DeepSpeed's "Setting accelerator to CPU. If you have GPU ... we were unable to detect it": we
    tell DeepSpeed the accelerator (DS_ACCELERATOR, its own setting) when torch sees no GPU;
  - torch's FutureWarnings for torch.distributed functions DeepSpeed still calls
    (`all_gather_into_tensor is deprecated`): not ours to change, printed once per rank.
"""

from __future__ import annotations

import os
import warnings

import torch

from longloom.config import LongloomConfig
from longloom.runtime.cpu_threads import use_worker_cpu_threads
from longloom.runtime.extensions import build_deepspeed_ops, needed_ops, use_stable_extensions_dir


def quiet_third_party_notices() -> None:
    """Silences the known-useless notices above in this process (idempotent)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")


def prepare_worker_process(cfg: LongloomConfig) -> None:
    """Call at the start of every training process, before DeepSpeed is imported."""
    use_stable_extensions_dir()
    use_worker_cpu_threads(cfg.launch.cpu_threads)
    quiet_third_party_notices()
    build_deepspeed_ops(needed_ops(cfg.offload.optimizer, on_cpu=not torch.cuda.is_available()))
