"""SIGKILL at random moments while checkpointing every step never leaves an unloadable newest checkpoint."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

TRIALS = 10


def test_sigkill_while_checkpointing_every_step_always_resumes(tmp_path):
    report = tmp_path / "report.jsonl"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.checkpointing.crash_driver",
            str(tmp_path / "ckpt"),
            str(TRIALS),
            "7",
            str(report),
        ],
        check=False,
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    resumes, summary = lines[:-1], lines[-1]
    assert [r["trial"] for r in resumes] == list(range(TRIALS + 1))
    assert resumes[0]["resumed_from"] is None
    # Every child after a kill found a committed checkpoint and loaded exactly what was saved.
    assert all(r["resumed_from"] is not None and r["verified"] for r in resumes[1:]), resumes
    # Each child was killed only after committing a step beyond the one it resumed from.
    steps = [r["resumed_from"] for r in resumes[1:]]
    assert all(later > earlier for earlier, later in itertools.pairwise(steps)), resumes
    assert len(summary["kills"]) == TRIALS
    # Half the kills aim at a flush in progress; most must have caught one (data file, no marker).
    assert sum(kill["mid_write"] for kill in summary["kills"]) >= 2, summary["kills"]
