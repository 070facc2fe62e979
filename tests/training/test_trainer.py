"""End-to-end training on CPU: the loss falls, and per-step losses do not depend on the split."""

import json

import pytest

from longloom.config import load_config
from longloom.training.trainer import run_training

TINY = [
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "data.seq_len=64",
    "train.steps=4",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.dtype=fp32",
    "train.zero_stage=1",
    "checkpoint.interval=0",
]


def _train_worker(overrides: list[str]) -> list[float]:
    cfg = load_config(None, TINY + overrides)
    return run_training(cfg)["losses"]


def _losses(distributed, workers: int, tmp_path, name: str, *overrides: str) -> list[float]:
    out = tmp_path / name
    results = distributed(
        workers, _train_worker, [f"train.output_dir={out}", f"launch.workers={workers}", *overrides]
    )
    assert all(r == results[0] for r in results), "every rank reports the same global loss"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in logged] == pytest.approx(results[0], rel=1e-12)
    assert {"step", "loss", "tokens_per_s"} <= set(logged[0])
    return results[0]


def test_two_worker_run_learns_and_writes_outputs(distributed, tmp_path):
    losses = _losses(
        distributed, 2, tmp_path, "learn", "parallel.ulysses=2", "train.steps=12", "train.lr=3e-3"
    )
    assert losses[-1] < losses[0] - 0.5
    assert (tmp_path / "learn" / "config.yaml").is_file()
    assert any((tmp_path / "learn" / "tb").iterdir())


def test_data_parallel_split_does_not_change_losses(distributed, tmp_path):
    single = _losses(distributed, 1, tmp_path, "dp1", "train.micro_batch_size=2")
    split = _losses(distributed, 2, tmp_path, "dp2", "train.micro_batch_size=1", "parallel.dp=2")
    assert split == pytest.approx(single, rel=1e-4)


@pytest.mark.parametrize(
    "workers,pattern,overrides",
    [
        (2, "S", ["parallel.ulysses=2"]),
        (4, "S", ["parallel.ulysses=4", "model.kv_heads=4"]),
        (2, "S", ["parallel.ring=2"]),
        (4, "S", ["parallel.ulysses=2", "parallel.ring=2"]),
        (2, "L", ["parallel.ulysses=2"]),
        (2, "LLS", ["parallel.ulysses=2"]),
    ],
)
def test_sequence_parallel_split_does_not_change_losses(distributed, tmp_path, workers, pattern, overrides):
    common = [f"model.layer_pattern={pattern}", f"model.layers={len(pattern)}", "train.micro_batch_size=2"]
    single = _losses(
        distributed, 1, tmp_path, "single", *common, *[o for o in overrides if o.startswith("model.")]
    )
    split = _losses(distributed, workers, tmp_path, "split", *common, *overrides)
    assert split == pytest.approx(single, rel=1e-4)


def _unfused_train_worker(overrides: list[str]) -> list[float]:
    """The trainer with the loss path it had before the fused head: logits, then the logits loss."""
    from unittest import mock

    from longloom.models.llama import LlamaModel
    from longloom.parallel.loss import sequence_parallel_cross_entropy

    logits_forward = LlamaModel.forward

    def forward(self, tokens, position_ids, labels=None, loss_group=None, document_ids=None):
        logits = logits_forward(self, tokens, position_ids, document_ids=document_ids)
        return sequence_parallel_cross_entropy(logits, labels, group=loss_group)

    with mock.patch.object(LlamaModel, "forward", forward):
        return _train_worker(overrides)


def test_tiled_mlp_and_fused_loss_keep_losses(distributed, tmp_path):
    """fp32: the tiled MLP and the fused head change rounding order only (rtol 1e-6 over 4 steps)."""
    common = ["parallel.ulysses=2", "train.micro_batch_size=2", "model.layer_pattern=LS"]
    tiled = _losses(distributed, 2, tmp_path, "tiled", *common, "model.mlp_tiles=3")
    untiled = _losses(distributed, 2, tmp_path, "untiled", *common, "model.mlp_tiles=1")
    out = tmp_path / "unfused"
    unfused = distributed(
        2,
        _unfused_train_worker,
        [f"train.output_dir={out}", "launch.workers=2", *common, "model.mlp_tiles=1"],
    )[0]
    assert tiled == pytest.approx(untiled, rel=1e-6, abs=0)
    assert untiled == pytest.approx(unfused, rel=1e-6, abs=0)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_tiled_mlp_under_zero_keeps_losses(distributed, tmp_path, zero_stage):
    """ZeRO-2 reduces, ZeRO-3 also gathers, per module call: the tiles' repeated calls must not break either."""
    common = ["parallel.dp=2", "train.micro_batch_size=1", f"train.zero_stage={zero_stage}"]
    tiled = _losses(distributed, 2, tmp_path, "tiled", *common, "model.mlp_tiles=3")
    untiled = _losses(distributed, 2, tmp_path, "untiled", *common, "model.mlp_tiles=1")
    assert tiled == pytest.approx(untiled, rel=1e-6, abs=0)
