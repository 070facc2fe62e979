"""train.grad_accum: an optimizer step over accum micro batches equals one step over their union."""

import json

import pytest

from longloom.config import load_config
from longloom.training.trainer import run_training

TINY = [
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "data.seq_len=32",
    "train.steps=3",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.dtype=fp32",
    "train.zero_stage=1",
    "checkpoint.interval=0",
]


def _train_worker(overrides: list[str]) -> list[float]:
    return run_training(load_config(None, TINY + overrides))["losses"]


def _losses(distributed, workers: int, out, *overrides: str) -> tuple[list[float], list[dict]]:
    results = distributed(
        workers, _train_worker, [f"train.output_dir={out}", f"launch.workers={workers}", *overrides]
    )
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return results[0], logged


def test_accumulation_equals_data_parallel_and_bigger_micro_batches(distributed, tmp_path):
    dp2, dp2_logged = _losses(distributed, 2, tmp_path / "dp2", "parallel.dp=2", "train.micro_batch_size=1")
    accum2, logged = _losses(
        distributed, 1, tmp_path / "accum2", "train.grad_accum=2", "train.micro_batch_size=1"
    )
    micro2, micro2_logged = _losses(distributed, 1, tmp_path / "micro2", "train.micro_batch_size=2")
    assert accum2 == pytest.approx(dp2, rel=1e-4)
    assert accum2 == pytest.approx(micro2, rel=1e-4)
    assert len(set(accum2)) == len(accum2), "the steps trained: losses change"
    # Metrics count the valid labels of the whole optimizer step (both micro batches).
    assert [row["valid_tokens"] for row in logged] == [row["valid_tokens"] for row in dp2_logged]
    assert [row["valid_tokens"] for row in logged] == [row["valid_tokens"] for row in micro2_logged]
