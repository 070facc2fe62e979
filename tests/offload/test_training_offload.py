"""End to end through the trainer: offloading activations or optimizer states does not change the losses.

workers=2, ulysses=2, fp32. Each worker also reports what actually ran (bytes the activation offloader
sent to the host, the optimizer class under DeepSpeed and its GPU share) so a silently ignored setting
fails the test instead of passing it with the baseline's numbers.
"""

from __future__ import annotations

import shutil

import deepspeed
import pytest

from longloom.config import load_config
from longloom.offload.activations import ActivationOffloader
from longloom.training import engine, trainer
from longloom.training.plan import build_run_plan

TINY = [
    "model.hidden=32",
    "model.layers=3",
    "model.heads=4",
    "model.kv_heads=2",
    "data.seq_len=64",
    "train.steps=3",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.weight_decay=0.01",
    "train.dtype=fp32",
    "train.zero_stage=1",
    "checkpoint.interval=0",
    "launch.workers=2",
    "parallel.ulysses=2",
]


def _train_worker(overrides: list[str]) -> dict:
    seen: dict = {"swapped_bytes": 0, "device_kept_bytes": 0, "pool_buffers": 0}
    offloaders: list[ActivationOffloader] = []

    class ObservedOffloader(ActivationOffloader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            offloaders.append(self)

    real_initialize = deepspeed.initialize

    def observed_initialize(*args, **kwargs):
        engine, *rest = real_initialize(*args, **kwargs)
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        seen["optimizer"] = type(base).__name__
        seen["gpu_share"] = getattr(base, "gpu_share", None)
        return (engine, *rest)

    engine.ActivationOffloader, deepspeed.initialize = ObservedOffloader, observed_initialize
    cfg = load_config(None, TINY + overrides)
    memory = build_run_plan(cfg, 2).memory
    seen["estimated_host_bytes"] = memory["host_pinned_per_worker"]["activations"]
    seen["estimated_device_bytes"] = memory["activation_detail"]["attention_outputs_on_device"]
    try:
        seen["losses"] = trainer.run_training(cfg)["losses"]
    finally:
        engine.ActivationOffloader, deepspeed.initialize = ActivationOffloader, real_initialize
    for offloader in offloaders:
        seen["swapped_bytes"] += offloader.swapped_bytes
        seen["device_kept_bytes"] += offloader.device_kept_bytes
        seen["pool_buffers"] += offloader.pool.num_buffers
    return seen


def _run(distributed, tmp_path, name: str, *overrides: str) -> dict:
    results = distributed(2, _train_worker, [f"train.output_dir={tmp_path / name}", *overrides])
    assert results[0]["losses"] == results[1]["losses"], "every rank reports the same global loss"
    return results[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from tests.conftest import run_distributed

    return _run(run_distributed, tmp_path_factory.mktemp("baseline"), "none")


@pytest.mark.parametrize(
    "activations,split",
    [
        ("true", ["train.zero_stage=1"]),
        ("0.5", ["train.zero_stage=1", "offload.device_activations=0.25"]),
        ("true", ["train.zero_stage=3"]),
        ("0.5", ["parallel.ulysses=1", "parallel.ring=2"]),
    ],
    ids=["true-zero1", "half-zero1-quarter-device", "true-zero3", "half-ring"],
)
def test_activation_offload_keeps_losses(distributed, tmp_path, baseline, activations, split):
    run = _run(distributed, tmp_path, "act", f"offload.activations={activations}", *split)
    # 3 layers; the last keeps its input on the device. Each of the other two swaps its input
    # [1, 32 tokens per rank, 32] and the swapped tokens' attention out and lse where the attention runs:
    # after Ulysses' all-to-all [1, swapped of 64, 2 heads, 8] and [1, 2, swapped], or round the ring
    # [1, swapped of 32, 4 heads, 8] and [1, 4, swapped]; fp32. offload.device_activations=0.25 keeps
    # another quarter of the tokens on the device, in every layer, and the last layer all it keeps.
    ring = "parallel.ring=2" in split
    tokens, heads = (32, 4) if ring else (64, 2)
    swapped = tokens if activations == "true" else tokens // 2
    on_device = tokens // 4 if "offload.device_activations=0.25" in split else 0
    per_token = (heads * 8 + heads) * 4
    assert run["swapped_bytes"] == 2 * (32 * 32 * 4 + swapped * per_token)
    assert run["swapped_bytes"] == run["estimated_host_bytes"], "`longloom check` plans what is swapped"
    last_layer = swapped + on_device if on_device else 0
    assert run["device_kept_bytes"] == (2 * on_device + last_layer) * per_token
    assert run["device_kept_bytes"] == run["estimated_device_bytes"], "and what stays on the GPU"
    assert run["pool_buffers"] == 2 * 3, "input, out and lse per swapped layer, reused over the steps"
    assert run["losses"] == pytest.approx(baseline["losses"], rel=1e-4)


@pytest.mark.parametrize(
    "overrides,optimizer",
    [
        (["offload.optimizer=cpu"], "DeepSpeedCPUAdam"),
        (["offload.optimizer=interleaved", "offload.gpu_share=0.5"], "InterleavedAdamW"),
        (["offload.optimizer=interleaved"], "InterleavedAdamW"),
    ],
    ids=["cpu", "interleaved-half", "interleaved-auto"],
)
def test_optimizer_offload_keeps_losses(distributed, tmp_path, baseline, overrides, optimizer):
    run = _run(distributed, tmp_path, "opt", *overrides)
    assert run["optimizer"] == optimizer
    if "offload.gpu_share=0.5" in overrides:
        assert 0.2 < run["gpu_share"] < 0.8, "both the device and the host update a real share"
    assert run["losses"] == pytest.approx(baseline["losses"], rel=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [["offload.optimizer=cpu"], ["offload.optimizer=interleaved", "offload.gpu_share=0.5"]],
    ids=["cpu", "interleaved"],
)
def test_offloaded_optimizer_state_resumes(distributed, tmp_path, overrides):
    """Moments in host memory are saved and restored: a resumed run continues with the same losses."""
    checkpointed = [*overrides, "train.steps=4", "checkpoint.interval=2"]
    uninterrupted = _run(distributed, tmp_path, "a", *checkpointed)["losses"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", tmp_path / "b" / "checkpoints" / "step-2")
    resumed = _run(distributed, tmp_path, "b", *checkpointed)["losses"]
    assert resumed == pytest.approx(uninterrupted[2:], rel=1e-4)
