"""Memory estimate: parameter count of the real model, ZeRO / offload bookkeeping, the pinned-host check."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from longloom.config import ConfigError, load_config
from longloom.models.llama import LlamaModel
from longloom.offload.activations import ActivationOffloader
from longloom.offload.host_pool import PinnedHostPool, pool_block_bytes
from longloom.offload.memory import (
    check_host_memory,
    estimate_memory,
    format_estimate,
    human_bytes,
    interleaved_share_memory_cap,
    parameter_count,
)
from longloom.training.offload_report import activation_offload_line
from longloom.training.plan import build_run_plan


def _memory(cfg, world_size: int) -> dict:
    """The run plan's estimate (training/plan.py decides the split, dtype and tiles it is made for)."""
    return build_run_plan(cfg, world_size).memory


def _check_host(cfg, world_size: int = 1) -> None:
    plan = build_run_plan(cfg, world_size)
    check_host_memory(cfg, plan, plan.memory)


MODEL = ["model.hidden=64", "model.heads=8", "model.kv_heads=2", "model.layers=3", "train.dtype=fp32"]


@pytest.mark.parametrize("pattern", ["S", "L", "LLS"])
def test_parameter_count_matches_the_model(pattern):
    cfg = load_config(None, [*MODEL, f"model.layer_pattern={pattern}"])
    assert parameter_count(cfg.model) == LlamaModel(cfg.model).num_parameters()


def test_zero_partitioning_and_optimizer_offload():
    base = [*MODEL, "launch.workers=4", "parallel.ulysses=2"]
    n = parameter_count(load_config(None, base).model)
    stage0 = _memory(load_config(None, [*base, "train.zero_stage=0"]), 4)["per_gpu"]
    stage1 = _memory(load_config(None, [*base, "train.zero_stage=1"]), 4)["per_gpu"]
    stage3 = _memory(load_config(None, [*base, "train.zero_stage=3"]), 4)["per_gpu"]
    assert stage0["optimizer_states"] == 8 * n and stage1["optimizer_states"] == 8 * n // 4
    assert stage1["parameters"] == 4 * n and stage3["parameters"] == 4 * n // 4

    cpu = _memory(load_config(None, [*base, "offload.optimizer=cpu"]), 4)
    assert cpu["per_gpu"]["optimizer_states"] == 0 and cpu["per_gpu"]["master_weights"] == 0
    assert cpu["host_pinned_per_worker"]["optimizer"] == int((16 + 4) * n / 4)

    interleaved = _memory(
        load_config(None, [*base, "offload.optimizer=interleaved", "offload.gpu_share=0.25"]), 4
    )
    assert interleaved["per_gpu"]["optimizer_states"] == int(0.25 * 8 * n / 4)
    assert interleaved["host_pinned_per_worker"]["optimizer"] == int(0.75 * 16 * n / 4)
    assert interleaved["gpu_share"] == 0.25


@pytest.mark.parametrize("activations,share", [("true", 1.0), ("0.5", 0.5)])
def test_activation_host_bytes_match_what_the_offloader_moves(activations, share):
    cfg = load_config(
        None, [*MODEL, "data.seq_len=48", "train.micro_batch_size=2", f"offload.activations={activations}"]
    )
    estimate = _memory(cfg, 1)
    offloader = ActivationOffloader(cfg.offload.activation_share, torch.device("cpu"))
    model = LlamaModel(cfg.model, checkpoint_fn=offloader.checkpoint)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48))
    model(tokens, torch.arange(48).expand(2, 48)).sum().backward()
    assert offloader.swapped_bytes == estimate["host_pinned_per_worker"]["activations"] > 0
    off = _memory(load_config(None, [*MODEL, "data.seq_len=48", "train.micro_batch_size=2"]), 1)
    assert off["host_pinned_per_worker"]["activations"] == 0
    saved = (
        off["activation_detail"]["checkpointed_inputs"] - estimate["activation_detail"]["checkpointed_inputs"]
    )
    layer_input = 2 * 48 * 64 * 4
    # One swapped layer on its way back: its input and the kept tokens' attention out [2, kept, 8 heads,
    # 8] and lse [2, 8, kept], fp32.
    prefetched = layer_input + 2 * round(share * 48) * 8 * (8 + 1) * 4
    # Two inputs leave the device; one swapped layer comes back ahead of time.
    assert saved == 2 * layer_input - prefetched


