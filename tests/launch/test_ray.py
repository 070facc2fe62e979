"""The launcher on an embedded Ray cluster (2 CPU workers, gloo): a run, restarts, a failure for good.

Real training runs (configs/tiny.yaml) check the user-facing behaviour: losses after a restart equal
the uninterrupted run's. The counting entry (tests/launch/entries.py) covers what the trainer has
no knob for: a worker process that dies without a Python exception.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch.distributed

from longloom.config import ConfigError, load_config
from longloom.launch.dispatch import choose_launcher, launch
from longloom.launch.ray import rank_environments
from tests.launch.conftest import (
    REPO,
    TINY_CONFIG,
    TINY_OVERRIDES,
    losses,
    subprocess_env,
)
from tests.launch.entries import (
    config_mistake_on_last_rank,
    counting_run_then_crash,
    expected_totals,
    read_metrics,
)

RTOL = 1e-4


def test_choose_launcher(monkeypatch):
    for variable in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert choose_launcher(load_config(None, ["launch.workers=1"])) == "in_process"
    assert choose_launcher(load_config(None, ["launch.workers=2"])) == "ray"
    assert choose_launcher(load_config(None, ["launch.workers=1", "launch.backend=ray"])) == "ray"
    with pytest.raises(ConfigError, match="launch.workers=2"):
        choose_launcher(load_config(None, ["launch.workers=2", "launch.backend=local"]))
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 4 -m longloom.launch.torchrun"):
        choose_launcher(load_config(None, ["launch.workers=4", "launch.backend=torchrun"]))
    # LOCAL_RANK left behind by an earlier in-process run (a group of one) is not a launcher's worker.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda group=None: 1)
    assert choose_launcher(load_config(None, ["launch.workers=2"])) == "ray"
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)
    assert choose_launcher(load_config(None, ["launch.workers=2"])) == "in_process"
    # Inside a worker torchrun started, every backend that can run here runs here.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert choose_launcher(load_config(None, ["launch.workers=2"])) == "in_process"
    assert choose_launcher(load_config(None, ["launch.workers=2", "launch.backend=torchrun"])) == "in_process"


def test_rank_environments_on_two_gpu_nodes():
    # Ranks 0-2 on node a (Ray gave them GPUs 5, 1, 3), ranks 3-4 on node b (GPUs 0, 2).
    nodes = ["a", "a", "a", "b", "b"]
    placements = [("10.0.0.1", ["5"]), ("10.0.0.1", ["1"]), ("10.0.0.1", ["3"]), ("10.0.0.2", ["2"])]
    placements += [("10.0.0.2", ["0"])]
    environments = rank_environments(nodes, placements, master_port=29500, attempt=2)
    assert [env["RANK"] for env in environments] == ["0", "1", "2", "3", "4"]
    assert {env["WORLD_SIZE"] for env in environments} == {"5"}
    assert {(env["MASTER_ADDR"], env["MASTER_PORT"]) for env in environments} == {("10.0.0.1", "29500")}
    assert [env["CUDA_VISIBLE_DEVICES"] for env in environments] == ["1,3,5"] * 3 + ["0,2"] * 2
    # LOCAL_RANK indexes CUDA_VISIBLE_DEVICES: every rank lands on the GPU Ray reserved for it.
    assert [env["LOCAL_RANK"] for env in environments] == ["2", "0", "1", "1", "0"]
    assert [env["LOCAL_WORLD_SIZE"] for env in environments] == ["3"] * 3 + ["2"] * 2
    assert {env["LONGLOOM_ATTEMPT"] for env in environments} == {"2"}


def test_rank_environments_on_cpu():
    environments = rank_environments(["a", "a"], [("10.0.0.1", []), ("10.0.0.1", [])], 29500, 0)
    assert [env["LOCAL_RANK"] for env in environments] == ["0", "1"]
    assert all("CUDA_VISIBLE_DEVICES" not in env for env in environments)


def test_embedded_run_streams_rank0_output(reference_run):
    # `longloom train configs/tiny.yaml`: an embedded cluster started and stopped by the driver.
    assert "started an embedded Ray cluster" in reference_run.output
    assert "stopped the embedded Ray cluster" in reference_run.output
    assert "(rank0 pid=" in reference_run.output
    assert "[rank 0] step      5 | loss" in reference_run.output
    assert reference_run.losses[-1] < reference_run.losses[0]
    assert "attempt 0: 2 ranks on 1 node(s)" in reference_run.output


def test_console_leaves_out_known_third_party_notices(reference_run):
    # Each of these was printed on every run (once per rank for the first two), telling the user nothing.
    for notice in (
        "Setting accelerator to CPU",
        "FutureWarning",
        "Started a local Ray instance",
        "Token authentication is enabled",
    ):
        assert notice not in reference_run.output, notice


def test_ray_restart_matches_uninterrupted_run(tmp_path, reference_run, caplog):
    cfg = load_config(
        TINY_CONFIG,
        [*TINY_OVERRIDES, "launch.workers=2", f"train.output_dir={tmp_path}"]
        + ["debug.fail_at_step=3", "launch.max_failures=1"],
    )
    with caplog.at_level(logging.INFO):
        assert launch(cfg) == 0
    assert "rank 1 failed" in caplog.text and "debug.fail_at_step=3: injected failure" in caplog.text
    assert "attempt 1: 2 ranks" in caplog.text
    assert losses(tmp_path) == pytest.approx(reference_run.losses, rel=RTOL)


def test_in_process_restart_matches_uninterrupted_run(tmp_path, reference_run):
    # One worker runs in the driver's process and restarts there. Same losses as the 2-worker
    # reference: dp is 1 in both, only the Ulysses split differs.
    command = [sys.executable, "-m", "longloom", "train", TINY_CONFIG, *TINY_OVERRIDES]
    command += ["launch.workers=1", "parallel.ulysses=1", f"train.output_dir={tmp_path}"]
    command += ["debug.fail_at_step=3", "launch.max_failures=1"]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "restarting the worker group" in output and "resumed from" in output
    assert losses(tmp_path) == pytest.approx(reference_run.losses, rel=RTOL)


def test_ray_dead_worker_and_failure_for_good(tmp_path, caplog):
    # Attempt 0: rank 1 raises at step 3. Attempt 1: rank 0's process dies at step 4 (os._exit).
    # With launch.max_failures=1 the run then fails for good: exit code 1, both errors logged.
    cfg = load_config(
        None,
        ["launch.workers=2", "train.steps=6", f"train.output_dir={tmp_path}", "checkpoint.interval=1"]
        + ["launch.collective_timeout_s=300", "debug.fail_at_step=3", "launch.max_failures=1"],
    )
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        exit_code = launch(cfg, entry=counting_run_then_crash)
    elapsed = time.monotonic() - started
    assert exit_code == 1
    log = caplog.text
    assert "attempt 0: rank 1 failed" in log and "Traceback (most recent call last)" in log
    assert "RuntimeError: debug.fail_at_step=3: injected failure on rank 1" in log
    assert "attempt 1: rank 0 failed" in log and "its worker process died" in log
    assert "training failed after 2 attempt(s) (launch.max_failures=1)" in log
    # The peer of the failed rank waited in an all_reduce (timeout 300 s); the driver killed it.
    assert elapsed < 100, f"{elapsed:.0f} s: peers were not stopped promptly"
    metrics = read_metrics(tmp_path)
    assert [metrics[step]["attempt"] for step in sorted(metrics)] == [0, 0, 1]
    assert [metrics[step]["loss"] for step in sorted(metrics)] == expected_totals(3, 2)


@pytest.mark.parametrize("workers", [1, 2])
def test_deterministic_worker_error_is_not_retried(tmp_path, caplog, monkeypatch, workers):
    # workers=1 runs in this process (which then gets a process group of one and torchrun's
    # variables: both undone afterwards); workers=2 on the embedded Ray cluster.
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LONGLOOM_ATTEMPT"):
        monkeypatch.setenv(variable, "")  # records the variable's state before, restored afterwards
        monkeypatch.delenv(variable)
    cfg = load_config(
        None,
        [f"launch.workers={workers}", f"train.output_dir={tmp_path}", "launch.max_failures=2"]
        + ["launch.collective_timeout_s=300"],
    )
    try:
        with caplog.at_level(logging.INFO):
            assert launch(cfg, entry=config_mistake_on_last_rank) == 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    log = caplog.text
    assert f"rank {workers - 1} failed" in log and "ValueError: model.hidden=64 does not match" in log
    assert "not retried (launch.max_failures=2): this error comes back on every start" in log
    assert "restarting the worker group" not in log
    assert sorted(path.name for path in tmp_path.glob("started-*")) == [
        f"started-rank{rank}-attempt0" for rank in range(workers)
    ]
