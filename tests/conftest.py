"""Shared fixtures: a pool of gloo worker processes per world size, reused across tests.

Starting P interpreters that import torch costs seconds; tests at P in {2, 4, 8} would spend most
of their time there. `run_distributed(world_size, fn, *args)` sends `fn` (a module-level function)
to a pool of `world_size` processes that initialised gloo once, and returns every rank's result in
rank order. Any rank's exception fails the test with that rank's traceback, and the pool is torn
down (its peers may be stuck in a collective) and rebuilt on next use. A collective that waits
longer than GLOO_TIMEOUT_S raises instead of hanging the suite.

On CPU the workers are forked from a forkserver that imported torch, DeepSpeed and longloom's
trainer once (POOL_PRELOAD): every worker of the 1-, 2-, 4- and 8-process pools, and every pool
rebuilt after a failure, would otherwise import them again (8-12 s of a loaded core each) and pay
DeepSpeed's first-engine imports (torch._dynamo, ~5 s). The forkserver only imports modules (no
process group is made there); each worker sets its threads and joins gloo as a spawned one did.
On a GPU machine the workers stay spawned (a fork must not inherit a process that touched CUDA).
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback

import pytest
import torch
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 120
TASK_TIMEOUT_S = 600
# What the pool workers import; a module missing here only costs time (forkserver ignores ImportError).
POOL_PRELOAD = [
    "tests.conftest",
    "deepspeed",
    "deepspeed.runtime.engine",
    # DeepSpeed's optimizer check imports it on the first engine build; it imports torch._dynamo.
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "longloom.training.trainer",
    "longloom.models.hf",
]

# CPU: Triton kernels run in the interpreter. Never on a GPU machine: interpreted kernels cannot take CUDA
# tensors, and tests/gpu must exercise the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _pool_worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report every failure to the parent
            results.put((rank, False, traceback.format_exc()))
    torch.distributed.destroy_process_group()


def _worker_context():
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(POOL_PRELOAD)
    return context


class WorkerPool:
    def __init__(self, world_size: int):
        from longloom.runtime.ranks import free_port

        self.world_size = world_size
        context = _worker_context()
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        port = free_port()
        self.processes = [
            context.Process(
                target=_pool_worker,
                args=(rank, world_size, port, self.tasks[rank], self.results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn, *args, **kwargs) -> list:
        for task_queue in self.tasks:
            task_queue.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, object]] = {}
        while len(outcomes) < self.world_size:
            try:
                rank, ok, value = self.results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                raise TimeoutError(
                    f"{fn.__name__}: ranks {sorted(set(range(self.world_size)) - set(outcomes))} gave no result"
                ) from None
            outcomes[rank] = (ok, value)
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank} of {self.world_size}:\n{value}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        for task_queue, process in zip(self.tasks, self.processes):
            if process.is_alive():
                task_queue.put(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


_pools: dict[int, WorkerPool] = {}


def run_distributed(world_size: int, fn, *args, **kwargs) -> list:
    """Runs `fn(*args, **kwargs)` on every rank of a gloo group of `world_size`; results in rank order."""
    pool = _pools.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.processes):
        pool = _pools[world_size] = WorkerPool(world_size)
    try:
        return pool.run(fn, *args, **kwargs)
    except BaseException:
        for process in pool.processes:
            process.kill()
        _pools.pop(world_size, None)
        raise


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
    _pools.clear()


@pytest.fixture
def distributed():
    return run_distributed
