"""The Ray cluster a run uses: an embedded one started here, or an existing one joined in bounded time.

`launch.address`:
- null: RAY_ADDRESS when set (as inside `ray job submit`), else an embedded cluster on this
  machine: `ray.init(address="local")` without a dashboard, num_cpus = max(workers, cores),
  stopped at the end, and watched by launch/reaper.py so that even a SIGKILLed driver leaves none
  of its processes behind;
- "auto", "host:port" or "ray://host:10001": an existing cluster. `ray.init` retries an address
  where nothing answers for ever (still retrying after 200 s), so the address is first probed with
  TCP connects until `launch.connect_timeout_s`, and an unreachable one is a ConfigError naming it.

Workers run the interpreter of the command that started them: Ray starts a cluster's workers with
the Python the node was started with, which for a joined cluster may be another environment, so the
runtime environment names ours (`py_executable`) and puts its bin/ first on PATH. Inside a Ray job
the job's runtime environment governs (Ray refuses a driver's that sets the same fields); jobs that
`launch.address=http://...` submits carry the same two settings (launch/ray_job.py).

Console: Ray's own INFO lines ("Started a local Ray instance", "Connecting to existing Ray
cluster") are left out (`logging_level=WARNING`); for the embedded cluster also the token-auth
notice, as nobody but this driver talks to it. Ray's warnings and errors stay.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import ray

from longloom.config import ConfigError, LongloomConfig
from longloom.launch.reaper import ClusterReaper

logger = logging.getLogger(__name__)

_PROBE_INTERVAL_S = 1.0
# Set by Ray in the driver of a submitted job: the job's runtime environment applies.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Logs "Token authentication is enabled for this Ray cluster" on every start of a cluster.
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def same_environment() -> dict:
    """A Ray runtime environment whose workers run this interpreter, with its bin/ first on PATH."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    return {
        "py_executable": sys.executable,
        "env_vars": {"PATH": bin_dir + (os.pathsep + path if path else "")},
    }


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "scheme://host:port"; None when the address has no port."""
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:
        return None
    if parsed.hostname is None or port is None:
        return None
    return parsed.hostname, port


def wait_until_reachable(address: str, timeout_s: float, what: str, fix: str) -> None:
    """Returns once a TCP connection to `address` succeeds; ConfigError after `timeout_s` without one."""
    target = host_and_port(address)
    if target is None:
        return  # nothing to probe (e.g. a bare host): the library's own error applies
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection(target, timeout=min(max(remaining, 0.1), 5.0)):
                return
        except OSError as error:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigError(
                    f"launch.address={address!r}: no {what} answered within launch.connect_timeout_s="
                    f"{timeout_s:g} s ({error}); {fix}"
                ) from None
        time.sleep(min(_PROBE_INTERVAL_S, remaining))


def _resolved_auto_address() -> str | None:
    """The GCS address "auto" stands for (RAY_ADDRESS, else the newest cluster `ray start` left).

    Ray resolves it inside `ray.init`; a stale entry from a cluster that is gone would then be
    retried for ever, so it is resolved here first. A private function of Ray, stable since 2.0;
    when it moves, the probe is skipped and Ray's own error applies.
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError as error:
        raise ConfigError(
            f"launch.address='auto': no running Ray cluster on this machine ({error}); start one with "
            "`ray start --head`, or set launch.address=null for an embedded cluster"
        ) from None


def _keep_sigterm_handler(start: callable) -> None:
    """Runs `start()` (a ray.init) and puts back the SIGTERM handler it replaced.

    ray.init installs `sys.exit` as the driver's SIGTERM handler: `ray job stop`, Slurm and
    Kubernetes would then get a stack dump and exit 1 instead of the clean stop Ctrl-C gets.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    start()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Cluster:
    """The cluster a run is on; `close()` stops it when this driver started it."""

    started_here: bool
    reaper: ClusterReaper | None = None

    def close(self) -> None:
        if not self.started_here:
            return
        ray.shutdown()
        if self.reaper is not None:
            self.reaper.close()
        logger.info("stopped the embedded Ray cluster")


def _start_embedded(cfg: LongloomConfig) -> Cluster:
    num_cpus = max(cfg.launch.workers, os.cpu_count() or 1)
    reaper = ClusterReaper()
    token_notice = logging.getLogger(_TOKEN_NOTICE_LOGGER)
    token_level = token_notice.level
    token_notice.setLevel(logging.ERROR)
    try:
        # "local" rather than no address: a bare ray.init() joins the last cluster `ray start` left
        # in /tmp/ray (possibly stale or someone else's) instead of starting ours.
        _keep_sigterm_handler(
            lambda: ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING
            )
        )
    except BaseException:
        reaper.close()
        raise
    finally:
        token_notice.setLevel(token_level)
    logger.info("started an embedded Ray cluster on this machine (%d CPUs)", num_cpus)
    return Cluster(started_here=True, reaper=reaper)


def _join(address: str, timeout_s: float) -> Cluster:
    fix = (
        "check the address and that the cluster is up (`ray status` on its head node), start one with "
        "`ray start --head`, or set launch.address=null for an embedded cluster on this machine"
    )
    probed = _resolved_auto_address() if address == "auto" else address
    if probed is not None:
        wait_until_reachable(probed, timeout_s, "Ray cluster", fix)
    inside_job = _JOB_CONFIG_ENV in os.environ
    runtime_env = None if inside_job else same_environment()
    try:
        _keep_sigterm_handler(
            lambda: ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        )
    except ConnectionError as error:
        raise ConfigError(f"launch.address={address!r}: no Ray cluster answered ({error}); {fix}") from None
    return Cluster(started_here=False)


def connect(cfg: LongloomConfig) -> Cluster:
    """Connects to the cluster `launch.address` names (see the module docstring)."""
    if ray.is_initialized():
        return Cluster(started_here=False)
    address = cfg.launch.address
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        logger.info("launch.address is null and RAY_ADDRESS=%s: joining that cluster", address)
    if address is None:
        return _start_embedded(cfg)
    return _join(address, cfg.launch.connect_timeout_s)
