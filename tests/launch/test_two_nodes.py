"""Several machines, simulated on this one: a Ray cluster of two nodes (2 CPUs each) runs a 4-worker job.

The group needs both nodes, so its ranks span them (the launcher logs each rank's node id, as the
rank's own actor reports it). Losing one node mid-run (every process of it killed) restarts the group
(launch.max_failures) on a node that joins afterwards; the run resumes from the newest checkpoint and
logs the same per-step losses as the uninterrupted 2-worker reference run (fp32, CPU; Ulysses over
4 ranks instead of 2, dp 1 in both, so only the order of float additions differs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.launch.conftest import REPO, TINY_OVERRIDES, losses, session_processes, subprocess_env

FOUR_WORKERS = [*TINY_OVERRIDES, "launch.workers=4", "parallel.ulysses=4", "launch.backend=ray"]
RUN_TIMEOUT_S = 400


def _run_on_two_nodes(output_dir, lose_node_at_step: int, *overrides: str) -> str:
    # A short folder of its own for the cluster's files (Unix socket paths are limited to 107 bytes).
    with tempfile.TemporaryDirectory(prefix="ll-2n-", dir="/tmp") as ray_tmp:
        command = [
            sys.executable,
            "-m",
            "tests.launch.two_nodes",
            "--lose-node-at-step",
            str(lose_node_at_step),
        ]
        command += [str(output_dir), *FOUR_WORKERS, *overrides]
        # RAY_DEDUP_LOGS as longloom sets it, but read by Ray before the script imports longloom.
        env = subprocess_env() | {"RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
        driver = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the script, its two nodes and their workers, and nothing else
        )
        try:
            output, _ = driver.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
            for pid in session_processes(driver.pid):  # what a failed run left behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert driver.returncode == 0, output
    return output


def _nodes_of_attempts(output: str) -> list[dict[str, list[int]]]:
    """Per attempt that started its ranks, {node id prefix: ranks} from the launcher's line."""
    attempts = []
    for count, placement in re.findall(r"attempt \d: 4 ranks on (\d) node\(s\) \(([^)]*)\)", output):
        nodes = {}
        for part in placement.split("; "):
            node, ranks = re.fullmatch(r"node (\w+): ranks ([\d,]+)", part).groups()
            nodes[node] = [int(rank) for rank in ranks.split(",")]
        assert int(count) == len(nodes)
        attempts.append(nodes)
    return attempts


def test_four_workers_span_two_nodes_and_survive_losing_one(tmp_path, reference_run):
    # launch.max_failures=2: a restart that starts before the cluster noticed the lost node puts ranks
    # on it and fails at once (logged as such); the next one finds the fresh node.
    output = _run_on_two_nodes(tmp_path, 2, "launch.max_failures=2")
    attempts = _nodes_of_attempts(output)
    first, last = attempts[0], attempts[-1]
    assert len(attempts) >= 2, output
    assert sorted(first.values()) == [[0, 1], [2, 3]], first
    assert sorted(last.values()) == [[0, 1], [2, 3]], last
    # One node was lost and a fresh one took its ranks; the surviving node kept its own.
    assert len(set(first) & set(last)) == 1, (first, last)
    assert "its worker process died" in output and "resumed from" in output
    assert losses(tmp_path) == pytest.approx(reference_run.losses, rel=1e-4)
