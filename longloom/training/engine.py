"""What the trainer hands DeepSpeed: the model of model.source, the DeepSpeed config, the LR schedule.

The model receives the run plan's decisions (training/plan.py): its dtype and the MLP's token tiles.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from longloom.config import LongloomConfig
from longloom.models.llama import LlamaModel, plain_checkpoint
from longloom.offload.activations import ActivationOffloader
from longloom.offload.memory import parameter_count
from longloom.offload.optimizer import optimizer_settings
from longloom.parallel.dims import ParallelDims


def lr_lambda(cfg: LongloomConfig):
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at the last step."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: LongloomConfig, dtype: torch.dtype) -> dict[str, Any]:
    t = cfg.train
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    config.update(optimizer_settings(cfg))
    return config


# The native model's fp32 weights are made on the GPU when they take at most this share of its memory.
NATIVE_BUILD_GPU_SHARE = 0.5


def native_build_device(parameters: int, device: torch.device, device_bytes: int | None) -> torch.device:
    """Where the native model's weights are made and randomly initialised before DeepSpeed takes them.

    On the GPU it trains on when its fp32 weights fit in NATIVE_BUILD_GPU_SHARE of the memory: the
    random init of an 8B model took 79 s on the host of 2 H200s (bench/e2e.py phases, BENCHMARKS.md
    "End to end"); on the GPU it is a few kernels per tensor (its time to be measured with the same
    bench). Otherwise on the host, as before. Every rank makes the same weights either way (same seed
    before construction), but not the same weights as the other device would (a GPU run is not
    compared with a CPU run).
    """
    if device.type != "cuda" or device_bytes is None:
        return torch.device("cpu")
    return device if 4 * parameters <= NATIVE_BUILD_GPU_SHARE * device_bytes else torch.device("cpu")


def build_model(
    cfg: LongloomConfig,
    dims: ParallelDims,
    device: torch.device,
    dtype: torch.dtype,
    ds_config: dict[str, Any],
    mlp_tiles: int | None = None,
    device_layers: int = 0,
) -> tuple[torch.nn.Module, ActivationOffloader | None]:
    """The model of model.source with the trainer's call (LlamaModel or HFCausalLM), and its activation offloader.

    mlp_tiles: the run plan's MLP tiles (native and hf: models); device_layers: its layers whose
    checkpointed input stays on the GPU (activation offload). hf:<folder>: transformers builds the folder's
    architecture and loads its weights; under ZeRO-3 inside deepspeed.zero.Init with the engine's
    config, so each rank reads only its partitions.
    """
    share, device_share = cfg.offload.activation_share, cfg.offload.device_activations
    if not cfg.model.is_hf:
        offloader = (
            ActivationOffloader(
                share,
                device,
                device_share=device_share,
                device_layers=device_layers,
                layer_kinds=cfg.model.layer_kinds(),
            )
            if share > 0
            else None
        )
        checkpoint_fn = offloader.checkpoint if offloader else plain_checkpoint
        device_bytes = (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        )
        build_on = native_build_device(parameter_count(cfg.model), device, device_bytes)
        with torch.device(build_on) if build_on.type == "cuda" else contextlib.nullcontext():
            model = LlamaModel(cfg.model, dims, checkpoint_fn=checkpoint_fn, mlp_tiles=mlp_tiles)
        return model, offloader
    from longloom.models.hf_causal_lm import HFCausalLM
    from longloom.models.hf_loading import build_hf_causal_lm, hf_folder, resolve_hf_model
    from longloom.models.hf_offload import enable_activation_offload
    from longloom.models.hf_tiled_mlp import enable_tiled_mlp

    _, hf_config = resolve_hf_model(cfg.model, cfg.data.seq_len)
    causal_lm = build_hf_causal_lm(
        hf_folder(cfg.model.source),
        hf_config,
        seq_len=cfg.data.seq_len,
        dtype=dtype,
        device=device,
        zero3_config=ds_config if cfg.train.zero_stage == 3 else None,
    )
    model = HFCausalLM(causal_lm, dims)  # installs SP attention first: offload then keeps attention outputs
    enable_tiled_mlp(causal_lm, mlp_tiles or 1)
    offloader = None
    if share > 0:
        offloader = enable_activation_offload(
            causal_lm, share, device, device_share=device_share, device_layers=device_layers
        )
    elif cfg.model.activation_checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    causal_lm.train()  # HF checkpoints (and offloads) in training mode only
    return model, offloader
