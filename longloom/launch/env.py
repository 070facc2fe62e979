"""Idempotent torch.distributed initialisation from RANK / WORLD_SIZE / LOCAL_RANK.

The same worker code runs under torchrun, inside a Ray worker and in a single process: whoever
started us sets the environment, and a second call is a no-op ("already initialised"), as in
torchtitan. NCCL on CUDA, gloo on CPU; a collective that waits longer than `timeout_s` (a dead
peer) raises instead of hanging forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


ATTEMPT_ENV = "LONGLOOM_ATTEMPT"


def free_port() -> int:
    # Bound on every interface: the rendezvous store of rank 0 listens there, not only on loopback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_torchrun() -> bool:
    """True in a worker started by torchrun (its elastic agent sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def attempt_number() -> int:
    """Which start of the worker group this process belongs to: 0 first, 1 after the first restart, ...

    The Ray launcher and the in-process launcher set LONGLOOM_ATTEMPT; torchrun counts its own
    restarts in TORCHELASTIC_RESTART_COUNT.
    """
    return int(os.environ.get(ATTEMPT_ENV, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def rank_environment(
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    master_addr: str,
    master_port: int,
    attempt: int,
) -> dict[str, str]:
    """The variables torchrun sets for one rank, plus the attempt: for launchers other than torchrun."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        ATTEMPT_ENV: str(attempt),
    }


# PyTorch reads either name when CUDA is first initialised; the second is the newer, device-neutral one.
ALLOCATOR_SETTINGS_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# Long sequences allocate a few very large tensors whose sizes change from layer to layer (MLP
# intermediates, recomputed attention). With fixed segments the freed blocks do not fit the next
# request: on one H200 at 512K tokens a run asked for 14 GiB with 20 GiB reserved but free and failed,
# while with expandable segments it peaked at 124 of 140 GiB (BENCHMARKS.md, issue 6).
DEFAULT_ALLOCATOR_SETTINGS = "expandable_segments:True"


def default_allocator_settings(environ: Mapping[str, str]) -> str | None:
    """The CUDA allocator settings to set for a worker: ours unless the user chose any (then None)."""
    if any(name in environ for name in ALLOCATOR_SETTINGS_ENV):
        return None
    return DEFAULT_ALLOCATOR_SETTINGS


def use_default_allocator_settings() -> None:
    """Expandable segments for this process's CUDA allocator unless the user set the variable."""
    settings = default_allocator_settings(os.environ)
    if settings is None:
        return
    os.environ[ALLOCATOR_SETTINGS_ENV[0]] = settings  # for processes this one starts
    # The allocator parses the variable once, on first use, which may have happened already (an
    # import that touched CUDA); this re-parses it. Private in torch 2.9-2.13, hence the guard.
    apply_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if apply_settings is not None:
        apply_settings(settings)
    if local_rank() == 0:
        logger.info(
            "PYTORCH_CUDA_ALLOC_CONF was unset: using %s (less fragmentation at long sequences); "
            "set the variable yourself to choose otherwise",
            settings,
        )


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
