"""Memory estimate per GPU and per host for a config, with ZeRO partitioning and offload taken into account.

Used by `longloom check` (printed, and a config whose pinned host memory cannot fit is refused) and by
the interleaved optimizer (how much GPU memory is left for Adam moments). The numbers follow what the
trainer builds: DeepSpeed partitions ZeRO state over all dp x sp workers; every layer is checkpointed,
so a layer keeps only its input [B, S/sp, hidden] between forward and backward, and backward holds one
layer's recomputed activations at a time (Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models", 2022, for what a layer saves; flash attention keeps no S x S matrix), of
which the MLP's wide tensors for one tile of tokens (ALST's tiled MLP) and the logits for one chunk
(the fused LM head and loss).
Activation offload (offload/activations.py) moves every layer input but the last, and a share of the
tokens' attention outputs, to pinned host memory, and keeps the attention outputs of another share
(offload.device_activations) in GPU memory; optimizer offload moves master weights and moments
(cpu) or a share of the moments (interleaved). These are estimates for planning: allocator
fragmentation and communication buffers come on top.

The split, dtype and MLP tiles are the run plan's (training/plan.py decides them once and passes
itself in as `plan`); nothing here derives them again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from longloom.attention.linear_chunked import DEFAULT_BLOCK_SIZE
from longloom.config import ConfigError, LongloomConfig, ModelConfig
from longloom.offload.activations import kept_token_counts
from longloom.offload.host_pool import pool_block_bytes
from longloom.parallel.lasp2 import BLOCKS_MAX_HEAD_DIM
from longloom.parallel.loss import FUSED_CHUNK_ELEMENTS
from longloom.runtime.machine import Machine

GIB = 1 << 30
# Pinned memory cannot be swapped out; leave the rest of the host to the OS, data loading and Python.
DEFAULT_PINNABLE_SHARE = 0.8
# Share of the GPU the interleaved optimizer may plan to fill (allocator slack, NCCL buffers, kernels).
DEVICE_USABLE_SHARE = 0.9


class PlannedRun(Protocol):
    """What the estimate needs of the run plan (training/plan.py's RunPlan has it)."""

    world_size: int
    dp: int
    ulysses: int
    ring: int
    mlp_tiles: int  # model.mlp_tiles resolved for this rank's tokens
    device_layers: int  # layers whose checkpointed input stays on the GPU (offload/activations.py)
    device_type: str  # cuda: the activation pool page-locks its buffers (pool_block_bytes each)
    machine: Machine  # the host it is planned for: how many workers share its pinned memory

    @property
    def dtype_bytes(self) -> int: ...  # bytes of a weight / activation element in the training dtype


def parameter_count(m: ModelConfig) -> int:
    h, d, kv = m.hidden, m.head_dim, m.num_kv_heads
    inner = m.heads * d
    mlp = 3 * h * m.mlp_width
    total = 2 * m.vocab_size * h + h  # embedding, lm_head, final norm
    for kind in m.layer_kinds():
        if kind == "S":
            total += 2 * h * inner + 2 * h * kv * d + mlp + 2 * h
        else:
            total += 5 * h * inner + d + mlp + 2 * h
    return total


def _workers_per_host(cfg: LongloomConfig, machine: Machine) -> int:
    """One worker per GPU fills a GPU host; without GPUs every worker runs on this host."""
    if machine.has_gpus:
        return max(1, min(cfg.launch.workers, machine.gpus_per_host))
    return cfg.launch.workers


def _optimizer_bytes(cfg: LongloomConfig, plan: PlannedRun, n: int, gpu_share: float) -> dict[str, float]:
    """Per worker: device bytes of params / grads / fp32 master / moments, and pinned host bytes."""
    stage, b, world = cfg.train.zero_stage, plan.dtype_bytes, plan.world_size
    part = n / world  # one worker's ZeRO partition
    states_n = part if stage >= 1 else n
    device = {
        "parameters": b * (part if stage == 3 else n),
        "gradients": b * (part if stage >= 2 else n),
        # bf16 keeps an fp32 master copy; fp32 under ZeRO keeps a separate fp32 partition as well.
        "master_weights": 4 * states_n if (b == 2 or stage >= 1) else 0.0,
        "optimizer_states": 8 * states_n,
    }
    host = 0.0
    mode = cfg.offload.optimizer
    if mode == "cpu":
        # ZeRO-Offload: fp32 master, moments and the fp32 gradient partition on the host, plus the
        # pinned low-precision copy of the partition that goes back to the GPU.
        host = (4 + 8 + 4) * states_n + b * states_n
        device["master_weights"] = 0.0
        device["optimizer_states"] = 0.0
    elif mode == "interleaved":
        # Host subgroups: moments plus staging for the fp32 gradient and weights of each chunk.
        host = (1.0 - gpu_share) * (8 + 8) * states_n
        device["optimizer_states"] = 8 * states_n * gpu_share
    return {**device, "host": host}


def _kept_attention_bytes(cfg: LongloomConfig, plan: PlannedRun) -> tuple[float, float, float, int]:
    """Bytes of one softmax layer's kept attention outputs (attention/tokenwise.py) per worker:
    (swapped to the host, kept on the device by a layer but the last, kept on the device by the last,
    the swapped out and lse as the pool's blocks: pool_block_bytes of each).

    Token-wise recomputation runs where the attention runs: on S / ring tokens (the whole sequence
    after Ulysses' all-to-all, or this rank's ring shard) for H / ulysses heads; each kept token keeps
    out [B, 1, H/U, D] and fp32 lse [B, H/U, 1]. The tokens are counted as the offloader counts them.
    """
    m, o = cfg.model, cfg.offload
    if o.activation_share == 0.0:
        return 0.0, 0.0, 0.0, 0
    tokens = cfg.data.seq_len // plan.ring
    kept, swapped = kept_token_counts(tokens, o.activation_share, o.device_activations)
    heads = cfg.train.micro_batch_size * m.heads / plan.ulysses
    out_per_token, lse_per_token = heads * m.head_dim * plan.dtype_bytes, heads * 4
    per_token = out_per_token + lse_per_token
    last_layer = kept * per_token if o.device_activations > 0 else 0.0  # activations.py: all on the device
    pinned = pool_block_bytes(swapped * out_per_token) + pool_block_bytes(swapped * lse_per_token)
    return swapped * per_token, (kept - swapped) * per_token, last_layer, pinned


def _activation_bytes(cfg: LongloomConfig, plan: PlannedRun) -> dict[str, float]:
    m, b = cfg.model, plan.dtype_bytes
    tokens = (
        cfg.train.micro_batch_size * cfg.data.seq_len / (plan.ulysses * plan.ring)
    )  # this worker's tokens
    layer_input = tokens * m.hidden * b
    share = cfg.offload.activation_share if m.activation_checkpointing else 0.0
    kv_width = 2 * m.num_kv_heads * m.head_dim
    # The tiled MLP (models/tiled_mlp.py) holds its [tokens, width] tensors for one tile of tokens only.
    mlp_tokens = math.ceil(tokens / plan.mlp_tiles)
    # One layer's backward, at its peak in the MLP backward: the recomputed layer's saved tensors (input,
    # two norm outputs, q, attention output, residual: 6 x hidden; k and v) and the gradient flowing in
    # (hidden), with the MLP's gate, up, SiLU and product and, at worst, two of their gradients
    # (6 x width, for one tile of tokens). Against the peaks measured on an H200 (8-layer Llama-3-8B
    # width, 64K-512K tokens, BENCHMARKS.md) this comes out 12-23% high: safe for planning.
    layer_working = (tokens * (7 * m.hidden + kv_width) + mlp_tokens * 6 * m.mlp_width) * b
    if plan.device_type == "cuda" and "L" in m.layer_kinds() and m.head_dim <= BLOCKS_MAX_HEAD_DIM:
        # A linear-attention layer's backward on CUDA (attention/triton_linear_blocks.py, LASP-2's default
        # there) holds the state entering every block twice, d x d per head in the model dtype: the
        # forward walk's and the gradient's reverse walk's (at H = 32, d = 128: 4 x hidden per token).
        layer_working += 2 * math.ceil(tokens / DEFAULT_BLOCK_SIZE) * m.heads * m.head_dim**2 * b
    # The last layer's output and its final-norm output wait for the LM head's backward.
    final_hidden = 2 * layer_input
    rope = tokens * m.head_dim * 4  # cos and sin tables, fp32, shared by all layers
    # The trainer fuses the LM head into the loss (parallel/loss.py): logits exist one chunk of tokens at
    # a time, in the model dtype, in fp32 and as the fp32 / model-dtype gradient; bf16 adds the fp32
    # accumulator of the head's weight gradient.
    chunk_tokens = min(tokens, max(1, FUSED_CHUNK_ELEMENTS // m.vocab_size))
    logits = chunk_tokens * m.vocab_size * (2 * b + 8) + (4 * m.vocab_size * m.hidden if b < 4 else 0)
    kept_on_device = 0.0  # offload.device_activations: attention outputs kept in GPU memory
    if not m.activation_checkpointing:
        # Every layer keeps what it saved for backward: the working set less the gradients.
        saved_per_layer = (tokens * (6 * m.hidden + kv_width) + mlp_tokens * 4 * m.mlp_width) * b
        inputs, host = m.layers * saved_per_layer, 0.0
    elif share == 0.0:
        inputs, host = m.layers * layer_input, 0.0
    else:
        # offload/activations.py: every layer but the last sends its input and its softmax attention's
        # swapped tokens to the host and keeps its device-kept tokens; the last keeps its input on the
        # device (and, with a device share, all its kept tokens); backward brings one layer's tensors
        # back ahead of time.
        # The plan's device_layers first layers keep their input on the device too.
        to_host, on_device, last_on_device, to_host_pinned = _kept_attention_bytes(cfg, plan)
        kinds = m.layer_kinds()
        device_layers = min(plan.device_layers, len(kinds) - 1)
        swapped_input = [0.0] * device_layers + [layer_input] * (len(kinds) - 1 - device_layers)
        swapped = [inp + (to_host if kind == "S" else 0.0) for inp, kind in zip(swapped_input, kinds[:-1])]
        host = sum(swapped)
        if plan.device_type == "cuda":  # each swapped tensor is its own page-locked block of whole granules
            host = sum(
                pool_block_bytes(inp) + (to_host_pinned if kind == "S" else 0)
                for inp, kind in zip(swapped_input, kinds[:-1])
            )
        inputs = layer_input * (1 + device_layers) + max(swapped, default=0.0)
        kept_on_device = sum(on_device for kind in kinds[:-1] if kind == "S")
        kept_on_device += last_on_device if kinds[-1] == "S" else 0.0
    return {
        "checkpointed_inputs": inputs,
        "attention_outputs_on_device": kept_on_device,
        "layer_working": layer_working,
        "logits": logits + rope + final_hidden,
        "total": inputs + kept_on_device + layer_working + logits + rope + final_hidden,
        "host": host,
    }


def estimate_memory(cfg: LongloomConfig, plan: PlannedRun, gpu_share: float | None = None) -> dict[str, Any]:
    """Bytes per GPU (by component) and pinned host bytes (per worker and per host) for `cfg` run as `plan`.

    gpu_share: the interleaved optimizer's GPU share of the moments (the plan's); None: not interleaved.
    """
    n = parameter_count(cfg.model)
    if cfg.offload.optimizer == "interleaved" and gpu_share is None:
        raise ValueError("estimate_memory: offload.optimizer=interleaved needs the plan's gpu_share")
    optimizer = _optimizer_bytes(cfg, plan, n, gpu_share or 0.0)
    activations = _activation_bytes(cfg, plan)
    per_gpu = {
        key: optimizer[key] for key in ("parameters", "gradients", "master_weights", "optimizer_states")
    }
    per_gpu["activations"] = activations["total"]
    per_gpu["total"] = sum(per_gpu.values())
    host_worker = {"activations": activations["host"], "optimizer": optimizer["host"]}
    host_worker["total"] = host_worker["activations"] + host_worker["optimizer"]
    workers_per_host = _workers_per_host(cfg, plan.machine)
    return {
        "parameters_count": n,
        "world_size": plan.world_size,
        "split": {"dp": plan.dp, "ulysses": plan.ulysses, "ring": plan.ring},
        "dtype_bytes": plan.dtype_bytes,
        "gpu_share": gpu_share if cfg.offload.optimizer == "interleaved" else None,
        "per_gpu": {key: int(value) for key, value in per_gpu.items()},
        "activation_detail": {key: int(v) for key, v in activations.items() if key not in ("total", "host")},
        "host_pinned_per_worker": {key: int(value) for key, value in host_worker.items()},
        "workers_per_host": workers_per_host,
        "host_pinned_per_host": int(host_worker["total"] * workers_per_host),
    }


def interleaved_share_memory_cap(cfg: LongloomConfig, plan: PlannedRun, device_bytes: int | None) -> float:
    """The largest GPU share of moments that fits next to everything else; 1.0 without a separate device."""
    if device_bytes is None:
        return 1.0
    without = estimate_memory(cfg, plan, gpu_share=0.0)["per_gpu"]["total"]
    states_n = parameter_count(cfg.model) / (plan.world_size if cfg.train.zero_stage >= 1 else 1)
    room = DEVICE_USABLE_SHARE * device_bytes - without
    return float(min(1.0, max(0.0, room / (8 * states_n))))


def host_pinned_limit(cfg: LongloomConfig, machine: Machine) -> tuple[int, str]:
    """(bytes that may be pinned on one host of `machine`, where that number comes from)."""
    if cfg.offload.host_memory_limit_gb is not None:
        return int(cfg.offload.host_memory_limit_gb * GIB), "offload.host_memory_limit_gb"
    total = machine.host_bytes
    return int(
        total * DEFAULT_PINNABLE_SHARE
    ), f"{DEFAULT_PINNABLE_SHARE:.0%} of the host's {human_bytes(total)}"


def check_host_memory(
    cfg: LongloomConfig,
    plan: PlannedRun,
    estimate: dict[str, Any],
    replan: Callable[[LongloomConfig], dict[str, Any]] | None = None,
) -> None:
    """Raises ConfigError when the pinned host memory of one host's workers exceeds what may be pinned.

    replan(variant config) -> its estimate, planned as the run plans it (training/plan.py: the interleaved
    optimizer's GPU share and the MLP tiles follow the activation share); it tries the shares the error
    advises. Without it the variants keep this plan and its GPU share.
    """
    needed = estimate["host_pinned_per_host"]
    limit, source = host_pinned_limit(cfg, plan.machine)
    if needed <= limit:
        return
    if replan is None:

        def replan(variant: LongloomConfig) -> dict[str, Any]:
            return estimate_memory(variant, plan, gpu_share=estimate["gpu_share"])

    worker = estimate["host_pinned_per_worker"]
    optimizer_advice = (
        f"raise offload.gpu_share (planned {estimate['gpu_share']:.2f}) if GPU memory allows"
        if cfg.offload.optimizer == "interleaved"
        else "use offload.optimizer=interleaved or raise offload.gpu_share"
    )
    raise ConfigError(
        f"pinned host memory needed: {human_bytes(needed)} per host ({estimate['workers_per_host']} workers x "
        f"{human_bytes(worker['total'])}: activations {human_bytes(worker['activations'])} "
        f"(offload.activations={cfg.offload.activations}), optimizer {human_bytes(worker['optimizer'])} "
        f"(offload.optimizer={cfg.offload.optimizer})) exceeds the {human_bytes(limit)} allowed "
        f"({source}): {_activation_share_advice(cfg, limit, replan)}{optimizer_advice}, spread the run over "
        "more hosts, or set offload.host_memory_limit_gb if the host has more to give"
    )


def _activation_share_advice(
    cfg: LongloomConfig, limit: float, replan: Callable[[LongloomConfig], dict[str, Any]]
) -> str:
    """'set offload.activations to X, ' for the largest share in steps of 0.01 whose whole plan fits the host.

    Every candidate is planned in full rather than interpolated: on CUDA each swapped tensor is a block
    of whole pool granules, so host bytes are a step function of the share, and the interleaved optimizer's GPU share
    (hence its host bytes) moves with it. At share 0 nothing goes to the host and the layer inputs fill
    the GPU, which is why 0 is never advised.
    """

    def with_share(share: float) -> LongloomConfig:
        return cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"activations": share})})

    current = round(100 * cfg.offload.activation_share)
    for hundredths in range(current - 1 if current else 100, 0, -1):
        if replan(with_share(hundredths / 100))["host_pinned_per_host"] <= limit:
            return (
                f"set offload.activations={hundredths / 100:.2f} (the largest share that fits: less of the "
                "attention output is kept, the rest recomputed; offload.device_activations can keep more "
                "of it in GPU memory instead), "
            )
    smallest = replan(with_share(0.01))
    return (
        f"even offload.activations=0.01 needs {human_bytes(smallest['host_pinned_per_host'])} per host "
        "(the layer inputs): shorten data.seq_len, "
    )


def human_bytes(value: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def format_estimate(estimate: dict[str, Any]) -> str:
    gpu, host = estimate["per_gpu"], estimate["host_pinned_per_worker"]
    gib = human_bytes

    lines = [
        (
            f"# memory estimate: {estimate['parameters_count'] / 1e6:.1f}M parameters, "
            f"{estimate['dtype_bytes']}-byte weights/activations, ZeRO over {estimate['world_size']} workers"
        ),
        "# per GPU: "
        + ", ".join(f"{key.replace('_', ' ')} {gib(value)}" for key, value in gpu.items() if key != "total")
        + f"; total {gib(gpu['total'])}",
        "# activations: "
        + ", ".join(
            f"{key.replace('_', ' ')} {gib(value)}" for key, value in estimate["activation_detail"].items()
        ),
        (
            f"# pinned host memory per worker: activations {gib(host['activations'])}, optimizer "
            f"{gib(host['optimizer'])}; per host ({estimate['workers_per_host']} workers) "
            f"{gib(estimate['host_pinned_per_host'])}"
        ),
    ]
    if estimate["gpu_share"] is not None:
        lines.append(f"# interleaved optimizer: GPU share of moments {estimate['gpu_share']:.2f} (planned)")
    return "\n".join(lines)
