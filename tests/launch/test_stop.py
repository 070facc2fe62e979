"""Stopping a `longloom train` driver that runs 2 workers on its embedded Ray cluster.

Ctrl-C (SIGINT) and SIGTERM (`ray job stop`, Slurm, Kubernetes) stop the workers and the cluster,
say so once and exit 128 + the signal. SIGKILL gives the driver no chance: its watchdog
(launch/reaper.py) kills what the cluster left. Each driver runs in a session of its own, so the
processes it started (GCS, raylet, agents, workers) are found by session id and nothing else on the
machine is looked at or touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from longloom.launch.reaper import process_alive
from tests.launch.conftest import REPO, TINY_CONFIG, TINY_OVERRIDES, session_processes, subprocess_env

LEFT_BEHIND_GRACE_S = 10
# Step 2 comes 15-35 s after the start on 2 loaded cores (Ray, 2 workers, DeepSpeed's first engine).
STEP_2_TIMEOUT_S = 180


def _start_driver(output_dir) -> subprocess.Popen:
    command = [sys.executable, "-m", "longloom", "train", TINY_CONFIG, *TINY_OVERRIDES, "launch.workers=2"]
    command += ["train.steps=100000", "checkpoint.interval=0", f"train.output_dir={output_dir}"]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the driver, its Ray cluster and its workers, and nothing else
    )


def _wait_for_step_2(driver: subprocess.Popen) -> str:
    # Read in a thread, so that a driver that keeps training without its rank-0 lines ever reaching
    # the console (seen once in a full-suite run: 6,000 steps, the lines only in Ray's worker log)
    # fails this test after STEP_2_TIMEOUT_S instead of hanging the suite.
    seen: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in driver.stdout:
            seen.append(line)
            if "[rank 0] step      2 |" in line:
                reached.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=STEP_2_TIMEOUT_S)
    if not reached.is_set():
        ended = "ended" if not reader.is_alive() else f"showed no step 2 within {STEP_2_TIMEOUT_S} s"
        raise AssertionError(f"the driver {ended}:\n" + "".join(seen))
    return "".join(seen)


def _running(session_id: int) -> list[int]:
    """Processes of the session that still run (a zombie has ended; init reaps it)."""
    return [pid for pid in session_processes(session_id) if process_alive(pid)]


def _left_behind(session_id: int) -> list[str]:
    """Processes of the driver's session still running after a few seconds (killed, then reported)."""
    deadline = time.monotonic() + LEFT_BEHIND_GRACE_S
    while _running(session_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in _running(session_id):
        try:
            command = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode()
            marked = b"LONGLOOM_EMBEDDED_CLUSTER=" in Path("/proc", str(pid), "environ").read_bytes()
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
        left.append(f"{pid} {command[:120]!r} marked={marked}")
    return left


def _watchdogs_of(driver_pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            arguments = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"longloom.launch.reaper" in arguments and str(driver_pid).encode() in arguments:
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize(
    ("stop", "exit_code", "message"),
    [
        (signal.SIGINT, 130, "interrupted: every worker was stopped"),
        (signal.SIGTERM, 143, "stopped by SIGTERM: every worker was stopped"),
    ],
)
def test_signal_stops_workers_and_embedded_cluster(tmp_path, stop, exit_code, message):
    driver = _start_driver(tmp_path)
    try:
        _wait_for_step_2(driver)
        # The GCS, raylet, workers...: all started by the driver, all in its session.
        assert len(session_processes(driver.pid)) > 3
        os.kill(driver.pid, stop)
        output = driver.stdout.read()
        assert driver.wait(timeout=60) == exit_code, output
    finally:
        if driver.poll() is None:
            driver.kill()
    assert "stopped the embedded Ray cluster" in output
    assert output.count(message) == 1, output
    assert "Traceback" not in output, output
    assert not _left_behind(driver.pid), "processes of the embedded cluster were left running"
    assert not _watchdogs_of(driver.pid)


def test_sigkill_of_driver_leaves_no_cluster_processes(tmp_path):
    driver = _start_driver(tmp_path)
    try:
        _wait_for_step_2(driver)
        before = session_processes(driver.pid)
        assert len(before) > 3
        assert len(_watchdogs_of(driver.pid)) == 1
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        left = _left_behind(driver.pid)
        deadline = time.monotonic() + LEFT_BEHIND_GRACE_S
        while _watchdogs_of(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        watchdogs = _watchdogs_of(driver.pid)
        for pid in watchdogs:
            os.kill(pid, signal.SIGKILL)
        output = driver.stdout.read()  # every writer of the pipe is gone now
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not left, f"processes of the embedded cluster left running after SIGKILL of the driver: {left}"
    assert not watchdogs, "the watchdog did not exit after its sweep"
    assert "ended without stopping its embedded Ray cluster; killed its" in output, output