def test_device_layers_inputs_count_on_the_gpu_and_leave_the_host():
    cfg = load_config(
        None, [*MODEL, "data.seq_len=48", "train.micro_batch_size=2", "offload.activations=true"]
    )
    plan = dataclasses.replace(build_run_plan(cfg, 1), device_layers=1)
    estimate = estimate_memory(cfg, plan)
    offloader = ActivationOffloader(1.0, torch.device("cpu"), device_layers=1)
    model = LlamaModel(cfg.model, checkpoint_fn=offloader.checkpoint)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48))
    model(tokens, torch.arange(48).expand(2, 48)).sum().backward()
    assert offloader.swapped_bytes == estimate["host_pinned_per_worker"]["activations"] > 0
    layer_input = 2 * 48 * 64 * 4
    every = estimate_memory(cfg, dataclasses.replace(plan, device_layers=0))
    assert every["host_pinned_per_worker"]["activations"] - offloader.swapped_bytes == layer_input
    kept = (
        estimate["activation_detail"]["checkpointed_inputs"]
        - every["activation_detail"]["checkpointed_inputs"]
    )
    assert kept == layer_input


def test_device_kept_attention_outputs_count_on_the_gpu_not_the_host():
    base = [*MODEL, "data.seq_len=48", "train.micro_batch_size=2", "offload.activations=0.25"]
    cfg = load_config(None, [*base, "offload.device_activations=0.5"])
    estimate, host_only = _memory(cfg, 1), _memory(load_config(None, base), 1)
    offloader = ActivationOffloader(0.25, torch.device("cpu"), device_share=0.5)
    model = LlamaModel(cfg.model, checkpoint_fn=offloader.checkpoint)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48))
    model(tokens, torch.arange(48).expand(2, 48)).sum().backward()
    # The first two layers keep 24 of their 36 kept tokens on the device, the last all 36: out [2, tokens,
    # 8 heads, 8] and lse [2, 8, tokens], fp32.
    on_device = (2 * 24 + 36) * 2 * 8 * (8 + 1) * 4
    assert offloader.device_kept_bytes == on_device
    assert estimate["activation_detail"]["attention_outputs_on_device"] == on_device
    assert estimate["per_gpu"]["activations"] - host_only["per_gpu"]["activations"] == on_device
    # The host holds what offload.activations=0.25 alone sends there, and that is what was sent.
    assert estimate["host_pinned_per_worker"] == host_only["host_pinned_per_worker"]
    assert offloader.swapped_bytes == estimate["host_pinned_per_worker"]["activations"]
    assert host_only["activation_detail"]["attention_outputs_on_device"] == 0
    assert f"attention outputs on device {human_bytes(on_device)}" in build_run_plan(cfg, 1).describe()
    # The first step's report line says what stayed on the device.
    line = activation_offload_line(offloader)
    assert f"{human_bytes(on_device)} kept in GPU memory (the attention outputs of 50% of the tokens" in line
    assert "attention recomputed for the other 25% of the tokens;" in line
    assert re.search(
        r"pool [\d.]+ \w+ in \d+ buffers, allocated in \d+\.\d s, \d+\.\d s of it holding up the forward "
        r"\(the rest ahead, on the pool's thread\)$",
        line,
    ), line


def test_pool_blocks_are_counted_as_the_pool_holds_them():
    # On CUDA every swapped tensor is a page-locked block of whole 1 MiB granules (pool_block_bytes, the
    # pool's own allocation); on the CPU nothing is pinned, and the estimate is the bytes sent, as
    # measured above.
    mib = 1 << 20
    cfg = load_config(None, [*MODEL, "data.seq_len=48", "offload.activations=0.25"])
    cpu_plan = build_run_plan(cfg, 1)
    cuda_plan = dataclasses.replace(cpu_plan, device_type="cuda")
    # Two of three layers swap: the input [1, 48, 64] fp32 (12 KiB) and the last 12 tokens' out
    # [1, 12, 8, 8] (3 KiB) and lse [1, 8, 12] (384 B).
    assert estimate_memory(cfg, cpu_plan)["host_pinned_per_worker"]["activations"] == 2 * (12288 + 3072 + 384)
    assert estimate_memory(cfg, cuda_plan)["host_pinned_per_worker"]["activations"] == 2 * 3 * mib
    # A 1.5 GiB layer input (196608 tokens x 4096 x bf16) holds 1.5 GiB, not torch's 2 GiB block.
    assert [pool_block_bytes(n) for n in (0, 1, mib, mib + 1, 1.5 * 2**30)] == [0, mib, mib, 2 * mib, 3 << 29]
    pool = PinnedHostPool(pin=False)
    assert pool.acquire(mib + 1).capacity == pool_block_bytes(mib + 1) and pool.total_bytes == 2 * mib


