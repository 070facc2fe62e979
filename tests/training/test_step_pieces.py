"""The pieces around a training step: NaN/inf guard, failure injection, checkpoint schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from longloom.config import CheckpointConfig
from longloom.runtime.failures import is_deterministic
from longloom.training.checkpoint_schedule import CheckpointSchedule
from longloom.training.failure_injection import FailureInjection
from longloom.training.nonfinite import NonFiniteGuard, NonFiniteTrainingError, step_is_finite


def test_finite_steps():
    assert step_is_finite(1.0, 2.0) and step_is_finite(1.0, None)
    assert not step_is_finite(math.nan, 2.0) and not step_is_finite(1.0, math.inf)


def test_guard_stops_after_max_steps_in_a_row_only():
    guard = NonFiniteGuard(max_steps=2)
    for step, finite in [(1, False), (2, True), (3, False)]:
        guard.observe(step, finite)
        guard.check(None)  # never two in a row yet
    guard.observe(4, False)
    with pytest.raises(
        NonFiniteTrainingError, match=r"steps \[3, 4\].*max_nonfinite_steps=2.*newest is ckpt"
    ) as error:
        guard.check(Path("ckpt"))
    assert is_deterministic(error.value)  # the launchers do not retry it


def test_failure_injection_fires_on_the_last_rank_of_the_first_attempt_only():
    with pytest.raises(RuntimeError, match="debug.fail_at_step=3: injected failure on rank 3"):
        FailureInjection(3, rank=3, world_size=4, attempt=0).before_step(3)
    FailureInjection(3, rank=3, world_size=4, attempt=0).before_step(2)
    FailureInjection(3, rank=2, world_size=4, attempt=0).before_step(3)
    FailureInjection(3, rank=3, world_size=4, attempt=1).before_step(3)
    FailureInjection(None, rank=0, world_size=1, attempt=0).before_step(1)


class _RecordingCheckpointer:
    def __init__(self):
        self.saved: list[int] = []

    def save(self, step, engine, extra):
        assert extra == {"step": step}
        self.saved.append(step)


def test_checkpoint_schedule_saves_when_due_and_never_a_nonfinite_step(tmp_path):
    schedule = CheckpointSchedule(CheckpointConfig(interval=2), tmp_path, steps=5, newest=None, rank=0)
    schedule.checkpointer = _RecordingCheckpointer()
    assert [step for step in range(1, 6) if schedule.due(step)] == [2, 4, 5]
    for step, finite in [(1, True), (2, True), (3, True), (4, False), (5, True)]:
        schedule.after_step(step, finite, engine=None, state=lambda step=step: {"step": step})
    assert schedule.checkpointer.saved == [2, 5] and schedule.newest == tmp_path / "step-5"
    never = CheckpointSchedule(CheckpointConfig(interval=0), tmp_path, steps=5, newest=Path("old"), rank=0)
    assert not any(never.due(step) for step in range(1, 6)) and never.newest == Path("old")


def test_native_model_is_made_on_the_gpu_only_when_its_fp32_weights_fit_half_of_it():
    import torch

    from longloom.training.engine import native_build_device

    gpu = torch.device("cuda", 1)
    assert native_build_device(8_000_000_000, gpu, 141 * 2**30) == gpu  # 8B: 32 GB of 141 GB
    assert native_build_device(70_000_000_000, gpu, 141 * 2**30) == torch.device("cpu")  # 280 GB
    assert native_build_device(10, torch.device("cpu"), None) == torch.device("cpu")
    assert native_build_device(10, gpu, None) == torch.device("cpu")  # memory unknown: as before
