"""A short real training run (configs/tiny.yaml, 2 workers, fp32) that the launcher tests compare to.

The reference is the uninterrupted run through `longloom train` on the embedded Ray cluster; runs
that fail and resume, or start through torchrun or `ray job submit`, must log the same per-step
losses (rtol 1e-4: the same split, so only the order of float additions may differ).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch.entries import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")
STEPS = 5
# Small enough for a few seconds a run on 2 CPU cores: 2 samples a step rather than the demo's 16, and
# the demo's earlier lr and warmup, which these tests were written against. A checkpoint after every step
# so a restart resumes from the step before the failure. A hung collective would fail after 300 s, far
# beyond what any test may take, so a test that finishes shows the launcher stopped stuck peers itself.
TINY_OVERRIDES = [
    f"train.steps={STEPS}",
    "data.seq_len=128",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.warmup_steps=4",
    "train.log_every=1",
    "train.dtype=fp32",
    "checkpoint.interval=1",
    "launch.collective_timeout_s=300",
]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def session_processes(session_id: int) -> list[int]:
    """Processes of a session (one started with start_new_session=True): what a test started."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    pids.append(int(entry))
            except ProcessLookupError:
                pass
    return pids


def losses(output_dir: str | Path) -> list[float]:
    metrics = read_metrics(output_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1)), f"logged steps {sorted(metrics)}"
    return [metrics[step]["loss"] for step in range(1, STEPS + 1)]


@dataclass
class ReferenceRun:
    returncode: int
    output: str
    losses: list[float]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> ReferenceRun:
    output_dir = tmp_path_factory.mktemp("reference")
    command = [
        sys.executable,
        "-m",
        "longloom",
        "train",
        TINY_CONFIG,
        *TINY_OVERRIDES,
        "launch.workers=2",
        f"train.output_dir={output_dir}",
    ]
    done = subprocess.run(
        command, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return ReferenceRun(done.returncode, output, losses(output_dir))
