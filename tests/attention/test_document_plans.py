"""Packed-document plans are built once per model call, not once per layer, and never go stale.

The ragged (varlen) backend that takes segment plans runs on CUDA only; here it runs on the CPU
through the same plumbing with the plain-torch emulation of the ragged kernel (attention/varlen.py
EMULATED), so the plan builds of a whole model step can be counted. Counts are compared between
models of 2 and 4 layers (the same), and against the per-call path without the model's
`DocumentPlans` (which grows with the layers: the count here can fail).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import ClassVar
from unittest import mock

import pytest
import torch

from bench.document_plan_builds import counting
from longloom.attention.document_plans import DocumentPlans
from longloom.models import llama
from longloom.models.llama import LlamaModel
from longloom.offload.activations import ActivationOffloader
from longloom.parallel import ParallelDims
from longloom.parallel.loss import sequence_parallel_cross_entropy
from tests.models.tiny import tiny_model_config
from tests.parallel.documents import packed_batch

LENGTHS_A = [[5, 1, 12, 14], [20, 3, 9]]  # two packed samples of 32 tokens
LENGTHS_B = [[9, 9, 2, 12], [1, 30, 1]]


def test_a_value_is_built_once_per_source_tensor_and_key():
    plans, builds = DocumentPlans(), []
    ids = torch.tensor([[0, 0, 1]])

    def build():
        builds.append(1)
        return len(builds)

    assert plans.get(ids, "kind", 1, build) == 1
    assert plans.get(ids, "kind", 1, build) == 1  # cached
    assert plans.get(ids, "kind", 2, build) == 2  # another key
    assert plans.get(ids.clone(), "kind", 1, build) == 3  # equal values, another tensor: never shared
    ids[0, 2] = 0  # changed in place: its version moved, derived again
    assert plans.get(ids, "kind", 1, build) == 4
    assert plans.builds == Counter(kind=4) and len(builds) == 4


class _RecordingPlans(DocumentPlans):
    """DocumentPlans that remember themselves, to read what one model call built."""

    made: ClassVar[list[DocumentPlans]] = []

    def __init__(self):
        super().__init__()
        _RecordingPlans.made.append(self)


@contextlib.contextmanager
def _emulated_varlen(cache: bool = True):
    """The varlen backend on the CPU (emulated ragged kernel), as bench/document_plan_builds.py runs it;
    yields its counts, among them the plan_segments calls (`_plans`) and ring block cuts to the rows that
    meet ("row cuts", host scans of the ids). `cache=False`: the model makes no DocumentPlans (every call
    plans for itself, as before issue 16)."""
    _RecordingPlans.made = []
    with counting(cache) as counts, contextlib.ExitStack() as stack:
        if cache:
            stack.enter_context(mock.patch.object(llama, "DocumentPlans", _RecordingPlans))
        yield counts


def _plans(counts: Counter) -> int:
    """Ragged segment plans made, from device ids (blocks) and from host ids (ring blocks)."""
    return counts["plans from device ids"] + counts["plans from host ids"]


def _batch(lengths):
    return packed_batch(lengths)


def _model(pattern, dims=None, checkpoint_fn=None):
    torch.manual_seed(0)
    return LlamaModel(tiny_model_config(pattern), dims, checkpoint_fn=checkpoint_fn).train()


def _train_step(model, batch, group=None):
    """(loss, {name: grad}) of one forward + backward; grads cleared first."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["tokens"], batch["position_ids"], document_ids=batch["document_ids"])
    loss, stats = sequence_parallel_cross_entropy(logits, batch["labels"], group=group)
    loss.backward()
    return float(stats.loss), {name: p.grad.clone() for name, p in model.named_parameters()}


def _plan_builds(pattern, token_wise, cache):
    checkpoint_fn = ActivationOffloader(0.5, torch.device("cpu")).checkpoint if token_wise else None
    model = _model(pattern, checkpoint_fn=checkpoint_fn)
    with _emulated_varlen(cache) as counts:
        _train_step(model, _batch(LENGTHS_A))
    return _plans(counts)


