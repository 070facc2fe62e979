"""Runs an evaluation function on W processes of one torch.distributed group on this machine.

Evaluation is a short job on one host (a checkpoint read, forward passes, a report), so its workers are
started here with torch.multiprocessing (spawn) rather than through the training launchers: no Ray
cluster, no restarts, no config file. Each worker gets torchrun's environment variables
(runtime/ranks.py `rank_environment`) and joins the group with `init_distributed`, like a training worker;
gloo on CPU, NCCL with one GPU per worker when there are GPUs. W = 1 runs in this process (a group of one).
A worker's exception ends the run with that worker's traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longloom.runtime.cpu_threads import usable_cores, worker_cpu_threads
from longloom.runtime.process import init_distributed
from longloom.runtime.ranks import free_port, rank_environment


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        rank_environment(
            rank=rank,
            world_size=world_size,
            local_rank=rank,
            local_world_size=world_size,
            master_addr="127.0.0.1",
            master_port=port,
            attempt=0,
        )
    )
    # W workers share this host's cores: without this each would start one thread per core.
    torch.set_num_threads(worker_cpu_threads("auto", usable_cores(), world_size))
    init_distributed()
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_on_workers(world_size: int, fn: Callable[..., Any], *args: Any) -> None:
    """Calls `fn(*args)` on every rank of a fresh group of `world_size` processes (`fn` at module level)."""
    if world_size == 1 and not dist.is_initialized():
        saved = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(free_port()))
        try:
            init_distributed()
            fn(*args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return
    mp.start_processes(
        _worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn"
    )
