"""The machine a run is planned for: one host's GPUs, their memory, and the host's memory.

The run plan (training/plan.py) sizes MLP tiles, the interleaved optimizer's GPU share and the layer
inputs kept on the GPU against it, and the memory estimate (offload/memory.py) counts how many workers
share one host's pinned memory. By default it is this machine (`Machine.here()`, what the workers see).
`longloom check --gpus-per-host N --gpu-memory-gib G --host-memory-gib H` plans for another one: a GPU
job prepared on a login node without GPUs, or the machines of a Ray cluster this one cannot see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1 << 30


def host_memory_bytes() -> int:
    """This host's physical memory."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Machine:
    """One host of the run: its GPU count and memory (None: no GPU, the workers train on CPUs) and RAM."""

    gpus_per_host: int
    gpu_bytes: int | None  # the smallest GPU's memory: every worker's share of the plan must fit it
    host_bytes: int
    gpu_name: str  # for messages: "GPU 0 (NVIDIA H200)", or "the planned GPU" (given by its numbers)

    @property
    def has_gpus(self) -> bool:
        return self.gpu_bytes is not None

    @staticmethod
    def here() -> Machine:
        """This machine, as torch sees it."""
        if not torch.cuda.is_available():
            return Machine(0, None, host_memory_bytes(), "no GPU")
        count = torch.cuda.device_count()
        smallest = min(range(count), key=lambda i: torch.cuda.get_device_properties(i).total_memory)
        properties = torch.cuda.get_device_properties(smallest)
        return Machine(
            count, properties.total_memory, host_memory_bytes(), f"GPU {smallest} ({properties.name})"
        )

    @staticmethod
    def planned(gpus_per_host: int, gpu_memory_gib: float, host_memory_gib: float) -> Machine:
        """A machine given by its numbers (`longloom check --gpus-per-host ...`); ValueError naming a bad one."""
        for name, value in (
            ("--gpus-per-host", gpus_per_host),
            ("--gpu-memory-gib", gpu_memory_gib),
            ("--host-memory-gib", host_memory_gib),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive; got {value}")
        return Machine(
            gpus_per_host,
            int(gpu_memory_gib * GIB),
            int(host_memory_gib * GIB),
            "the planned GPU",
        )
