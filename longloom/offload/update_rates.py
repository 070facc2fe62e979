"""The measured performance model of the interleaved optimizer: which share of the updates goes to the GPU.

"Deep Optimizer States" (Maurya et al., 2024): measure once at startup, on small buffers, how fast the
GPU and the CPU apply Adam and how fast PCIe moves data each way; the GPU share is the one at which
both sides finish their part of the step together, capped by the GPU memory left for moments (the
cap comes from the run plan, training/plan.py, which calls `choose_gpu_share` for gpu_share=auto).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim.adam import adam as adam_functional

from longloom.offload.cpu_adam import cpu_adam_kernel

logger = logging.getLogger("longloom")

_TIMING_EPS = 1e-8  # any eps will do: only the speed of the update is measured
# Per element updated on the CPU: fp32 gradient and weight to the host, fp32 weight back.
D2H_BYTES_PER_ELEMENT = 8
H2D_BYTES_PER_ELEMENT = 4


@dataclass(frozen=True)
class UpdateRates:
    """Measured once at startup on small buffers; elements are fp32 parameters."""

    gpu_elements_per_s: float
    cpu_elements_per_s: float
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float

    def describe(self) -> str:
        return (
            f"GPU AdamW {self.gpu_elements_per_s / 1e9:.2f} G elem/s, CPU Adam {self.cpu_elements_per_s / 1e9:.2f} "
            f"G elem/s, PCIe {self.d2h_bytes_per_s / 1e9:.1f} GB/s to host, {self.h2d_bytes_per_s / 1e9:.1f} GB/s back"
        )


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Best of `repeats` wall times of fn() after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_update_rates(device: torch.device, elements: int | None = None, repeats: int = 3) -> UpdateRates:
    """GPU and CPU Adam update rates and PCIe bandwidth, on buffers of `elements` fp32 values."""
    cuda = device.type == "cuda"
    elements = elements or (1 << 24 if cuda else 1 << 18)
    param, grad = torch.zeros(elements, device=device), torch.randn(elements, device=device)
    moments = [torch.zeros(elements, device=device), torch.zeros(elements, device=device)]
    step = torch.zeros((), device=device if cuda else "cpu")

    def gpu_update() -> None:
        adam_functional(
            [param], [grad], [moments[0]], [moments[1]], [], [step], fused=cuda, foreach=False,
            decoupled_weight_decay=True, amsgrad=False, beta1=0.9, beta2=0.95, lr=1e-4, weight_decay=0.0,
            eps=_TIMING_EPS, maximize=False,
        )  # fmt: skip

    host = [torch.zeros(elements, pin_memory=cuda) for _ in range(4)]
    cpu_adam = cpu_adam_kernel()

    def cpu_update() -> None:
        cpu_adam.update(1, 1e-4, (0.9, 0.95), _TIMING_EPS, 0.0, host[0], host[1], host[2], host[3])

    staging = torch.empty(elements, pin_memory=cuda)
    d2h = _timed(lambda: staging.copy_(grad, non_blocking=cuda), device, repeats)
    h2d = _timed(lambda: param.copy_(staging, non_blocking=cuda), device, repeats)
    return UpdateRates(
        gpu_elements_per_s=elements / _timed(gpu_update, device, repeats),
        cpu_elements_per_s=elements / _timed(cpu_update, device, repeats),
        d2h_bytes_per_s=elements * 4 / d2h,
        h2d_bytes_per_s=elements * 4 / h2d,
    )


def balanced_gpu_share(rates: UpdateRates) -> float:
    """The GPU share s at which both sides finish together: s * t_gpu = (1 - s) * t_cpu.

    Per element, the GPU costs 1 / gpu rate; the CPU path is a pipeline (copy in, CPU Adam, copy out),
    so it costs its slowest stage.
    """
    gpu_cost = 1.0 / rates.gpu_elements_per_s
    cpu_cost = max(
        1.0 / rates.cpu_elements_per_s,
        D2H_BYTES_PER_ELEMENT / rates.d2h_bytes_per_s,
        H2D_BYTES_PER_ELEMENT / rates.h2d_bytes_per_s,
    )
    return cpu_cost / (cpu_cost + gpu_cost)


def _agreed_rates(rates: UpdateRates) -> UpdateRates:
    """Rank 0's measurement on every rank, so all ranks place the same subgroups on the GPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [rates]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return rates


def choose_gpu_share(device: torch.device, memory_cap: float) -> float:
    """offload.gpu_share=auto: the balanced share of the measured rates, capped by `memory_cap`.

    memory_cap: the largest share the GPU memory leaves room for (the run plan's, training/plan.py).
    Collective when torch.distributed is initialised: rank 0 measures, every rank uses its numbers.
    """
    rates = _agreed_rates(measure_update_rates(device))
    balanced = balanced_gpu_share(rates)
    share = min(balanced, memory_cap)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(
            "interleaved optimizer: %s -> balanced GPU share %.3f, GPU memory allows %.3f: GPU share %.3f",
            rates.describe(), balanced, memory_cap, share,
        )  # fmt: skip
    return share
