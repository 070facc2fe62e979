"""The NaN/inf guard: a run of non-finite steps stops training before it checkpoints garbage.

A step whose loss or gradient norm is NaN/inf is never checkpointed (training/checkpoint_schedule.py);
`train.max_nonfinite_steps` of them in a row stop the run with NonFiniteTrainingError, a deterministic
failure (the same data and weights fail again), so the launchers do not retry it.
"""

from __future__ import annotations

import math
from pathlib import Path

from longloom.runtime.failures import DeterministicFailure


class NonFiniteTrainingError(DeterministicFailure):
    """The loss or gradient norm was NaN/inf for train.max_nonfinite_steps steps in a row."""


def step_is_finite(loss: float, grad_norm: float | None) -> bool:
    """A finite loss and, when the engine reports one, a finite gradient norm."""
    return math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))


class NonFiniteGuard:
    """Counts consecutive non-finite steps; `check` raises once there are `max_steps` of them."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.steps: list[int] = []  # the current run of consecutive NaN/inf steps

    def observe(self, step: int, finite: bool) -> None:
        self.steps = [] if finite else [*self.steps, step]

    def check(self, newest_checkpoint: Path | None) -> None:
        if len(self.steps) < self.max_steps:
            return
        raise NonFiniteTrainingError(
            f"stopping: the loss or gradient norm was NaN/inf at steps {self.steps} "
            f"({len(self.steps)} in a row, train.max_nonfinite_steps={self.max_steps}); "
            f"no checkpoint was saved from them, the newest is {newest_checkpoint or 'none'}. Lower train.lr "
            "or train.grad_clip, check the data, and resume from that checkpoint"
        )
