"""`torchrun --nproc-per-node 2 --max-restarts 1 -m longloom.launch.torchrun configs/tiny.yaml ...`:
rank 1 raises at step 3, torchrun restarts the group, the group resumes from the newest checkpoint
and logs the same per-step losses as the uninterrupted run through the Ray launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch.conftest import REPO, TINY_CONFIG, TINY_OVERRIDES, losses, subprocess_env


def test_torchrun_restart_matches_uninterrupted_run(tmp_path, reference_run):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["--max-restarts", "1", "--monitor-interval", "0.5"]
    command += ["-m", "longloom.launch.torchrun", TINY_CONFIG, *TINY_OVERRIDES]
    command += ["launch.workers=2", f"train.output_dir={tmp_path}", "debug.fail_at_step=3"]
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # The first attempt's error reached the console with its rank, then the group was restarted.
    assert "RuntimeError: debug.fail_at_step=3: injected failure on rank 1" in output
    assert "resumed from" in output
    assert losses(tmp_path) == pytest.approx(reference_run.losses, rel=1e-4)