@pytest.mark.parametrize("pattern", ["S", "LS"])
def test_linear_layers_count_the_block_kernels_states_on_cuda(pattern):
    # LASP-2's CUDA backend (attention/triton_linear_blocks.py) holds two block-state tensors in a linear
    # layer's backward: the estimate adds exactly what block_states allocates, twice, and only with
    # linear layers on CUDA. block_states itself runs here under the Triton interpreter.
    pytest.importorskip("triton")
    from longloom.attention.triton_linear_blocks import block_states

    cfg = load_config(None, [*MODEL, "data.seq_len=130", f"model.layer_pattern={pattern}"])
    cpu_plan = build_run_plan(cfg, 1)
    cuda_plan = dataclasses.replace(cpu_plan, device_type="cuda")
    added = (
        estimate_memory(cfg, cuda_plan)["activation_detail"]["layer_working"]
        - estimate_memory(cfg, cpu_plan)["activation_detail"]["layer_working"]
    )
    k = torch.zeros(1, 130, 8, 8)  # the layer's keys (and values): [B, S, H, d], fp32 as trained here
    states, _ = block_states(k, k, None, None, False, 64)
    assert added == (2 * states.nbytes if "L" in pattern else 0)
    # Heads wider than 128 keep the scan (parallel/lasp2.py: BLOCKS_MAX_HEAD_DIM): nothing added.
    wide_shape = ["model.hidden=256", "model.heads=1", "model.kv_heads=1"]
    wide = load_config(None, [*MODEL, *wide_shape, "data.seq_len=130", f"model.layer_pattern={pattern}"])
    wide_plan = build_run_plan(wide, 1)
    assert wide.model.head_dim == 256
    working = [
        estimate_memory(wide, dataclasses.replace(wide_plan, device_type=kind))["activation_detail"][
            "layer_working"
        ]
        for kind in ("cpu", "cuda")
    ]
    assert working[0] == working[1]


def test_check_refuses_pinned_memory_that_does_not_fit():
    cfg = load_config(None, [*MODEL, "offload.activations=true", "offload.host_memory_limit_gb=0.000001"])
    with pytest.raises(ConfigError, match=r"pinned host memory needed: .* exceeds the 1.05 KiB allowed"):
        _check_host(cfg)
    _check_host(load_config(None, [*MODEL, "offload.activations=true"]))  # the host has room


def _advised_share(cfg, plan_for) -> float | None:
    """The share the refusal advises (None: it fits), with plan_for(config) -> plan as the replanning."""
    try:
        check_host_memory(cfg, plan_for(cfg), plan_for(cfg).memory, replan=lambda c: plan_for(c).memory)
    except ConfigError as error:
        advised = re.search(r"set offload.activations=([0-9.]+) \(the largest share that fits", str(error))
        return float(advised.group(1)) if advised else -1.0
    return None


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_refusal_advises_the_largest_activation_share_that_fits(device_type):
    # The advice is checked by taking it: the advised share fits, 0.01 more does not. On a CUDA-typed
    # plan every swapped tensor is a block of whole granules, so host bytes are a step function of the
    # share (an advice interpolated between shares was refused on an H200 at 196608 tokens: "at most
    # 0.11", then 0.1 needed 100.77 of 100.69 GiB).
    def plan_for(cfg):
        plan = build_run_plan(cfg, 1)
        plan = dataclasses.replace(plan, device_type=device_type)
        return dataclasses.replace(plan, memory=estimate_memory(cfg, plan))

    def config(share, limit_gib=None):
        limit = [f"offload.host_memory_limit_gb={limit_gib}"] if limit_gib is not None else []
        return load_config(None, [*MODEL, "data.seq_len=65536", f"offload.activations={share}", *limit])

    def host_gib(share):
        return plan_for(config(share)).memory["host_pinned_per_host"] / 2**30

    assert host_gib(1.0) > host_gib(0.5) > host_gib(0.01)

    for fraction in (0.13, 0.4, 0.77):
        limit = host_gib(0.01) + fraction * (host_gib(1.0) - host_gib(0.01))
        advised = _advised_share(config("true", limit), plan_for)
        assert advised is not None and 0 < advised < 1
        assert _advised_share(config(advised, limit), plan_for) is None  # taking the advice fits
        assert host_gib(round(advised + 0.01, 2)) > limit  # and it is the largest that does
    tiny = config(0.4, 0.000001)
    with pytest.raises(ConfigError, match=r"even offload.activations=0.01 needs .* per host .*seq_len"):
        check_host_memory(tiny, plan_for(tiny), plan_for(tiny).memory, replan=lambda c: plan_for(c).memory)


