"""The launcher on an embedded Ray cluster (2 CPU workers, gloo): a run, restarts, a failure for good.

The entries in tests/launch/entries.py all-reduce across the ranks every step and checkpoint after
every step, so a right total proves that both ranks took part in every step and that a restarted
group resumed from the checkpoint instead of starting over or skipping steps.
"""

from __future__ import annotations

import logging
import time

import pytest

from longloom.config import ConfigError, load_config
from longloom.launch.dispatch import choose_launcher, launch, run_workers
from tests.launch.entries import counting_run, counting_run_then_crash, expected_totals, read_metrics

# Far longer than any test may take: a test that finishes proves the driver stopped the ranks
# left waiting in a collective instead of letting them time out.
COLLECTIVE_TIMEOUT_S = 300


def _config(output_dir, *overrides: str):
    return load_config(
        None,
        [
            "launch.workers=2",
            "train.steps=6",
            f"train.output_dir={output_dir}",
            "checkpoint.interval=1",
            f"launch.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
            *overrides,
        ],
    )


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
    # Inside a worker torchrun started, every backend that can run here runs here.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert choose_launcher(load_config(None, ["launch.workers=2"])) == "in_process"
    assert choose_launcher(load_config(None, ["launch.workers=2", "launch.backend=torchrun"])) == "in_process"


def test_in_process_restart_resumes(tmp_path, monkeypatch):
    for variable in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("LONGLOOM_ATTEMPT", raising=False)
    cfg = _config(tmp_path, "launch.workers=1", "debug.fail_at_step=4", "launch.max_failures=1")
    result = run_workers(cfg, entry=counting_run)
    assert result["attempt"] == 1 and result["start_step"] == 3
    assert result["total"] == expected_totals(6, 1)[-1]
    losses = [read_metrics(tmp_path)[step]["loss"] for step in range(1, 7)]
    assert losses == expected_totals(6, 1)


def test_ray_run_streams_rank0_output(tmp_path, capfd):
    cfg = _config(tmp_path, "train.steps=3")
    result = run_workers(cfg, entry=counting_run)
    assert result["total"] == expected_totals(3, 2)[-1]
    assert [env["RANK"] for env in result["environments"]] == ["0", "1"]
    assert [env["LOCAL_RANK"] for env in result["environments"]] == ["0", "1"]
    assert {env["WORLD_SIZE"] for env in result["environments"]} == {"2"}
    assert {env["LONGLOOM_ATTEMPT"] for env in result["environments"]} == {"0"}
    # Ray forwards each worker's prints to the driver, prefixed with the worker's rank.
    console = capfd.readouterr().out
    assert "(rank0 pid=" in console and "counting step 3 total 18.0" in console


def test_ray_restarts_after_raise_and_after_dead_process(tmp_path):
    # Attempt 0: rank 1 raises at step 3. Attempt 1: rank 0's process dies (os._exit) at step 4.
    # Attempt 2 finishes; every step's total equals the uninterrupted run's.
    cfg = _config(tmp_path, "debug.fail_at_step=3", "launch.max_failures=2")
    started = time.monotonic()
    result = run_workers(cfg, entry=counting_run_then_crash)
    elapsed = time.monotonic() - started
    assert result["attempt"] == 2 and result["start_step"] == 3
    metrics = read_metrics(tmp_path)
    assert [metrics[step]["loss"] for step in range(1, 7)] == expected_totals(6, 2)
    assert [metrics[step]["attempt"] for step in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert elapsed < COLLECTIVE_TIMEOUT_S / 3, f"{elapsed:.0f} s: peers were not stopped promptly"


def test_ray_run_that_fails_for_good_exits_nonzero_with_rank_and_traceback(tmp_path, caplog):
    cfg = _config(tmp_path, "debug.fail_at_step=2", "launch.max_failures=0")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        exit_code = launch(cfg, entry=counting_run)
    elapsed = time.monotonic() - started
    assert exit_code == 1
    log = caplog.text
    assert "rank 1 failed" in log and "Traceback (most recent call last)" in log
    assert "RuntimeError: debug.fail_at_step=2: injected failure on rank 1" in log
    assert "training failed after 1 attempt(s)" in log
    # Rank 0 sat in an all_reduce its peer never joined; the driver killed it at once.
    assert elapsed < COLLECTIVE_TIMEOUT_S / 3, f"{elapsed:.0f} s: peers were not stopped promptly"
    assert [step for step in read_metrics(tmp_path)] == [1]
