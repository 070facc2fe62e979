"""Checkpoint bookkeeping of the loop: when a save is due, never from a non-finite step, the newest one.

Saves go through the lazy asynchronous checkpointer (checkpointing/lazy_async.py): the snapshot is
taken right after the step and only the next optimizer step waits for it. `close` commits what is in
flight (also after a NaN stop: that checkpoint was saved from a finite state); `abort` drops it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer
from longloom.config import CheckpointConfig

logger = logging.getLogger("longloom")


class CheckpointSchedule:
    """checkpoint.interval / keep / async for a run of `steps` steps under `root`."""

    def __init__(self, config: CheckpointConfig, root: Path, steps: int, newest: Path | None, rank: int):
        self.interval, self.steps, self.root, self.rank = config.interval, steps, root, rank
        self.checkpointer = LazyAsyncCheckpointer(root=root, keep=config.keep, asynchronous=config.async_)
        self.newest = newest  # the newest checkpoint saved from (or resumed from) a finite state

    def due(self, step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == self.steps)

    def wait_for_snapshot(self) -> None:
        """Before the optimizer step changes the weights the last save still copies."""
        self.checkpointer.wait_for_snapshot()

    def after_step(self, step: int, finite: bool, engine, state: Callable[[], dict[str, Any]]) -> None:
        """Saves when due, with `state()` (the trainer's state) beside the engine's; never a NaN/inf step."""
        if not self.due(step):
            return
        if not finite:
            if self.rank == 0:
                logger.warning("step %d: loss or gradient norm is NaN/inf: not saving a checkpoint", step)
            return
        self.checkpointer.save(step=step, engine=engine, extra=state())
        self.newest = self.root / f"step-{step}"

    def load(self, path: Path, engine) -> dict[str, Any]:
        """The engine's state from `path`; returns the trainer's state saved with it."""
        return self.checkpointer.load(path, engine)

    def close(self, abort: bool = False) -> None:
        self.checkpointer.close(abort=abort)
