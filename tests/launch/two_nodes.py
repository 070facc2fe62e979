"""Driver for tests/launch/test_two_nodes.py: `longloom train` on a Ray cluster of two nodes on this host.

    python -m tests.launch.two_nodes OUTPUT_DIR [--lose-node-at-step N] [overrides...]

Starts a cluster of two nodes with 2 CPUs each (`ray.cluster_utils.Cluster`: a head and a second
raylet, each with its own resources), runs the launcher on it with 4 workers (launch.address = the
cluster's address, so a group needs both nodes), and stops it. With --lose-node-at-step N, once
metrics.jsonl shows step N, every process of the node that does not host the driver's raylet is
killed (`remove_node`, not gracefully: a machine that is lost), then a fresh node with 2 CPUs joins,
as an autoscaler or a restarted machine would add one; the launcher must restart the group on it.
RAY_TMPDIR is set by the test, so the cluster's files and its address file stay in the test's folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

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


def _lose_node_at(cluster: Cluster, output_dir: Path, step: int) -> None:
    while _newest_step(output_dir) < step:
        time.sleep(0.1)
    (lost,) = cluster.worker_nodes
    print(f"two_nodes: step {step} logged: killing every process of node {lost.node_id[:8]}", flush=True)
    cluster.remove_node(lost, allow_graceful=False)
    cluster.add_node(num_cpus=NODE_CPUS)
    print("two_nodes: a fresh node joined", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--lose-node-at-step", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
    cluster.add_node(num_cpus=NODE_CPUS)
    try:
        cfg = load_config(
            TINY_CONFIG,
            [*args.overrides, f"train.output_dir={args.output_dir}", f"launch.address={cluster.address}"],
        )
        if args.lose_node_at_step is not None:
            killer = threading.Thread(
                target=_lose_node_at, args=(cluster, args.output_dir, args.lose_node_at_step), daemon=True
            )
            killer.start()
        return launch(cfg)
    finally:
        ray.shutdown()  # the launcher leaves a cluster it joined running; this script started it
        cluster.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
