"""bench/documents.py --layers: masked calls come in groups sharing one DocumentPlans (one per group, as
one model call's layers share it); calls without ids are not grouped."""

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
