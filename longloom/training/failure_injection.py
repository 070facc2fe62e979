"""`debug.fail_at_step`: the last rank raises at that step on the first attempt only, to try restarts."""

from __future__ import annotations


class FailureInjection:
    """Raises a RuntimeError (retryable: launch/supervisor.py restarts) before the configured step."""

    def __init__(self, fail_at_step: int | None, rank: int, world_size: int, attempt: int):
        # Only one rank fails, and only on the first attempt: the restarted group must get past it.
        self.step = fail_at_step if attempt == 0 and rank == world_size - 1 else None
        self.rank = rank

    def before_step(self, step: int) -> None:
        if step == self.step:
            raise RuntimeError(
                f"debug.fail_at_step={step}: injected failure on rank {self.rank} (first attempt only)"
            )
