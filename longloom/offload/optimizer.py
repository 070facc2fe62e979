"""Optimizer states in host memory: DeepSpeed ZeRO-Offload (CPU Adam) and GPU/CPU interleaving.

`offload.optimizer=cpu` is ZeRO-Offload (Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model
Training", 2021): fp32 master weights and Adam moments live in pinned host memory and DeepSpeed's
vectorised CPU Adam updates them; configured entirely through the DeepSpeed config.

`offload.optimizer=interleaved` follows "Deep Optimizer States: Towards Scalable Training of Transformer
Models Using Interleaved Offloading" (Maurya et al., 2024). Idea: the parameters are split into
subgroups; the moments of a share of them stay on the GPU and are updated there (fused AdamW, fast),
the others live on the host and are updated by CPU Adam, at the same time: while the GPU kernels run,
the CPU works through its subgroups chunk by chunk, each chunk's gradient and weights coming over PCIe
on one stream and going back on another. The GPU share comes from a small performance model measured
once at startup (offload/update_rates.py: GPU and CPU update rates, PCIe each way): the share that makes both
sides finish together, capped by what the GPU memory estimate leaves free for moments. The run plan
(training/plan.py) decides it; `build_optimizer` receives it.

It plugs into DeepSpeed as a client optimizer (`deepspeed.initialize(optimizer=build_optimizer(...))`):
each subgroup is one param group, so every ZeRO stage gives it one flat fp32 tensor per subgroup whose
moments have that tensor's shape, on one device; DeepSpeed's fragment APIs (universal checkpoints) see
the usual `exp_avg` / `exp_avg_sq`. Overlap depends on how DeepSpeed calls `step`: stage 0, the bf16
optimizer and ZeRO-3 per sub-group pass work that can overlap; ZeRO-1/2 step one param group at a
time and convert it to bf16 right after, so there the CPU subgroups overlap their PCIe copies but not
the GPU subgroups' kernels.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.adam import adam as adam_functional

from longloom.config import ConfigError, LongloomConfig
from longloom.offload.cpu_adam import CpuAdamKernel, cpu_adam_kernel

logger = logging.getLogger("longloom")

ADAM_EPS = 1e-8
SUBGROUPS = 16  # parameter subgroups the interleaved optimizer splits the model into (whole parameters)
CHUNK_ELEMENTS = 1 << 23  # 32 MiB of fp32: the unit of the PCIe <-> CPU Adam pipeline


def adamw_hyperparameters(cfg: LongloomConfig) -> dict[str, Any]:
    t = cfg.train
    return {"lr": t.lr, "betas": list(t.betas), "eps": ADAM_EPS, "weight_decay": t.weight_decay}


def optimizer_settings(cfg: LongloomConfig) -> dict[str, Any]:
    """The DeepSpeed config sections for the optimizer: "optimizer" and the whole "zero_optimization".

    none: DeepSpeed's AdamW. cpu: ZeRO-Offload with CPU Adam; it lives inside ZeRO, so zero_stage 0 is
    refused (rather than silently promoted: stage 1 also partitions states over the ranks, which the
    user did not ask for). interleaved: no "optimizer" section, the trainer passes `build_optimizer`'s
    client optimizer, which ZeRO accepts with zero_allow_untested_optimizer.
    """
    stage = cfg.train.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    mode = cfg.offload.optimizer
    if mode == "interleaved":
        return {"zero_optimization": zero, "zero_allow_untested_optimizer": True}
    if mode == "cpu":
        if stage == 0:
            raise ConfigError(
                "offload.optimizer=cpu needs ZeRO (DeepSpeed's optimizer offload is part of ZeRO) but "
                "train.zero_stage=0: set train.zero_stage=1 (or 2, 3), or use offload.optimizer=interleaved"
            )
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        return {
            "optimizer": {"type": "AdamW", "params": adamw_hyperparameters(cfg)},
            "zero_optimization": zero,
        }
    # torch's AdamW (foreach) rather than DeepSpeed's FusedAdam: same update, and no C++/CUDA op to
    # JIT-compile at start (a build that a killed worker leaves half done blocks every later start).
    params = {**adamw_hyperparameters(cfg), "torch_adam": True}
    return {"optimizer": {"type": "AdamW", "params": params}, "zero_optimization": zero}


# -- the interleaved optimizer ----------------------------------------------------------------------


def split_into_subgroups(params: list[torch.nn.Parameter], subgroups: int = SUBGROUPS) -> list[list]:
    """Consecutive whole parameters, about total / subgroups elements each."""
    total = sum(p.numel() for p in params)
    target = max(1, -(-total // subgroups))
    groups, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel()
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def interleave(sizes: list[int], gpu_share: float) -> list[bool]:
    """on_cpu flags spreading the CPU subgroups evenly (every k-th), about (1 - share) of the elements."""
    on_cpu, seen, on_gpu = [], 0, 0
    for size in sizes:
        seen += size
        gpu = on_gpu + size / 2 <= gpu_share * seen
        on_gpu += size if gpu else 0
        on_cpu.append(not gpu)
    return on_cpu


class InterleavedAdamW(torch.optim.Optimizer):
    """AdamW whose param groups carry `on_cpu`: moments on the host, updated by CPU Adam, or on the device.

    Works on whatever tensors DeepSpeed hands it (flat fp32 partitions under ZeRO, the parameters at
    stage 0) and on any device: on CPU the same pipeline runs with plain host buffers, which is what
    the CPU tests exercise.
    """

    def __init__(self, param_groups: list[dict], lr: float, betas, eps: float, weight_decay: float):
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "on_cpu": False,
        }
        super().__init__(param_groups, defaults)
        self._cpu_adam: CpuAdamKernel | None = None
        # id(param) -> (weak ref to param, host weights, host gradient): staging for host subgroups.
        self._staging: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}
        self._streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None
        self._last_h2d: torch.cuda.Event | None = None
        self._moved: set[int] = set()
        # DeepSpeed ZeRO-1/2 steps one group at a time (param_groups swapped for [group]) and links its
        # fragment views (universal checkpoints) to every group's state after the first call, so the
        # states of all groups must exist by then: step() creates them from this full list.
        self._all_groups = self.param_groups

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._all_groups = self.param_groups

    @property
    def gpu_share(self) -> float:
        sizes = [(sum(p.numel() for p in g["params"]), g["on_cpu"]) for g in self.param_groups]
        total = sum(size for size, _ in sizes)
        return sum(size for size, on_cpu in sizes if not on_cpu) / max(total, 1)

    def _state(self, p: torch.Tensor, on_cpu: bool) -> dict:
        """Creates the moments where the group lives; moves them there if a checkpoint load did not."""
        state = self.state[p]
        home = torch.device("cpu") if on_cpu else p.device
        pin = on_cpu and p.is_cuda
        if "exp_avg" not in state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros(p.shape, dtype=torch.float32, device=home, pin_memory=pin)
        elif state["exp_avg"].device != home:
            # torch's load_state_dict (and DeepSpeed's universal loader) put states next to the param.
            for key in ("exp_avg", "exp_avg_sq"):
                moved = torch.empty(p.shape, dtype=torch.float32, device=home, pin_memory=pin)
                state[key] = moved.copy_(state[key])
            if id(p) not in self._moved:
                self._moved.add(id(p))
                logger.info("optimizer state of a %d-element subgroup moved to %s", p.numel(), home)
        # The fused device kernel counts steps in a device tensor; the host path reads a CPU scalar. A
        # loaded checkpoint may bring a plain int or a tensor on the other device.
        step_device = p.device if (p.is_cuda and not on_cpu) else torch.device("cpu")
        step = state.get("step", 0)
        if not torch.is_tensor(step) or step.device != step_device:
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=step_device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("InterleavedAdamW does not take a closure")
        for group in self._all_groups:
            for p in group["params"]:
                self._state(p, on_cpu=group["on_cpu"])
        device_groups, host_work = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["on_cpu"]:
                host_work += [(p, group, self._state(p, on_cpu=True)) for p in params]
            else:
                device_groups.append((group, params, [self._state(p, on_cpu=False) for p in params]))
        copies = self._start_copies_to_host(host_work) if host_work else []
        # Device subgroups: kernels queued now run while this thread does the CPU subgroups below.
        for group, params, states in device_groups:
            fused = params[0].is_cuda
            adam_functional(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=fused,
                foreach=False, decoupled_weight_decay=True, amsgrad=False, beta1=group["betas"][0],
                beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False,
            )  # fmt: skip
        if host_work:
            self._update_on_host(host_work, copies)

    def _host_buffers(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._staging.get(id(p))
        if entry is None or entry[0]() is not p:
            buffers = [torch.empty(p.numel(), dtype=torch.float32, pin_memory=p.is_cuda) for _ in range(2)]
            entry = self._staging[id(p)] = (weakref.ref(p), *buffers)
        return entry[1], entry[2]

    def _start_copies_to_host(self, host_work) -> list[tuple]:
        """Queues each chunk's gradient and weights to the host; returns (work item, slice, event)."""
        cuda = host_work[0][0].is_cuda
        if cuda and self._streams is None:
            device = host_work[0][0].device
            self._streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        copies = []
        if cuda:
            to_host = self._streams[0]
            to_host.wait_stream(torch.cuda.current_stream())  # gradients are finished on compute
            if self._last_h2d is not None:
                to_host.wait_event(self._last_h2d)  # last step's copies back read the staging buffers
        for item in host_work:
            p = item[0]
            host_param, host_grad = self._host_buffers(p)
            flat_param, flat_grad = p.view(-1), p.grad.view(-1)
            for start in range(0, p.numel(), CHUNK_ELEMENTS):
                chunk = slice(start, min(start + CHUNK_ELEMENTS, p.numel()))
                event = None
                if cuda:
                    with torch.cuda.stream(to_host):
                        host_grad[chunk].copy_(flat_grad[chunk], non_blocking=True)
                        host_param[chunk].copy_(flat_param[chunk], non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(to_host)
                else:
                    host_grad[chunk].copy_(flat_grad[chunk])
                    host_param[chunk].copy_(flat_param[chunk])
                copies.append((item, chunk, event))
        # No record_stream for the gradients: _update_on_host waits for every copy before step returns.
        return copies

    def _update_on_host(self, host_work, copies) -> None:
        if self._cpu_adam is None:
            self._cpu_adam = cpu_adam_kernel()
        steps = {}
        for p, _, state in host_work:
            state["step"] += 1
            steps[id(p)] = int(state["step"])
        cuda = host_work[0][0].is_cuda
        back = self._streams[1] if cuda else None
        for (p, group, state), chunk, event in copies:
            if event is not None:
                event.synchronize()
            host_param, host_grad = self._host_buffers(p)
            self._cpu_adam.update(
                steps[id(p)], group["lr"], group["betas"], group["eps"], group["weight_decay"], host_param[chunk],
                host_grad[chunk], state["exp_avg"].view(-1)[chunk], state["exp_avg_sq"].view(-1)[chunk],
            )  # fmt: skip
            if cuda:
                with torch.cuda.stream(back):
                    p.view(-1)[chunk].copy_(host_param[chunk], non_blocking=True)
            else:
                p.view(-1)[chunk].copy_(host_param[chunk])
        if cuda:
            self._last_h2d = torch.cuda.Event()
            self._last_h2d.record(back)
            # Whatever DeepSpeed does next (bf16 copy, all-gather) is queued after the weights are back.
            torch.cuda.current_stream().wait_event(self._last_h2d)


def build_optimizer(
    cfg: LongloomConfig, params, gpu_share: float | None = None
) -> torch.optim.Optimizer | None:
    """The client optimizer for deepspeed.initialize(optimizer=...): InterleavedAdamW, or None otherwise.

    gpu_share: the run plan's share of the moments kept on the GPU (training/plan.py; measured there
    for offload.gpu_share=auto); None takes a fixed offload.gpu_share from the config.
    """
    if cfg.offload.optimizer != "interleaved":
        return None
    if gpu_share is None:
        if cfg.offload.gpu_share == "auto":
            raise ConfigError(
                "offload.gpu_share=auto is measured by the run plan: pass build_optimizer the plan's gpu_share "
                "(longloom.training.plan.build_run_plan(cfg, world_size, device).gpu_share), or set "
                "offload.gpu_share to a share in (0, 1]"
            )
        gpu_share = float(cfg.offload.gpu_share)
    params = [p for p in params if p.requires_grad]
    subgroups = split_into_subgroups(params)
    on_cpu = interleave([sum(p.numel() for p in group) for group in subgroups], gpu_share)
    hyper = adamw_hyperparameters(cfg)
    optimizer = InterleavedAdamW(
        [{"params": group, "on_cpu": flag} for group, flag in zip(subgroups, on_cpu)],
        lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["weight_decay"],
    )  # fmt: skip
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(
            "interleaved optimizer: %d of %d parameter subgroups (%.1f%% of the elements) keep moments on the GPU",
            on_cpu.count(False), len(on_cpu), 100 * optimizer.gpu_share,
        )  # fmt: skip
    return optimizer
