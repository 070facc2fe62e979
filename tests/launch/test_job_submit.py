"""Runs on a head node these tests start (token authentication on, as on a shared cluster):
`ray job submit --address http://HEAD:DASHBOARD -- longloom train ... launch.address=auto`, and
`longloom train ... launch.address=http://HEAD:DASHBOARD`, which submits the job itself.

Every process here has a PATH whose `python` and `python3` are a stand-in that fails: a job or
worker started with a bare `python` instead of the interpreter of the command that started it fails
(as on a fresh machine, where the `python` on PATH lacks longloom's packages).

The head runs as `ray start --head --block` in a session of its own: SIGTERM makes it stop the
processes it started, and what is left in that session afterwards (dashboard helpers) is killed by
process group. Nothing else on the machine is touched (never `ray stop`, which stops every Ray
cluster of the user).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from longloom.launch.env import free_port
from tests.launch.conftest import REPO, TINY_CONFIG, TINY_OVERRIDES, losses, session_processes, subprocess_env

HEAD_START_TIMEOUT_S = 90


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen) -> None:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert head.poll() is None, "the head node exited while starting"
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {HEAD_START_TIMEOUT_S} s")


def _path_with_a_wrong_python(folder) -> str:
    """A PATH whose `python`/`python3` exit 97, followed by system folders without longloom's venv."""
    folder.mkdir()
    for name in ("python", "python3"):
        stand_in = folder / name
        stand_in.write_text("#!/bin/sh\necho 'wrong interpreter: a bare python from PATH' >&2\nexit 97\n")
        stand_in.chmod(0o755)
    return os.pathsep.join([str(folder), "/usr/bin", "/bin"])


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A one-node Ray cluster with its dashboard and token auth; yields (dashboard URL, environment)."""
    token = secrets.token_hex(16)
    path = _path_with_a_wrong_python(tmp_path_factory.mktemp("path") / "bin")
    env = subprocess_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    dashboard_port = free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
    command += ["--port", str(free_port()), "--dashboard-port", str(dashboard_port)]
    command += ["--ray-client-server-port", str(free_port())]
    command += ["--dashboard-agent-listen-port", str(free_port())]
    command += ["--num-cpus", "4", "--disable-usage-stats"]
    with open(tmp_path_factory.mktemp("head") / "head.log", "w") as log:
        head = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(url, token, head)
        yield url, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        # Helpers that outlive `ray start` (dashboard subprocesses) are still in its session.
        for pid in session_processes(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while session_processes(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not session_processes(head.pid), "processes of the test's head node were left running"


def test_ray_job_submit_runs_longloom_train(tmp_path, head_node, reference_run):
    url, env = head_node
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", url, "--"]
    command += [sys.executable, "-m", "longloom", "train", TINY_CONFIG, *TINY_OVERRIDES, "launch.workers=2"]
    command += ["launch.backend=ray", "launch.address=auto", f"train.output_dir={output_dir}"]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "succeeded" in output
    # The job's driver joined the cluster (no embedded one) and rank 0's lines reached the job log.
    assert "started an embedded Ray cluster" not in output
    assert "[rank 0] step      5 | loss" in output
    assert losses(output_dir) == pytest.approx(reference_run.losses, rel=1e-4)


def test_train_with_http_address_submits_a_job(tmp_path, head_node, reference_run):
    # Started elsewhere: the resolved config (and this longloom package) travel with the job.
    url, env = head_node
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "longloom", "train", TINY_CONFIG, *TINY_OVERRIDES, "launch.workers=2"]
    command += [f"launch.address={url}", f"train.output_dir={output_dir}"]
    done = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "submitted Ray job" in output and "[rank 0] step      5 | loss" in output
    assert "wrong interpreter" not in output
    assert losses(output_dir) == pytest.approx(reference_run.losses, rel=1e-4)
