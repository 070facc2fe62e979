"""The restart loop shared by the launchers: run the worker group, restart it after a failure.

Fault tolerance here is "restart everything, resume from the newest committed checkpoint" (the
approach of torchelastic and Ray Train): a failed rank leaves its peers inside collectives, so the
whole group is torn down and started again, and the trainer reloads its state by itself on start.
`launch.max_failures` bounds the restarts; the attempt number (0, 1, ...) reaches every worker as
LONGLOOM_ATTEMPT so test knobs like `debug.fail_at_step` can fire on the first attempt only.

Only failures a restart can fix are retried: a dead worker process, a lost node, a RuntimeError (a
broken collective, an injected failure). An error the same inputs raise again on every start (a
ValueError from a config or checkpoint that does not fit, a missing module, an unwritable folder)
ends the run at once with that error, whatever launch.max_failures says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from longloom.runtime.failures import DETERMINISTIC_ERRORS, DeterministicFailure, is_deterministic

logger = logging.getLogger(__name__)

__all__ = [
    "DETERMINISTIC_ERRORS",
    "DeterministicFailure",
    "RunFailed",
    "WorkerFailure",
    "is_deterministic",
    "run_with_restarts",
]

Result = TypeVar("Result")


class WorkerFailure(Exception):
    """One attempt of the worker group failed: which rank (None when unknown), why (a traceback) and
    whether a restart can fix it (False for a deterministic error)."""

    def __init__(self, rank: int | None, detail: str, retryable: bool = True):
        self.rank = rank
        self.detail = detail
        self.retryable = retryable
        where = f"rank {rank}" if rank is not None else "a worker"
        super().__init__(f"{where} failed:\n{detail.rstrip()}")


class RunFailed(RuntimeError):
    """The run failed for good: every allowed attempt ended in a worker failure."""

    def __init__(self, failures: list[WorkerFailure], max_failures: int):
        self.failures = failures
        self.max_failures = max_failures
        super().__init__(failures, max_failures)

    def __str__(self) -> str:
        last = self.failures[-1]
        where = f"rank {last.rank}" if last.rank is not None else "a worker"
        lines = [line for line in last.detail.splitlines() if line.strip()]
        error = lines[-1].strip() if lines else "no detail"
        if not last.retryable:
            return (
                f"training failed on {where}: {error}\n"
                f"not retried (launch.max_failures={self.max_failures}): this error comes back on every "
                "start with the same config and files; fix its cause and run the command again"
            )
        return (
            f"training failed after {len(self.failures)} attempt(s) "
            f"(launch.max_failures={self.max_failures}); last error on {where}: {error}"
        )


def run_with_restarts(run_attempt: Callable[[int], Result], max_failures: int) -> Result:
    """Calls `run_attempt(attempt)` until it returns, restarting at most `max_failures` times.

    `run_attempt` raises WorkerFailure after it has stopped every worker of the failed attempt.
    Anything else (KeyboardInterrupt, a configuration error) is not retried: restarting cannot fix it.
    """
    failures: list[WorkerFailure] = []
    for attempt in range(max_failures + 1):
        try:
            return run_attempt(attempt)
        except WorkerFailure as failure:
            failures.append(failure)
            logger.error("attempt %d: %s", attempt, failure)
            if not failure.retryable:
                break
            if attempt < max_failures:
                logger.warning(
                    "restarting the worker group (restart %d of launch.max_failures=%d); "
                    "training resumes from the newest committed checkpoint",
                    attempt + 1,
                    max_failures,
                )
    raise RunFailed(failures, max_failures)
