"""bench/documents.py: --layers groups masked calls sharing one DocumentPlans (one per group, as one
model call's layers share it; calls without ids are not grouped), and a 2-rank run prints every method."""

import argparse

import torch

documents_bench = __import__("bench.documents", fromlist=["time_step"])


def test_masked_calls_share_one_plan_cache_per_group():
    seen = []

    def attention(q, k, v, document_ids=None, document_plans=None):
        seen.append((document_ids is not None, document_plans))
        return q * 2 + (k.sum() + v.sum())

    args = argparse.Namespace(dtype="fp32", head_dim=4, layers=3, warmup=1, iters=2)
    ids = torch.zeros(1, 8, dtype=torch.long)
    per_call = documents_bench.time_step(attention, args, 8, 1, ids, torch.device("cpu"), 2, 1)
    assert per_call >= 0 and len(seen) == 3 * (1 + 2)
    caches = [plans for _, plans in seen]
    for group in range(3):
        first = caches[3 * group]
        assert first is not None and all(plans is first for plans in caches[3 * group : 3 * group + 3])
    assert len({id(plans) for plans in caches}) == 3  # a fresh cache per group (model call)
    seen.clear()
    documents_bench.time_step(attention, args, 8, 1, None, torch.device("cpu"), 2, 1)
    assert seen == [(False, None)] * 3  # full causal: one call per run, no cache


def test_two_rank_run_prints_every_method_and_the_ulysses_path(tmp_path):
    """bench/documents.py on 2 CPU ranks (gloo): every method's rows come out, checked against fp64, and
    the Ulysses rows name the path taken (fixed-length documents stay in their shards: the split)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "bench/documents.py", "--seq", "1024", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
        "--check-seq", "256", "--iters", "1", "--warmup", "0", "--mean-doc", "128", "--fixed-doc", "64",
        "--documents", "lognormal", "fixed",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| fixed")]
    methods = {row.split("|")[2].strip() for row in rows}
    assert {
        "ulysses",
        "ulysses plain exchange",
        "tokenring",
        "2d 1x2",
        "2d 2x1",
        "1 GPU equal work",
    } <= methods
    ulysses_row = next(row for row in rows if row.split("|")[2].strip() == "ulysses")
    assert ulysses_row.rstrip(" |").endswith("(split)")
    assert done.stdout.count("max abs error vs fp64") >= 6
