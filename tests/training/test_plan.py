"""The run plan: every decision that follows from the config and world size, made once and handed down."""

from __future__ import annotations

import math
import types

import pytest
import torch

from longloom.config import ConfigError, load_config
from longloom.offload.memory import estimate_memory, interleaved_share_memory_cap
from longloom.runtime.cpu_threads import usable_cores
from longloom.training.engine import build_model
from longloom.training.plan import PLANNED_SHARE_WITHOUT_GPU, build_run_plan

MODEL = ["model.hidden=64", "model.heads=8", "model.kv_heads=2", "model.layers=2", "data.seq_len=512"]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_split_layout_dtype_and_tiles(no_gpu):
    cfg = load_config(None, [*MODEL, "launch.workers=8", "parallel.ulysses=2", "parallel.ring=2"])
    plan = build_run_plan(cfg, 8)
    assert plan.split == (2, 2, 2) and plan.sp == 4 and plan.layout == "zigzag"
    assert plan.device_type == "cpu" and plan.dtype == torch.float32 and plan.dtype_bytes == 4
    assert plan.local_tokens == 512 // 4 and plan.mlp_tiles == 1 and plan.gpu_share is None
    assert plan.memory["split"] == {"dp": 2, "ulysses": 2, "ring": 2} and plan.memory["dtype_bytes"] == 4

    plain = build_run_plan(load_config(None, [*MODEL, "launch.workers=2", "parallel.ulysses=2"]), 2)
    assert plain.split == (1, 2, 1) and plain.layout == "contiguous"
    bf16 = load_config(None, [*MODEL, "train.dtype=bf16", "train.micro_batch_size=3", "model.mlp_tiles=auto"])
    plan = build_run_plan(bf16, 1, torch.device("cpu"))
    assert plan.dtype == torch.bfloat16 and plan.memory["dtype_bytes"] == 2
    assert plan.local_tokens == 3 * 512 and plan.mlp_tiles == math.ceil(3 * 512 / 64)
    with pytest.raises(ConfigError, match="data.seq_len=502 must be divisible by 2 \\* parallel.ring"):
        build_run_plan(load_config(None, [*MODEL, "data.seq_len=502", "parallel.ring=2"]), 4)


def test_the_memory_estimate_uses_the_plans_tiles(no_gpu):
    untiled = build_run_plan(load_config(None, MODEL), 1)
    tiled = build_run_plan(load_config(None, [*MODEL, "model.mlp_tiles=auto"]), 1)
    assert tiled.mlp_tiles == 512 // 64
    assert (
        tiled.memory["activation_detail"]["layer_working"]
        < untiled.memory["activation_detail"]["layer_working"]
    )
    assert tiled.memory == estimate_memory(tiled.config, tiled)


def _fake_gpu(monkeypatch, total_memory: float) -> None:
    gpu = types.SimpleNamespace(total_memory=int(total_memory), name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)


def test_auto_tiles_leave_the_mlp_whole_where_the_estimate_fits_the_gpu(monkeypatch, no_gpu):
    sized = [*MODEL, "train.micro_batch_size=3", "train.dtype=fp32"]  # fp32 with or without the GPU
    auto = [*sized, "model.mlp_tiles=auto"]
    alst_tiles = math.ceil(3 * 512 / 64)
    untiled_total = build_run_plan(load_config(None, sized), 1).memory["per_gpu"]["total"]
    # Room for the untiled plan within the usable 90%: one tile, and the estimate is the untiled one.
    _fake_gpu(monkeypatch, untiled_total / 0.9 + 1)
    roomy = build_run_plan(load_config(None, auto), 1)
    assert roomy.mlp_tiles == 1 and roomy.mlp_tiles_source.startswith("untiled")
    assert roomy.memory["per_gpu"]["total"] == untiled_total
    # Just short of it: tiled as ALST, and the plan line says why.
    _fake_gpu(monkeypatch, untiled_total / 0.9 - 1)
    tight = build_run_plan(load_config(None, auto), 1)
    assert tight.mlp_tiles == alst_tiles and "untiled would need" in tight.mlp_tiles_source
    assert (
        f"MLP tiles {alst_tiles} (model.mlp_tiles=auto: ceil(1536 tokens / hidden 64) as ALST"
        in tight.describe()
    )
    # GPU memory an auto interleaved share would fill with moments: tiled as ALST (untiled unmeasured there).
    _fake_gpu(monkeypatch, untiled_total * 100)
    interleaved = build_run_plan(load_config(None, [*auto, "offload.optimizer=interleaved"]), 1)
    assert interleaved.mlp_tiles == alst_tiles and "interleaved" in interleaved.mlp_tiles_source
    # A count that is set is kept whatever the GPU.
    assert build_run_plan(load_config(None, [*MODEL, "model.mlp_tiles=3"]), 1).mlp_tiles == 3


