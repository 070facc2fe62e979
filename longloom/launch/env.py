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

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
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
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    return rank, world_size
