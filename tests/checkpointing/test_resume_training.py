"""End to end: a run resumed from a checkpoint continues with the losses of an uninterrupted run,
also when the resumed run uses another data-parallel split, ZeRO stage or sequence-parallel split."""

from __future__ import annotations

import shutil

import pytest

from longloom.config import load_config
from longloom.training.trainer import run_training

TINY = [
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "data.seq_len=64",
    "train.steps=6",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.dtype=fp32",
    "checkpoint.interval=3",
]


def _train_worker(overrides: list[str]) -> list[float]:
    return run_training(load_config(None, TINY + overrides))["losses"]


def _run(distributed, workers: int, out, *overrides: str) -> list[float]:
    results = distributed(
        workers, _train_worker, [f"train.output_dir={out}", f"launch.workers={workers}", *overrides]
    )
    return results[0]


@pytest.mark.parametrize(
    "first,second",
    [
        # The brief's case: dp=2 x micro 1 -> dp=1 x micro 2 (same global batch), ZeRO-1 -> ZeRO-2.
        (
            (2, "parallel.dp=2", "train.micro_batch_size=1", "train.zero_stage=1"),
            (1, "parallel.dp=1", "train.micro_batch_size=2", "train.zero_stage=2"),
        ),
        # Sequence parallel on resume: dp=1 x ulysses 2 (ZeRO-3) -> dp=1 x 1 worker (ZeRO-0).
        (
            (2, "parallel.dp=1", "parallel.ulysses=2", "train.micro_batch_size=1", "train.zero_stage=3"),
            (1, "parallel.dp=1", "train.micro_batch_size=1", "train.zero_stage=0"),
        ),
    ],
)
def test_resumed_losses_equal_uninterrupted_run(distributed, tmp_path, first, second):
    uninterrupted = _run(distributed, first[0], tmp_path / "a", *first[1:])
    assert len(uninterrupted) == 6
    # Resume from the step-3 checkpoint of that run, as if it had been killed after step 4.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-3", tmp_path / "b" / "checkpoints" / "step-3")
    resumed = _run(distributed, second[0], tmp_path / "b", *second[1:])
    assert len(resumed) == 3
    assert resumed == pytest.approx(uninterrupted[3:], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-3", "step-6"]
