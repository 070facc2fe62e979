"""Which failures a restart cannot fix: the trainer raises them, the launchers' restart loop reads them.

Below training/ and launch/ so that both use one definition (launch/supervisor.py restarts the worker
group only for failures that are not deterministic).
"""

from __future__ import annotations


class DeterministicFailure(RuntimeError):
    """A run failure that a restart from the newest checkpoint would meet again (e.g. a loss that turns
    non-finite at the same step with the same data): raised by the trainer, never retried."""


# Errors that come back on every start with the same config and files (ConfigError and the
# checkpoint errors are ValueErrors): retrying them only delays the message.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    DeterministicFailure,
    ValueError,
    TypeError,
    ImportError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_deterministic(error: BaseException) -> bool:
    """True for an error a restart cannot fix (see DETERMINISTIC_ERRORS)."""
    return isinstance(error, DETERMINISTIC_ERRORS)
