"""The run plan: every decision about a run that follows from its config and world size, made once.

`build_run_plan(cfg, world_size)` decides the dp x ulysses x ring split and the SP layout (contiguous,
or zigzag when a ring runs), the dtype, the MLP's token tiles, the interleaved optimizer's GPU share,
the layers whose checkpointed input stays on the GPU when the host cannot pin them all, and the memory
estimate. `longloom check` prints it (preflight.py); the trainer builds it once per
worker and hands each part to whoever needs it: the split to ParallelDims, the dtype to the model and
DeepSpeed, the tiles to the model, the GPU share to the optimizer builder. Nothing below training/
derives these again (tests/test_layering.py keeps the floors; offload/memory.py takes the plan).

On the driver (`longloom check`, `train` before launching) the plan is made without a device: an
"auto" GPU share is the most the GPU memory allows (0.5 without a GPU), as the estimate plans it. On a
worker it is made with the rank's device and the share is measured (offload/update_rates.py: Deep
Optimizer States' performance model), rank 0's measurement on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from longloom.config import LongloomConfig
from longloom.models.tiled_mlp import resolve_mlp_tiles
from longloom.offload.memory import (
    DEVICE_USABLE_SHARE,
    estimate_memory,
    format_estimate,
    host_pinned_limit,
    human_bytes,
    interleaved_share_memory_cap,
)
from longloom.offload.update_rates import choose_gpu_share
from longloom.runtime.cpu_threads import usable_cores, worker_cpu_threads
from longloom.runtime.machine import Machine
from longloom.training.split import checked_split, resolve_model, sp_layout

# Without a GPU the driver cannot see the workers' speeds; an "auto" share is planned at this.
PLANNED_SHARE_WITHOUT_GPU = 0.5


@dataclass(frozen=True)
class RunPlan:
    """What a run is, decided once from (config, world size, device type)."""

    config: LongloomConfig  # model.* resolved: an hf: folder's shapes (data checks, memory, config.yaml)
    world_size: int
    dp: int
    ulysses: int
    ring: int
    layout: str  # contiguous | zigzag (parallel/sharding.py)
    device_type: str  # cuda | cpu: where the workers train
    dtype: torch.dtype
    local_tokens: int  # tokens of one micro batch on one rank: micro_batch_size x seq_len / SP
    mlp_tiles: int  # model.mlp_tiles resolved for local_tokens
    mlp_tiles_source: str  # why that count (model.mlp_tiles=auto sizes it against GPU memory)
    device_layers: int  # first layers whose checkpointed input stays on the GPU (offload/activations.py)
    device_layers_source: str
    gpu_share: float | None  # interleaved optimizer: share of the moments on the GPU; None otherwise
    gpu_share_source: str
    memory: dict[str, Any]  # offload/memory.py's estimate for this plan
    machine: Machine  # the host it is planned for (GPU memory, GPUs and memory per host)

    @property
    def split(self) -> tuple[int, int, int]:
        return self.dp, self.ulysses, self.ring

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        """The plan as `longloom check` prints it: comment lines under the resolved config."""
        share = "-" if self.gpu_share is None else f"{self.gpu_share:.2f} ({self.gpu_share_source})"
        dtype = str(self.dtype).removeprefix("torch.")
        split = f"dp {self.dp} x ulysses {self.ulysses} x ring {self.ring}"
        tiles = f"MLP tiles {self.mlp_tiles} (model.mlp_tiles={self.config.model.mlp_tiles}: {self.mlp_tiles_source})"
        work = f"{self.device_type} {dtype}, {self.local_tokens} tokens per rank"
        # Decided by each worker on its own node (runtime/cpu_threads.py); shown for a node like this one.
        workers_here = self.memory.get("workers_per_host", 1)
        setting = self.config.launch.cpu_threads
        cores = usable_cores()
        threads = worker_cpu_threads(setting, cores, workers_here)
        why = f"{cores} cores here / {workers_here} workers per host" if setting == "auto" else "as set"
        machine = self.machine
        gpus = (
            f"{machine.gpus_per_host} GPUs of {human_bytes(machine.gpu_bytes)} ({machine.gpu_name})"
            if machine.has_gpus
            else "no GPU"
        )
        lines = [
            f"# planned for: hosts with {gpus} and {human_bytes(machine.host_bytes)} of memory",
            f"# split: {self.world_size} workers = {split} ({self.layout} layout)",
            (
                f"# plan: {work}, {tiles}, optimizer GPU share {share}, "
                f"CPU threads per worker {threads} (launch.cpu_threads={setting}: {why})"
            ),
        ]
        if self.device_layers:
            lines.append(
                f"# layer inputs kept in GPU memory: {self.device_layers} ({self.device_layers_source})"
            )
        lines.append(format_estimate(self.memory))
        return "\n".join(lines)


def resolve_dtype(cfg: LongloomConfig, device: torch.device | str) -> torch.dtype:
    """train.dtype: bf16, fp32, or auto = bf16 on CUDA and fp32 on the CPU."""
    device_type = device if isinstance(device, str) else device.type
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _device_bytes(device: torch.device | None, machine: Machine) -> int | None:
    """GPU memory of this worker's device, or on the driver the planned machine's; None without a GPU."""
    if device is None:
        return machine.gpu_bytes
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _mlp_tiles(cfg: LongloomConfig, partial: RunPlan, device: torch.device | None) -> tuple[int, str]:
    """(tiles, why) for model.mlp_tiles; "auto" is untiled where the estimate says it fits the GPU.

    Tiling saves the [tokens, intermediate] tensors and costs one more MLP forward per layer: 1.30 s of
    a 29.36 s step at 128K tokens on 2 x H200 (untiled 4,676 vs tiled 4,466 tokens/s, BENCHMARKS.md,
    session 10). So "auto" leaves the MLP whole when the whole plan, untiled, fits in the usable share of
    the GPU by the memory estimate (which runs 12-23% high), and otherwise tiles as ALST does
    (ceil(tokens / hidden)). Where that GPU memory could hold optimizer moments instead (interleaved,
    gpu_share auto) and without a GPU to size against, it tiles as ALST does: untiled was not measured there.
    """
    setting, tokens, hidden = cfg.model.mlp_tiles, partial.local_tokens, cfg.model.hidden
    tiles = resolve_mlp_tiles(setting, tokens, hidden)
    if setting != "auto":
        return tiles, "as set"
    alst = f"ceil({tokens} tokens / hidden {hidden}) as ALST"
    if tiles == 1:
        return 1, alst
    device_bytes = _device_bytes(device, partial.machine)
    if device_bytes is None:
        return tiles, f"{alst}, no GPU to size the untiled MLP against"
    if cfg.offload.optimizer == "interleaved" and cfg.offload.gpu_share == "auto":
        return tiles, f"{alst}, GPU memory left to the interleaved optimizer's moments"
    share = float(cfg.offload.gpu_share) if cfg.offload.optimizer == "interleaved" else None
    untiled = estimate_memory(cfg, dataclasses.replace(partial, mlp_tiles=1), gpu_share=share)
    needed, usable = untiled["per_gpu"]["total"], DEVICE_USABLE_SHARE * device_bytes
    if needed <= usable:
        return 1, (
            f"untiled: the estimate with the whole MLP, {needed / 2**30:.1f} GiB, fits the usable "
            f"{usable / 2**30:.1f} GiB of the GPU (one MLP forward less per layer)"
        )
    return tiles, f"{alst}: untiled would need {needed / 2**30:.1f} of {usable / 2**30:.1f} GiB usable"


def _gpu_share(
    cfg: LongloomConfig, partial: RunPlan, device: torch.device | None
) -> tuple[float | None, str]:
    """(share, where it came from) for offload.optimizer=interleaved; (None, "-") otherwise."""
    if cfg.offload.optimizer != "interleaved":
        return None, "-"
    if cfg.offload.gpu_share != "auto":
        return float(cfg.offload.gpu_share), "offload.gpu_share"
    device_bytes = _device_bytes(device, partial.machine)
    if device is None:  # the driver plans: the most the GPU memory allows
        if device_bytes is None:
            return PLANNED_SHARE_WITHOUT_GPU, "auto, planned without a GPU"
        return interleaved_share_memory_cap(
            cfg, partial, device_bytes
        ), "auto, planned: what GPU memory allows"
    cap = interleaved_share_memory_cap(cfg, partial, device_bytes)
    return choose_gpu_share(device, cap), "auto, measured"


def _device_layers(cfg: LongloomConfig, partial: RunPlan, device: torch.device | None) -> tuple[int, str]:
    """(layers whose input stays in GPU memory, why): spend GPU memory where host memory runs out.

    Activation offload sends every layer input but the last's to pinned host memory. When one host's
    workers would pin more than it allows (offload/memory.py: host_pinned_limit) and the GPU has room,
    the first layers of each forward keep their inputs on the GPU instead: the fewest that bring the
    host under its limit while the GPU estimate stays within its usable share. Not with the interleaved
    optimizer at gpu_share auto (that GPU memory holds optimizer moments, which would move to the host
    in turn), nor without a GPU to size against; then the preflight's host check refuses as before.
    """
    o = cfg.offload
    if partial.device_type != "cuda" or o.activation_share == 0 or not cfg.model.activation_checkpointing:
        return 0, "-"
    limit, limit_source = host_pinned_limit(cfg, partial.machine)

    def estimate(layers: int) -> dict[str, Any]:
        return estimate_memory(cfg, dataclasses.replace(partial, device_layers=layers), partial.gpu_share)

    every_input = estimate(0)["host_pinned_per_host"]
    if every_input <= limit:
        return 0, "-"
    device_bytes = _device_bytes(device, partial.machine)
    if device_bytes is None or (o.optimizer == "interleaved" and o.gpu_share == "auto"):
        return 0, "-"
    usable = DEVICE_USABLE_SHARE * device_bytes
    for layers in range(1, cfg.model.layers):
        trial = estimate(layers)
        if trial["per_gpu"]["total"] > usable:
            break
        if trial["host_pinned_per_host"] <= limit:
            return layers, (
                f"the host may pin {human_bytes(limit)} ({limit_source}), every layer input would need "
                f"{human_bytes(every_input)}; with the first {layers} kept on the GPU: "
                f"{human_bytes(trial['host_pinned_per_host'])} pinned, {human_bytes(trial['per_gpu']['total'])} "
                f"per GPU of {human_bytes(usable)} usable"
            )
    return 0, "-"


def build_run_plan(
    cfg: LongloomConfig, world_size: int, device: torch.device | None = None, machine: Machine | None = None
) -> RunPlan:
    """The plan of `cfg` on `world_size` workers; `device`: this worker's (None on the driver); `machine`:
    the host it is planned for (runtime/machine.py; default this one).

    Raises ConfigError for a split that cannot work. On a worker with offload.gpu_share=auto this is
    collective (rank 0's measured update rates are broadcast): every rank calls it at the same point.
    """
    cfg = resolve_model(cfg)
    dp, ulysses, ring = checked_split(cfg, world_size)
    machine = machine if machine is not None else Machine.here()
    device_type = device.type if device is not None else ("cuda" if machine.has_gpus else "cpu")
    local_tokens = cfg.train.micro_batch_size * cfg.data.seq_len // (ulysses * ring)
    partial = RunPlan(
        config=cfg,
        world_size=world_size,
        dp=dp,
        ulysses=ulysses,
        ring=ring,
        layout=sp_layout(ring),
        device_type=device_type,
        dtype=resolve_dtype(cfg, device_type),
        local_tokens=local_tokens,
        mlp_tiles=resolve_mlp_tiles(cfg.model.mlp_tiles, local_tokens, cfg.model.hidden),
        mlp_tiles_source="",
        device_layers=0,
        device_layers_source="-",
        gpu_share=None,
        gpu_share_source="-",
        memory={},
        machine=machine,
    )
    tiles, tiles_source = _mlp_tiles(cfg, partial, device)
    partial = dataclasses.replace(partial, mlp_tiles=tiles, mlp_tiles_source=tiles_source)
    gpu_share, source = _gpu_share(cfg, partial, device)
    partial = dataclasses.replace(partial, gpu_share=gpu_share, gpu_share_source=source)
    layers, layers_source = _device_layers(cfg, partial, device)
    partial = dataclasses.replace(partial, device_layers=layers, device_layers_source=layers_source)
    return dataclasses.replace(partial, memory=estimate_memory(cfg, partial, gpu_share=gpu_share))


def global_tokens_per_step(plan: RunPlan) -> int:
    """Tokens of one optimizer step over the whole run: dp x micro_batch_size x grad_accum x seq_len."""
    t = plan.config.train
    return plan.dp * t.micro_batch_size * t.grad_accum * plan.config.data.seq_len