@pytest.mark.parametrize("token_wise", [False, True], ids=["checkpointed", "token-wise-recompute"])
def test_plan_builds_per_step_do_not_grow_with_the_layers(token_wise):
    # Distinct plans of a step: the causal plan of the whole sequence (forward, recomputation and
    # backward of every layer), plus, with token-wise recomputation, the plan of the recomputed prefix.
    distinct = 2 if token_wise else 1
    assert _plan_builds("SS", token_wise, cache=True) == distinct
    assert _plan_builds("SSSS", token_wise, cache=True) == distinct
    # Without the model's cache: forward and recomputation per layer, and with token-wise recomputation
    # the backward too (the last layer keeps nothing and recomputes in full: forward and recomputation).
    for pattern in ("SS", "SSSS"):
        layers = len(pattern)
        per_call = 3 * (layers - 1) + 2 if token_wise else 2 * layers
        assert _plan_builds(pattern, token_wise, cache=False) == per_call


def test_consecutive_steps_with_other_documents_equal_fresh_runs():
    """A step with other ids after a first one: exactly a fresh model's step (no stale plan), and equal to
    the plain-torch masked attention."""
    batch_a, batch_b = _batch(LENGTHS_A), _batch(LENGTHS_B)
    with _emulated_varlen() as counts:
        model = _model("SLS")
        first = _train_step(model, batch_a)
        builds_after_first = _plans(counts)
        second = _train_step(model, batch_b)
        fresh = _train_step(_model("SLS"), batch_b)
        fresh_a = _train_step(_model("SLS"), batch_a)
    assert builds_after_first == 1 and _plans(counts) == 4  # one plan per step (per model call)
    assert len(_RecordingPlans.made) == 4  # one cache per model call
    plain = _train_step(_model("SLS"), batch_b)  # CPU torch backend: the document mask
    for (loss, grads), (want_loss, want_grads) in ((second, fresh), (first, fresh_a)):
        assert loss == want_loss
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=0, msg=name)
    assert second[0] == pytest.approx(plain[0], rel=1e-6)
    assert abs(second[0] - first[0]) > 1e-4  # other documents: another loss
    for name, grad in second[1].items():
        torch.testing.assert_close(grad, plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def _two_d_worker(pattern):
    """Two steps (ids A, then B) with the model's cache, then B per call; builds of each, B's result."""
    dims = ParallelDims.build(dp=1, ulysses=2, ring=2)
    model = _model(pattern, dims)
    counts = []
    for lengths, cache in ((LENGTHS_A, True), (LENGTHS_B, True), (LENGTHS_B, False)):
        with _emulated_varlen(cache) as calls:
            loss, grads = _train_step(model, dims.shard_batch(_batch(lengths)), dims.sp_group)
        builds = dict(_RecordingPlans.made[0].builds) if cache else {}
        counts.append((_plans(calls), calls["row cuts"], builds))
        for grad in grads.values():
            torch.distributed.all_reduce(grad, group=dims.sp_group)
    return counts, loss, {name: grad / dims.sp for name, grad in grads.items()}


def test_two_d_builds_per_step_do_not_grow_with_the_layers(distributed):
    """Ulysses 2 x TokenRing 2 with softmax and linear layers: every derivation of the ids (order check,
    Ulysses gather, ring order, ring documents with their row cuts and ragged block plans, linear-attention
    runs) once per step, whatever the number of layers."""
    results = {}
    for pattern in ("LS", "LSLS"):
        want_loss, want_grads = _train_step(_model(pattern), _batch(LENGTHS_B))
        for counts, loss, grads in distributed(4, _two_d_worker, pattern):
            (*step_a, builds_a), (*step_b, builds_b), (*per_call, _) = counts
            assert (step_a, builds_a) == (step_b, builds_b)  # per step, whatever the ids
            results.setdefault(pattern, []).append((step_b, builds_b, per_call))
            assert loss == pytest.approx(want_loss, rel=1e-5)
            for name, grad in want_grads.items():
                scale = grad.abs().max().clamp(min=1e-6)
                torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=0, atol=2e-5, msg=name)
    for (step_2, builds_2, per_call_2), (step_4, builds_4, per_call_4) in zip(results["LS"], results["LSLS"]):
        # (plans, row cuts) of the ring blocks this rank computes, the same for 2 and 4 layers.
        assert step_2 == step_4 and min(step_2) > 0 and builds_2 == builds_4
        assert builds_2 == {
            "checked": 2,  # the rank's ids, and the ring-ordered gathered ids TokenRing is given
            "ulysses gathered ids": 1,
            "ring order": 1,
            "ring documents": 1,
            "linear attention runs": 1,
        }
        # Per call (without the cache): grows with the layers.
        assert all(four > two > once for four, two, once in zip(per_call_4, per_call_2, step_2))
