"""Training survives damaged checkpoints and NaNs without losing or hiding anything.

- resume skips a checkpoint whose tensor bytes changed, says so, and continues from the previous one
  with the losses of an uninterrupted run; metrics are not logged twice;
- a NaN/inf loss stops the run after train.max_nonfinite_steps steps, checkpoints nothing from it;
- a resume with nothing to do, or for another model shape, changes nothing under output_dir.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from longloom.config import ConfigError, load_config
from longloom.training.resume import check_resume_compatible
from longloom.training.trainer import NonFiniteTrainingError, run_training
from tests.checkpointing.test_checksums import corrupt_a_tensor

TINY = [
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "data.seq_len=32",
    "train.steps=6",
    "train.lr=1e-2",
    "train.warmup_steps=1",
    "train.dtype=fp32",
    "checkpoint.interval=2",
    "checkpoint.keep=3",
]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train_worker(overrides: list[str], poison_from_step: int | None = None) -> dict:
    """run_training; with poison_from_step, the loss is NaN from that step on. Returns summary and log."""
    from unittest import mock

    from longloom.models.llama import LlamaModel

    records = _Records()
    forward, calls = LlamaModel.forward, [0]

    def poisoned(self, tokens, position_ids, labels=None, loss_group=None, document_ids=None):
        loss, stats = forward(
            self, tokens, position_ids, labels=labels, loss_group=loss_group, document_ids=document_ids
        )
        calls[0] += 1
        if poison_from_step is not None and calls[0] >= poison_from_step:
            loss, stats = loss * float("nan"), stats._replace(loss=stats.loss * float("nan"))
        return loss, stats

    cfg = load_config(None, TINY + overrides)
    with mock.patch.object(LlamaModel, "forward", poisoned):
        # On the package logger: run_training's logging.basicConfig(force=True) resets the root's handlers.
        logging.getLogger("longloom").addHandler(records)
        try:
            summary = run_training(cfg)
            summary["error"] = None
        except (NonFiniteTrainingError, ConfigError) as error:
            summary = {"error": f"{type(error).__name__}: {error}"}
        finally:
            logging.getLogger("longloom").removeHandler(records)
    summary["log"] = records.lines
    return summary


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[float]]:
    from tests.conftest import run_distributed

    out = tmp_path_factory.mktemp("runs") / "a"
    summary = run_distributed(1, _train_worker, [f"train.output_dir={out}"])[0]
    assert summary["error"] is None and len(summary["losses"]) == 6
    # Time to first step: each build phase is logged as it ends, with its duration.
    phases = [r"model: native, .*M parameters, layers S+, built in \d+\.\d s", r"DeepSpeed engine .* ready in",
              r"data \(synthetic:passkey\) ready in", r"first step \(1\) in \d+\.\d s"]  # fmt: skip
    lines = iter(summary["log"])
    assert all(any(re.search(phase, line) for line in lines) for phase in phases), summary["log"]
    return out, summary["losses"]


def test_resume_skips_a_corrupt_checkpoint_and_continues_like_an_uninterrupted_run(
    distributed, tmp_path, uninterrupted
):
    source, expected = uninterrupted
    out = tmp_path / "b"
    # As if that run had been killed after logging step 5: checkpoints 2 and 4, metrics up to 5.
    (out / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(source / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    lines = (source / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:5]))
    shutil.copytree(source / "tb", out / "tb")
    file, key = corrupt_a_tensor(out / "checkpoints" / "step-4")

    summary = distributed(1, _train_worker, [f"train.output_dir={out}"])[0]
    assert summary["error"] is None and summary["start_step"] == 2
    warning = next(line for line in summary["log"] if "not resuming from" in line)
    assert "step-4" in warning and key in warning and file in warning
    assert any("resuming from" in line and "step-2" in line for line in summary["log"])
    assert summary["losses"] == pytest.approx(expected[2:], rel=1e-6)
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    # The damaged step-4 was rewritten by the resumed run; every checkpoint left verifies.
    from longloom.conversion.convert import inspect_checkpoint

    assert inspect_checkpoint(out / "checkpoints")["ok"]


def test_nonfinite_loss_stops_the_run_and_is_never_checkpointed(distributed, tmp_path):
    out = tmp_path / "nan"
    overrides = [f"train.output_dir={out}", "train.steps=10", "train.max_nonfinite_steps=3"]
    summary = distributed(1, _train_worker, overrides, 3)[0]
    assert summary["error"].startswith("NonFiniteTrainingError")
    assert "steps [3, 4, 5]" in summary["error"] and "train.max_nonfinite_steps=3" in summary["error"]
    assert "step-2" in summary["error"]
    # Step 4 was due for a checkpoint but its state was not finite: only step 2 exists, and verifies.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    from longloom.conversion.convert import inspect_checkpoint

    assert inspect_checkpoint(out / "checkpoints" / "step-2")["ok"]
    assert _logged_steps(out) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        load_config(None, ["train.max_nonfinite_steps=0"])


def test_resume_with_nothing_to_do_or_another_model_changes_nothing(distributed, tmp_path, uninterrupted):
    source, _ = uninterrupted
    out = tmp_path / "done"
    shutil.copytree(source, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    summary = distributed(1, _train_worker, [f"train.output_dir={out}"])[0]
    assert summary["error"] is None and summary["losses"] == [] and summary["start_step"] == 6
    assert any("nothing to train" in line and "train.steps" in line for line in summary["log"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # Another model shape: found from metadata before workers start, naming keys and the fix ...
    other = load_config(None, [*TINY, f"train.output_dir={out}", "train.steps=8", "model.hidden=48"])
    with pytest.raises(ConfigError) as error:
        check_resume_compatible(other)
    message = str(error.value)
    assert "step-6" in message and "model.hidden=32 in the checkpoint, 48 now" in message
    assert "train.output_dir" in message and "checkpoint.resume=false" in message
    check_resume_compatible(load_config(None, [*TINY, f"train.output_dir={out}", "train.steps=8"]))
    # `longloom check` (and so `train`) runs it in preflight: one message, exit 2, before any worker.
    from longloom.cli import main as cli_main

    tiny_yaml = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    overrides = [*TINY, f"train.output_dir={out}", "train.steps=8", "model.hidden=48"]
    assert cli_main(["check", tiny_yaml, "launch.workers=1", "parallel.ulysses=1", *overrides]) == 2
    check_resume_compatible(
        other.model_copy(update={"checkpoint": other.checkpoint.model_copy(update={"resume": False})})
    )

    # ... and, should a worker get there anyway, its refusal leaves config.yaml and the rest untouched.
    summary = distributed(1, _train_worker, [f"train.output_dir={out}", "train.steps=8", "model.hidden=48"])[
        0
    ]
    assert "does not match the model" in summary["error"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_nonfinite_stop_is_not_retried_by_the_launchers():
    """A restart resumes from the last finite checkpoint and meets the same data: launch.max_failures
    must not spend its restarts on it."""
    from longloom.launch.supervisor import is_deterministic

    assert is_deterministic(NonFiniteTrainingError("loss nan at steps 4-6"))
    assert not is_deterministic(RuntimeError("a worker died"))
