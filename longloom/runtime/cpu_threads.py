"""The CPU threads of a worker: its node's cores shared among the node's workers, unless the user chose.

Launchers start workers with one OpenMP thread: torchrun sets OMP_NUM_THREADS=1 whenever it starts more
than one process per node, and Ray sets it to the CPUs an actor reserved (1 for ours). torch and the
DeepSpeed ops it loads share one OpenMP runtime, so every parallel loop on the host then runs on one
core: DeepSpeed's CPU Adam walking a rank's billions of fp32 master weights and moments
(offload.optimizer=cpu and the host share of interleaved), ZeRO's norm and scaling of host gradient
partitions. On 2 x H200 with 32 cores that left 30 cores idle while the GPUs waited for the step.

`launch.cpu_threads`: "auto" = the cores this process may run on / the workers on its node (at least 1);
a number = exactly that many. Applied once per worker before DeepSpeed starts
(launch/worker_setup.py): `torch.set_num_threads` sets the OpenMP thread count of the calling (main)
thread, where the optimizer steps, and torch hands it to the threads it starts later (autograd's);
OMP_NUM_THREADS is set too, for processes the worker starts.
"""

from __future__ import annotations

import logging
import os

import torch

from longloom.runtime.ranks import local_rank

logger = logging.getLogger(__name__)

THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_workers() -> int:
    """Workers on this node, as the launcher says (LOCAL_WORLD_SIZE: torchrun, Ray, ours); 1 alone."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def worker_cpu_threads(setting: int | str, cores: int, workers_here: int) -> int:
    """Threads for one worker: `setting` if a number, else the node's cores shared by its workers."""
    if setting != "auto":
        return int(setting)
    return max(1, cores // max(1, workers_here))


def use_worker_cpu_threads(setting: int | str) -> int:
    """Sets this worker's CPU thread count from `launch.cpu_threads`; returns it."""
    cores, workers_here = usable_cores(), local_workers()
    threads = worker_cpu_threads(setting, cores, workers_here)
    before = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(threads)
    torch.set_num_threads(threads)
    if local_rank() == 0:
        why = (
            f"{cores} cores / {workers_here} workers on this node"
            if setting == "auto"
            else f"launch.cpu_threads={setting}"
        )
        was = f"; {THREADS_ENV} was {before}" if before is not None and before != str(threads) else ""
        logger.info(
            "CPU threads per worker: %d (%s%s): CPU Adam and host-side tensor work use them; "
            "set launch.cpu_threads to choose another number",
            threads,
            why,
            was,
        )
    return threads
