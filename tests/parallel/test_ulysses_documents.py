"""Ulysses over packed documents (parallel/ulysses_documents.py): documents inside one shard are attended
where they lie, the ones crossing shard edges through an uneven exchange, against the fp64 reference."""

import pytest
import torch
import torch.distributed as dist

from longloom.attention.reference import reference_attention
from longloom.parallel import ulysses, ulysses_documents
from longloom.parallel.sharding import shard_sequence, unshard_tensors
from longloom.parallel.ulysses import ulysses_attention
from longloom.parallel.ulysses_documents import plan_document_split
from tests.parallel.documents import lengths_to_ids, packed_document_ids

HEADS, SEQ, DIM = 8, 64, 8
TOLERANCE = 2e-5


def test_split_keeps_whole_documents_in_the_middle_and_sends_the_crossing_ones(monkeypatch):
    monkeypatch.setattr(ulysses_documents, "DOCUMENT_LOCAL_BALANCE", 1e9)  # this layout is lopsided
    # 4 shards of 16: documents [0,10) [10,30) [30,31) [31,48) [48,64).
    ids = lengths_to_ids([10, 20, 1, 17, 16])[None]
    split = plan_document_split(ids, 4, 1, True)
    # Rank 0: [0,10) local, [10,16) crosses out. Rank 1: [16,30) crosses in, [30,31) local, [31,32) out.
    # Rank 2: [32,48) crossed in, whole. Rank 3: [48,64) local (a boundary exactly on the shard edge).
    assert split.middles == ((0, 10), (14, 15), (16, 16), (0, 16))
    assert split.edge_rows() == [6, 15, 16, 0]
    assert split.local_ids.tolist() == [[2]]  # rank 1's middle: the one-token document
    assert split.edge_ids.tolist() == [[1] * 20 + [3] * 17]  # both crossing documents, in order
    assert plan_document_split(ids.repeat(2, 1), 4, 1, True) is None  # B > 1: plain exchange
    assert plan_document_split(torch.zeros(1, SEQ, dtype=torch.long), 4, 0, True) is None  # all cross


def test_split_gives_way_to_the_plain_exchange_when_ranks_would_be_out_of_balance():
    lopsided = lengths_to_ids([16] + [1] * 48)[None]  # rank 0 holds one 16-token document, the rest 1s
    assert plan_document_split(lopsided, 4, 0, True) is None
    even = lengths_to_ids([8] * 8)[None]
    split = plan_document_split(even, 4, 2, True)
    assert split.middles == ((0, 16),) * 4 and split.edge_rows() == [0] * 4


def _worker(ids, kv_heads, causal, balance):
    """Runs Ulysses fwd+bwd; returns this rank's (out, dq, dk, dv), how many all-to-alls ran and whether
    the document-local split ran."""
    ulysses_documents.DOCUMENT_LOCAL_BALANCE = balance
    exchanges, splits = [], []
    original, original_split = dist.all_to_all_single, ulysses.document_local_attention

    def counted(*args, **kwargs):
        exchanges.append(1)
        return original(*args, **kwargs)

    def split_ran(*args, **kwargs):
        splits.append(1)
        return original_split(*args, **kwargs)

    dist.all_to_all_single, ulysses.document_local_attention = counted, split_ran
    try:
        group = dist.group.WORLD
        generator = torch.Generator().manual_seed(11)
        full = [
            torch.randn(1, SEQ, heads, DIM, generator=generator, dtype=torch.float64)
            for heads in (HEADS, kv_heads, kv_heads, HEADS)
        ]
        q, k, v, dout = (shard_sequence(t, 1, group) for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ulysses_attention(q, k, v, group, causal, document_ids=shard_sequence(ids, 1, group))
        out.backward(dout)
        return [t.detach() for t in (out, q.grad, k.grad, v.grad)], len(exchanges), bool(splits)
    finally:
        dist.all_to_all_single, ulysses.document_local_attention = original, original_split


def _reference(ids, kv_heads, causal):
    generator = torch.Generator().manual_seed(11)
    q, k, v, dout = (
        torch.randn(1, SEQ, heads, DIM, generator=generator, dtype=torch.float64)
        for heads in (HEADS, kv_heads, kv_heads, HEADS)
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, causal, document_ids=ids)
    out.backward(dout)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _assert_exact(per_rank, want):
    for index, expected in enumerate(want):
        got = unshard_tensors([rank[0][index] for rank in per_rank], 1, "contiguous")
        error = (got - expected).abs().max().item()
        assert error <= TOLERANCE * expected.abs().max().item(), f"tensor {index}: max abs error {error:.3g}"


@pytest.mark.parametrize(
    "world_size, kv_heads, causal", [(2, 8, True), (4, 2, True), (4, 4, False), (8, 1, True)]
)
def test_documents_inside_their_shards_need_no_exchange(distributed, world_size, kv_heads, causal):
    ids = lengths_to_ids([SEQ // world_size // 2] * world_size * 2)[None]  # two documents per shard
    per_rank = distributed(
        world_size, _worker, ids, kv_heads, causal, ulysses_documents.DOCUMENT_LOCAL_BALANCE
    )
    _assert_exact(per_rank, _reference(ids, kv_heads, causal))
    assert [(count, split) for _, count, split in per_rank] == [(0, True)] * world_size


@pytest.mark.parametrize(
    "world_size, kv_heads, causal", [(2, 2, True), (4, 8, False), (4, 2, True), (8, 1, True)]
)
def test_crossing_documents_go_through_the_exchange(distributed, monkeypatch, world_size, kv_heads, causal):
    """Both rows of the boundary cases (a one-token document, one ending on a shard edge, one longer than
    a shard, many short ones; random lengths), with the balance bound lifted so the split always runs:
    where documents cross, q, k, v travel in one all-to-all and out in another, in forward and in
    backward (4) however many cross; where none does, nothing travels."""
    monkeypatch.setattr(ulysses_documents, "DOCUMENT_LOCAL_BALANCE", 1e9)
    crossing_seen = False
    for row in (0, 1):
        ids = packed_document_ids(SEQ, world_size, seed=world_size)[row : row + 1]
        crossing = sum(plan_document_split(ids, world_size, 0, causal).edge_rows()) > 0
        crossing_seen |= crossing
        per_rank = distributed(world_size, _worker, ids, kv_heads, causal, 1e9)
        _assert_exact(per_rank, _reference(ids, kv_heads, causal))
        expected = 4 if crossing else 0
        assert [(count, split) for _, count, split in per_rank] == [(expected, True)] * world_size
    assert crossing_seen
