"""Who this process is in a run, from the environment its launcher set (torchrun's variables, ours).

RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them; LONGLOOM_ATTEMPT
(which start of the worker group) for the launchers other than torchrun. Only the standard library:
the launchers read these before torch is imported.
"""

from __future__ import annotations

import os
import socket

ATTEMPT_ENV = "LONGLOOM_ATTEMPT"


def free_port() -> int:
    # Bound on every interface: the rendezvous store of rank 0 listens there, not only on loopback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def under_torchrun() -> bool:
    """True in a worker started by torchrun (its elastic agent sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def attempt_number() -> int:
    """Which start of the worker group this process belongs to: 0 first, 1 after the first restart, ...

    The Ray launcher and the in-process launcher set LONGLOOM_ATTEMPT; torchrun counts its own
    restarts in TORCHELASTIC_RESTART_COUNT.
    """
    return int(os.environ.get(ATTEMPT_ENV, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def rank_environment(
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    master_addr: str,
    master_port: int,
    attempt: int,
) -> dict[str, str]:
    """The variables torchrun sets for one rank, plus the attempt: for launchers other than torchrun."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        ATTEMPT_ENV: str(attempt),
    }
