"""Several machines, simulated on this one: a Ray cluster of two nodes (2 CPUs each) runs a 4-worker job.

The group needs both nodes, so its ranks span them (the launcher logs each rank's node id, as the
rank's own actor reports it). Losing one node mid-run (every process of it killed) restarts the group
(launch.max_failures) on a node that joins afterwards, and the run resumes from the newest checkpoint
with the same per-step losses as the uninterrupted run on the same cluster (fp32, CPU).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import pytest

from tests.launch.conftest import REPO, TINY_OVERRIDES, losses, subprocess_env

FOUR_WORKERS = [*TINY_OVERRIDES, "launch.workers=4", "parallel.ulysses=2", "launch.backend=ray"]


def _run_on_two_nodes(output_dir, *extra: str) -> str:
    # A short folder of its own for the cluster's files (Unix socket paths are limited to 107 bytes).
    with tempfile.TemporaryDirectory(prefix="ll-2n-", dir="/tmp") as ray_tmp:
        command = [sys.executable, "-m", "tests.launch.two_nodes", str(output_dir), *extra, *FOUR_WORKERS]
        done = subprocess.run(
            command,
            check=False,
            cwd=REPO,
            # RAY_DEDUP_LOGS as longloom sets it, but read by Ray before the script imports longloom.
            env=subprocess_env() | {"RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _nodes_of_attempt(output: str, attempt: int) -> dict[str, list[int]]:
    """{node id prefix: ranks} from the launcher's line for that attempt."""
    match = re.search(rf"attempt {attempt}: 4 ranks on (\d) node\(s\) \(([^)]*)\)", output)
    assert match, output
    nodes = {}
    for part in match.group(2).split("; "):
        node, ranks = re.fullmatch(r"node (\w+): ranks ([\d,]+)", part).groups()
        nodes[node] = [int(rank) for rank in ranks.split(",")]
    assert int(match.group(1)) == len(nodes)
    return nodes


def test_four_workers_span_two_nodes_and_survive_losing_one(tmp_path):
    uninterrupted = _run_on_two_nodes(tmp_path / "uninterrupted")
    assert sorted(_nodes_of_attempt(uninterrupted, 0).values()) == [[0, 1], [2, 3]]
    assert "attempt 1:" not in uninterrupted

    interrupted = _run_on_two_nodes(
        tmp_path / "interrupted", "--lose-node-at-step", "2", "launch.max_failures=1"
    )
    before, after = _nodes_of_attempt(interrupted, 0), _nodes_of_attempt(interrupted, 1)
    assert len(before) == 2 and len(after) == 2
    # One node was lost and a fresh one took its ranks; the surviving node kept its own.
    assert len(set(before) & set(after)) == 1, (before, after)
    assert "its worker process died" in interrupted and "resumed from" in interrupted
    assert losses(tmp_path / "interrupted") == pytest.approx(losses(tmp_path / "uninterrupted"), rel=1e-4)