def test_refusal_with_interleaved_optimizer_replans_its_gpu_share():
    # Lowering the activation share frees the GPU's prefetch room, which the interleaved optimizer's
    # GPU share takes: the advice plans each share in full (the preflight passes build_run_plan).
    cfg = load_config(
        None, [*MODEL, "data.seq_len=4000", "offload.optimizer=interleaved", "offload.activations=0.5"]
    )
    plan = build_run_plan(cfg, 1)
    limit = plan.memory["host_pinned_per_host"] / 2**30 * 0.999
    tight = load_config(
        None,
        [
            *MODEL,
            "data.seq_len=4000",
            "offload.optimizer=interleaved",
            "offload.activations=0.5",
            f"offload.host_memory_limit_gb={limit}",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"raise offload.gpu_share \(planned [0-9.]+\) if GPU memory allows"
    ):
        check_host_memory(tight, plan, plan.memory, replan=lambda c: build_run_plan(c, 1).memory)


def test_interleaved_memory_cap_follows_device_size():
    cfg = load_config(None, [*MODEL, "offload.optimizer=interleaved"])
    plan = build_run_plan(cfg, 1)
    without = estimate_memory(cfg, plan, gpu_share=0.0)["per_gpu"]["total"]
    states = 8 * parameter_count(cfg.model)
    assert interleaved_share_memory_cap(cfg, plan, None) == 1.0
    assert interleaved_share_memory_cap(cfg, plan, int(without / 0.9)) == 0.0
    half = interleaved_share_memory_cap(cfg, plan, int((without + states / 2) / 0.9) + 1)
    assert half == pytest.approx(0.5, abs=1e-3)
    assert interleaved_share_memory_cap(cfg, plan, 10 * (without + states)) == 1.0


def test_format_and_cli_check(tmp_path):
    cfg = load_config(None, [*MODEL, "offload.optimizer=interleaved", "offload.gpu_share=0.5"])
    text = format_estimate(_memory(cfg, 1))
    assert (
        "per GPU:" in text and "pinned host memory per worker" in text and "GPU share of moments 0.50" in text
    )
    config = tmp_path / "c.yaml"
    config.write_text("model: {hidden: 64, heads: 8, layers: 3}\noffload: {activations: true}\n")
    command = [sys.executable, "-m", "longloom", "check", str(config)]
    ok = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "pinned host memory per worker: activations" in ok.stdout, ok.stderr
    assert (
        "# split: 1 workers = dp 1 x ulysses 1 x ring 1" in ok.stdout and "# plan: " in ok.stdout
    )  # the run plan
    refused = subprocess.run(
        [*command, "offload.host_memory_limit_gb=0.000001"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "offload.host_memory_limit_gb" in refused.stderr


# Peak GPU memory measured on one H200 by bench/offload.py (BENCHMARKS.md, 2026-11-23): an 8-layer
# Llama-3-8B-width model, vocab 512, bf16, one sequence, forward + backward, no optimizer.
H200_PEAKS_GIB = [(65536, "false", 21.22), (131072, "false", 39.01), (131072, "true", 36.47),
                  (393216, "false", 110.18), (524288, "true", 125.82)]  # fmt: skip


@pytest.mark.parametrize("seq_len,activations,measured_gib", H200_PEAKS_GIB)
def test_activation_estimate_is_conservative_and_close_to_measured_peaks(seq_len, activations, measured_gib):
    cfg = load_config(
        None,
        ["model.vocab_size=512", "model.hidden=4096", "model.heads=32", "model.kv_heads=8",
         "model.intermediate=14336", "model.layers=8", "train.dtype=bf16", "train.zero_stage=0",
         f"data.seq_len={seq_len}", f"offload.activations={activations}"],
    )  # fmt: skip
    per_gpu = _memory(cfg, 1)["per_gpu"]
    estimate_gib = (per_gpu["parameters"] + per_gpu["gradients"] + per_gpu["activations"]) / 2**30
    assert measured_gib <= estimate_gib <= 1.25 * measured_gib
