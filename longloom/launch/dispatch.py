"""Which launcher runs a training job: `launch(cfg)` picks one from `launch.backend` and runs it.

- auto: already inside a worker (torchrun set LOCAL_RANK / TORCHELASTIC_RUN_ID, or this is a Ray
  worker): run here; one worker: run here; more: the Ray launcher (embedded cluster by default).
- local: one worker in this process (launch.workers must be 1).
- torchrun: torchrun starts the workers itself; outside torchrun this says how to call it.
- ray: the Ray launcher, also for one worker.
In-process runs restart in-process after a failure (launch.max_failures) except under torchrun,
whose agent restarts the group (`torchrun --max-restarts`).

Stopping: Ctrl-C (SIGINT) and SIGTERM (what `ray job stop`, Slurm and Kubernetes send) both stop
every worker and the Ray cluster we started, say so once, and exit 130 / 143 (128 + the signal).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, Literal

import torch.distributed as dist

from longloom.config import ConfigError, LongloomConfig
from longloom.launch.supervisor import RunFailed, WorkerFailure, is_deterministic, run_with_restarts
from longloom.runtime.ranks import ATTEMPT_ENV, under_torchrun

logger = logging.getLogger(__name__)

Entry = Callable[[LongloomConfig], Any]

EXIT_FAILED = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT


def _inside_worker() -> bool:
    """True when another launcher started this process as one rank of a run."""
    if under_torchrun():
        return True
    # LOCAL_RANK set by whoever started us. init_distributed also writes it back in a lone process,
    # so a process whose earlier in-process run left a group of one is not a launcher's worker.
    lone_process = dist.is_initialized() and dist.get_world_size() == 1
    if "LOCAL_RANK" in os.environ and not lone_process:
        return True
    # Only a process that already imported Ray can be a Ray worker; importing it here costs a second.
    if "ray" not in sys.modules:
        return False
    from longloom.launch.ray import _inside_ray_worker

    return _inside_ray_worker()


def choose_launcher(cfg: LongloomConfig) -> Literal["in_process", "ray"]:
    """Where the workers of this run come from; raises ConfigError for a combination that cannot work."""
    backend = cfg.launch.backend
    workers = cfg.launch.workers
    if backend == "auto":
        return "in_process" if _inside_worker() or workers == 1 else "ray"
    if backend == "local":
        if workers != 1:
            raise ConfigError(
                f"launch.backend=local runs one worker in this process but launch.workers={workers}: "
                "set launch.workers=1, or launch.backend=auto (Ray) for several workers"
            )
        return "in_process"
    if backend == "torchrun":
        if under_torchrun():
            return "in_process"
        raise ConfigError(
            "launch.backend=torchrun: torchrun starts the workers, so run "
            f"`torchrun --nproc-per-node {workers} -m longloom.launch.torchrun CONFIG [overrides]` "
            "(add --max-restarts N to restart after failures), or set launch.backend=auto"
        )
    return "ray"


def _default_entry(cfg: LongloomConfig) -> Any:
    from longloom.training.trainer import run_training

    return run_training(cfg)


def _run_in_process(cfg: LongloomConfig, entry: Entry, attempt: int) -> Any:
    from longloom.launch.worker_setup import prepare_worker_process

    if not under_torchrun():
        os.environ[ATTEMPT_ENV] = str(attempt)
    prepare_worker_process(cfg)
    try:
        return entry(cfg)
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - any error of the entry is a failed attempt, restarted or reported
        # The process group stays: a lone worker has no peer stuck in it, and DeepSpeed keeps
        # groups derived from it in module state that a new group would leave dangling.
        rank = int(os.environ.get("RANK", "0"))
        raise WorkerFailure(rank, traceback.format_exc(), retryable=not is_deterministic(error)) from None


def run_workers(cfg: LongloomConfig, entry: Entry | None = None) -> Any:
    """Runs `entry(cfg)` (default `run_training`) on every worker; returns rank 0's result.

    Raises RunFailed when the run fails for good, ConfigError for a configuration to fix.
    """
    launcher = choose_launcher(cfg)
    if launcher == "in_process":
        entry = entry or _default_entry
        # Restarting here is only right when this process is the whole run: torchrun restarts its
        # own workers, and a rank of a larger group cannot restart without its peers.
        whole_run = not under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) == 1
        max_failures = cfg.launch.max_failures if whole_run else 0
        return run_with_restarts(lambda attempt: _run_in_process(cfg, entry, attempt), max_failures)

    from longloom.launch.ray import RayLauncher
    from longloom.training.split import validate_layout

    validate_layout(cfg, cfg.launch.workers)  # before any Ray worker starts
    # Relative paths mean "relative to where the command ran", as for an in-process run; Ray
    # workers of an embedded cluster share this machine but not necessarily this directory.
    if not (cfg.launch.address or "").startswith(("http://", "https://")):
        cfg = cfg.model_copy(deep=True)
        cfg.train.output_dir = os.path.abspath(cfg.train.output_dir)
    return RayLauncher(cfg, entry).run()


class _SigtermAsInterrupt:
    """While active, SIGTERM stops the run the way Ctrl-C does, and remembers that it came.

    The handler raises KeyboardInterrupt, which unwinds every `finally` that stops workers and the
    cluster. The signal is remembered here rather than in the exception: Ray re-raises an interrupt
    that arrives inside `ray.wait`/`ray.get` as a plain KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise KeyboardInterrupt(f"signal {signum}")

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:
            pass  # not the main thread: signals stay with whoever owns it

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def launch(cfg: LongloomConfig, entry: Entry | None = None) -> int:
    """Runs the job the config describes; the exit code for the command line (0 on success).

    A failure is logged with the rank and traceback of the worker that failed; Ctrl-C (or SIGTERM,
    as `ray job stop` sends) stops every worker and the Ray cluster we started.
    ConfigError is left to the caller, which prints it as a short message.
    """
    sigterm = _SigtermAsInterrupt()
    sigterm.install()
    try:
        run_workers(cfg, entry)
        return 0
    except RunFailed as failure:
        logger.error("%s", failure)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if sigterm.received is not None:
            logger.error("stopped by SIGTERM: every worker was stopped")
            return 128 + sigterm.received
        logger.error("interrupted: every worker was stopped")
        return EXIT_INTERRUPTED
    finally:
        sigterm.restore()
