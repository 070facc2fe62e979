"""Joining a cluster that is not there fails within launch.connect_timeout_s, with a message.

Without the probe `ray.init("127.0.0.1:1")` was still retrying after 200 s, silently. Also: the
Ray job's entrypoint is this interpreter, not whatever `python` a PATH finds first.
"""

from __future__ import annotations

import shlex
import sys
import time

import pytest

from longloom.cli import main
from longloom.config import ConfigError, load_config
from longloom.launch.env import free_port
from longloom.launch.ray_cluster import host_and_port, same_environment
from longloom.launch.ray_job import job_config, job_entrypoint
from tests.launch.conftest import TINY_CONFIG, TINY_OVERRIDES

TIMEOUT_S = 2


@pytest.mark.parametrize("scheme", ["", "ray://", "http://"])
def test_nothing_at_the_address_fails_within_the_timeout(scheme, capsys):
    address = f"{scheme}127.0.0.1:{free_port()}"  # a port nobody listens on
    started = time.monotonic()
    exit_code = main(
        ["train", TINY_CONFIG, *TINY_OVERRIDES, "launch.workers=2", f"launch.address={address}"]
        + [f"launch.connect_timeout_s={TIMEOUT_S}"]
    )
    elapsed = time.monotonic() - started
    assert exit_code == 2
    error = capsys.readouterr().err
    assert f"launch.address={address!r}" in error
    assert f"answered within launch.connect_timeout_s={TIMEOUT_S} s" in error
    assert "launch.address=null" in error  # what to do instead
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + 15, f"{elapsed:.1f} s"


def test_connect_timeout_is_range_checked():
    assert load_config(None, []).launch.connect_timeout_s == 45
    for bad in ("0", "-1", "7200"):
        with pytest.raises(ConfigError, match="connect_timeout_s"):
            load_config(None, [f"launch.connect_timeout_s={bad}"])


def test_host_and_port():
    assert host_and_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert host_and_port("ray://head:10001") == ("head", 10001)
    assert host_and_port("http://head:8265") == ("head", 8265)
    assert host_and_port("head") is None


def test_job_runs_this_interpreter(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/my envs/py 3/bin/python")
    monkeypatch.setenv("PATH", "/usr/bin")
    assert shlex.split(job_entrypoint("config.yaml")) == [
        "/opt/my envs/py 3/bin/python",
        "-m",
        "longloom",
        "train",
        "config.yaml",
    ]
    assert same_environment() == {
        "py_executable": "/opt/my envs/py 3/bin/python",
        "env_vars": {"PATH": "/opt/my envs/py 3/bin:/usr/bin"},
    }
    cfg = job_config(load_config(None, ["launch.address=http://head:8265", "launch.workers=2"]))
    assert (cfg.launch.address, cfg.launch.backend, cfg.launch.workers) == ("auto", "ray", 2)