def test_optimizer_gpu_share(monkeypatch, no_gpu):
    interleaved = [*MODEL, "offload.optimizer=interleaved"]
    assert build_run_plan(load_config(None, [*interleaved, "offload.gpu_share=0.3"]), 1).gpu_share == 0.3
    planned = build_run_plan(load_config(None, interleaved), 1)
    assert planned.gpu_share == PLANNED_SHARE_WITHOUT_GPU and planned.memory["gpu_share"] == planned.gpu_share
    # On the driver with a GPU: the most its memory allows (what the workers' measurement is capped by).
    gpu = types.SimpleNamespace(total_memory=planned.memory["per_gpu"]["total"] * 2, name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    cfg = load_config(None, [*interleaved, "train.dtype=fp32"])
    plan = build_run_plan(cfg, 1)
    assert plan.device_type == "cuda" and plan.gpu_share == interleaved_share_memory_cap(
        cfg, plan, gpu.total_memory
    )
    assert 0.0 < plan.gpu_share <= 1.0 and "planned" in plan.gpu_share_source


def test_the_model_receives_the_plans_tiles(no_gpu):
    cfg = load_config(None, [*MODEL, "model.mlp_tiles=auto"])
    plan = build_run_plan(cfg, 1)
    model, offloader = build_model(cfg, None, torch.device("cpu"), plan.dtype, {}, mlp_tiles=plan.mlp_tiles)
    assert offloader is None and {layer.mlp.tiles for layer in model.layers} == {plan.mlp_tiles}


def test_describe_is_what_check_prints(no_gpu):
    plan = build_run_plan(load_config(None, [*MODEL, "launch.workers=2", "parallel.ulysses=2"]), 2)
    text = plan.describe()
    assert "# split: 2 workers = dp 1 x ulysses 2 x ring 1 (contiguous layout)" in text
    assert (
        "# plan: cpu float32, 256 tokens per rank, MLP tiles 1 (model.mlp_tiles=1: as set), optimizer GPU share -"
        in text
    )
    assert "# memory estimate:" in text
    # The CPU threads a worker on a host like this one takes: its share of this host's cores.
    threads = max(1, usable_cores() // 2)
    assert (
        f"CPU threads per worker {threads} (launch.cpu_threads=auto: {usable_cores()} cores here / 2 workers"
        in text
    )
    fixed = build_run_plan(load_config(None, [*MODEL, "launch.workers=2", "launch.cpu_threads=5"]), 2)
    assert "CPU threads per worker 5 (launch.cpu_threads=5: as set)" in fixed.describe()


def test_device_layers_spend_gpu_memory_where_the_host_runs_out(monkeypatch, no_gpu):
    # 6 layers, fp32, every layer input but the last's to the host: on a CUDA plan each swapped tensor is
    # a whole 1 MiB block (pool_block_bytes), input, attention out and lse alike.
    sized = [*MODEL, "model.layers=6", "train.dtype=fp32", "offload.activations=true"]
    mib = 1 << 20
    _fake_gpu(monkeypatch, 1 << 40)
    free = build_run_plan(load_config(None, sized), 1)
    assert free.device_layers == 0 and free.memory["host_pinned_per_host"] == 5 * 3 * mib
    # A host that pins 2 layer inputs less: the first 2 layers keep theirs on the GPU, the fewest that fit.
    limit = [f"offload.host_memory_limit_gb={(15 - 2) * mib / 2**30}"]
    tight = build_run_plan(load_config(None, [*sized, *limit]), 1)
    assert tight.device_layers == 2 and tight.memory["host_pinned_per_host"] == 13 * mib
    inputs = tight.memory["activation_detail"]["checkpointed_inputs"]
    assert inputs - free.memory["activation_detail"]["checkpointed_inputs"] == 2 * 512 * 64 * 4  # 2 inputs
    assert "# layer inputs kept in GPU memory: 2 (the host may pin 13.00 MiB" in tight.describe()
    # The model's offloader gets them.
    _, offloader = build_model(tight.config, None, torch.device("cpu"), tight.dtype, {}, device_layers=2)
    assert offloader.device_layers == 2
    # A GPU without room for them: none, and the host check refuses as before.
    _fake_gpu(monkeypatch, free.memory["per_gpu"]["total"] / 0.9 + 1)
    assert build_run_plan(load_config(None, [*sized, *limit]), 1).device_layers == 0
    # The interleaved optimizer at gpu_share auto keeps that GPU memory for its moments.
    _fake_gpu(monkeypatch, 1 << 40)
    interleaved = build_run_plan(load_config(None, [*sized, *limit, "offload.optimizer=interleaved"]), 1)
    assert interleaved.device_layers == 0
