"""Driver for tests/launch/test_two_nodes.py: `longloom train` on a Ray cluster of several nodes on this host.

    python -m tests.launch.two_nodes [--lose-node-at-step N] OUTPUT_DIR [overrides...]

Starts a cluster of three nodes with 2 CPUs each (`ray.cluster_utils.Cluster`: a head and two more
raylets, each with its own resources) and runs the launcher on it with 4 workers (launch.address =
the cluster's address), so the group needs two nodes and leaves one spare. With --lose-node-at-step
N, once metrics.jsonl shows step N, every process of a node that hosts ranks (not the head, which
the driver is connected to) is killed: `remove_node`, not gracefully, as a machine that is lost.
The launcher must restart the group on the two nodes left. The spare is there from the start:
a node that joins in the middle of the run (as from an autoscaler) starts its agents while four
ranks train on two shared cores, and its raylet gave up waiting for them.
RAY_TMPDIR is set by the test, so the cluster's files and its address file stay in the test's folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from longloom.config import load_config
from longloom.launch.dispatch import launch
from tests.launch.conftest import TINY_CONFIG

NODE_CPUS = 2


def _newest_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip()]
    return max(steps, default=0)


def _lose_node_at(cluster: Cluster, output_dir: Path, step: int, run: threading.Thread) -> None:
    while _newest_step(output_dir) < step and run.is_alive():
        time.sleep(0.1)
    if not run.is_alive():
        return
    # The launcher's driver (the run's thread) is connected, so the group's placement is known here.
    hosting = {
        node for table in placement_group_table().values() for node in table["bundles_to_node_id"].values()
    }
    lost = next(node for node in cluster.worker_nodes if node.node_id in hosting)
    print(f"two_nodes: step {step} logged: killing every process of node {lost.node_id[:8]}", flush=True)
    # remove_node kills the node's own processes (raylet, agents), not the workers the raylet started:
    # those exit only once they notice their raylet is gone (checked once a second), and the ranks there
    # could finish the run in the meantime, so that the group never restarts. A lost machine takes its
    # ranks down at once: they are killed first, and the rest of the node right after.
    for _, process in lost.live_processes():
        for worker in psutil.Process(process.pid).children(recursive=True):
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
    cluster.remove_node(lost, allow_graceful=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--lose-node-at-step", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # The GCS notices a lost node from missed health checks (30 s by default): 3 s here, so that the
    # restarted group's bundles move to the spare node instead of waiting for the lost one.
    health_checks = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "_system_config": health_checks}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS)
    try:
        cfg = load_config(
            TINY_CONFIG,
            [*args.overrides, f"train.output_dir={args.output_dir}", f"launch.address={cluster.address}"],
        )
        # The run in a thread, the node is lost from here: the launcher works from any thread.
        exit_codes = []
        run = threading.Thread(target=lambda: exit_codes.append(launch(cfg)), daemon=True)
        run.start()
        if args.lose_node_at_step is not None:
            _lose_node_at(cluster, args.output_dir, args.lose_node_at_step, run)
        run.join()
        return exit_codes[0] if exit_codes else 1
    finally:
        ray.shutdown()  # the launcher leaves a cluster it joined running; this script started it
        cluster.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
