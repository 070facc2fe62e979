"""DeepSpeed's vectorised CPU Adam(W) kernel behind one chunk-sized `update` call.

Used by the interleaved optimizer (host subgroups, chunk by chunk as they arrive over PCIe) and by the
performance model that measures the CPU update rate.
"""

from __future__ import annotations

import functools

import torch


class CpuAdamKernel:
    """DeepSpeed's vectorised CPU Adam(W) kernel, applied to one chunk at a time.

    DeepSpeedCPUAdam.step() walks all of its parameters; the pipeline needs chunk-sized calls, so this
    holds one instance (which builds / loads the cpu_adam op and owns its C++ state) and calls its op.
    Every call passes all hyperparameters, so one instance per process serves every optimizer.
    """

    def __init__(self):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        self._owner = DeepSpeedCPUAdam([torch.zeros(1)], adamw_mode=True)

    def update(
        self, step: int, lr: float, betas, eps: float, weight_decay: float, param, grad, exp_avg, exp_avg_sq
    ):
        self._owner.ds_opt_adam.adam_update(
            self._owner.opt_id,
            step,
            lr,
            betas[0],
            betas[1],
            eps,
            weight_decay,
            True,
            param,
            grad,
            exp_avg,
            exp_avg_sq,
        )


@functools.cache
def cpu_adam_kernel() -> CpuAdamKernel:
    return CpuAdamKernel()  # loading the op takes seconds (a compile check, a build the first time)
