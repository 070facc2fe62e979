"""Packed documents under every sequence-parallel method, against the fp64 single-device reference.

Document ids (tests/parallel/documents.py) hold a one-token document, a boundary exactly on a chunk
edge, a document longer than a shard, boundaries inside (zigzag half-)chunks and many short documents
per shard; the second batch row has random lengths. Forward and q/k/v gradients are compared.
"""

import pytest
import torch
import torch.distributed as dist

from longloom.attention.reference import reference_attention, reference_linear_attention
from longloom.parallel import ParallelDims, tokenring
from longloom.parallel.lasp2 import lasp2_linear_attention
from longloom.parallel.ring_baseline import ring_attention
from longloom.parallel.sharding import chunks_per_rank, shard_sequence, shard_tensor, unshard_tensors
from longloom.parallel.tokenring import tokenring_attention
from longloom.parallel.two_d import sequence_parallel_attention
from longloom.parallel.ulysses import ulysses_attention
from tests.parallel.documents import lengths_to_ids, packed_document_ids

SEQ, HEADS, DIM = 64, 8, 8
TOLERANCE = 2e-5


def _inputs(seed, kv_heads, dim_v=DIM):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, SEQ, HEADS, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(2, SEQ, kv_heads, DIM, generator=generator, dtype=torch.float64)
    v = torch.randn(2, SEQ, kv_heads, dim_v, generator=generator, dtype=torch.float64)
    dout = torch.randn(2, SEQ, HEADS, dim_v, generator=generator, dtype=torch.float64)
    return q, k, v, dout


def _softmax_reference(q, k, v, dout, ids, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, causal, document_ids=ids)
    out.backward(dout)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _assert_close(per_rank, layout, want, what):
    for index, (name, expected) in enumerate(zip(("out", "dq", "dk", "dv"), want)):
        got = unshard_tensors([rank[index] for rank in per_rank], 1, layout).double()
        scale = expected.abs().max().item()
        error = (got - expected).abs().max().item()
        assert error <= TOLERANCE * scale, (
            f"{what} {name}: max abs err {error:.3g} > {TOLERANCE} x {scale:.3g}"
        )


def _softmax_worker(method, seed, kv_heads, causal, layout, ids, ulysses=1, ring=1):
    q, k, v, dout = (t[: ids.size(0)] for t in _inputs(seed, kv_heads))  # ids of one row: B = 1
    if method == "2d":
        dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
        layout = dims.layout
    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    local = [shard_tensor(t.float(), 1, rank, world, layout).requires_grad_() for t in (q, k, v)]
    local_ids = shard_tensor(ids, 1, rank, world, layout)
    if method == "ulysses":
        out = ulysses_attention(*local, group, causal, document_ids=local_ids)
    elif method == "tokenring":
        out = tokenring_attention(*local, group, causal, layout, document_ids=local_ids)
    elif method == "ring":
        out = ring_attention(*local, group, causal, layout, document_ids=local_ids)
    else:
        out = sequence_parallel_attention(*local, dims=dims, causal=causal, document_ids=local_ids)
    out.backward(shard_tensor(dout.float(), 1, rank, world, layout))
    return out.detach(), local[0].grad, local[1].grad, local[2].grad


SOFTMAX_CASES = [
    # method, world, layout, causal, kv_heads, (ulysses, ring)
    ("ulysses", 2, "contiguous", True, 8, (1, 1)),
    ("ulysses", 4, "contiguous", False, 2, (1, 1)),
    ("ulysses", 8, "contiguous", True, 1, (1, 1)),  # K/V heads replicated
    ("tokenring", 2, "zigzag", True, 2, (1, 1)),
    ("tokenring", 4, "zigzag", True, 8, (1, 1)),
    ("tokenring", 4, "contiguous", False, 2, (1, 1)),
    ("tokenring", 8, "zigzag", False, 4, (1, 1)),
    ("tokenring", 8, "zigzag", True, 2, (1, 1)),
    ("ring", 2, "contiguous", False, 8, (1, 1)),
    ("ring", 4, "zigzag", True, 2, (1, 1)),
    ("ring", 8, "zigzag", True, 4, (1, 1)),
    ("2d", 4, "zigzag", True, 2, (2, 2)),
    ("2d", 4, "zigzag", False, 8, (2, 2)),
    ("2d", 8, "zigzag", True, 1, (2, 4)),
    ("2d", 8, "zigzag", True, 4, (4, 2)),
]


@pytest.mark.parametrize(
    "method, world_size, layout, causal, kv_heads, split",
    [pytest.param(*case, id=f"{case[0]}-P{case[1]}-{case[2]}-{'causal' if case[3] else 'full'}-kv{case[4]}")
     for case in SOFTMAX_CASES],
)  # fmt: skip
def test_softmax_methods_mask_documents(distributed, method, world_size, layout, causal, kv_heads, split):
    seed = world_size * 7 + kv_heads
    ids = packed_document_ids(SEQ, world_size * chunks_per_rank(layout), seed)
    per_rank = distributed(world_size, _softmax_worker, method, seed, kv_heads, causal, layout, ids, *split)
    want = _softmax_reference(*_inputs(seed, kv_heads), ids, causal)
    _assert_close(per_rank, layout, want, f"{method} P={world_size}")


# With B = 1 the ring sends only the query rows a later rank needs (tokenring.travelling_rows), so
# the received Q buffers hold stale rows outside them: the one-row cases check nothing reads those.
ONE_ROW_CASES = [case for case in SOFTMAX_CASES if case[0] in ("tokenring", "2d", "ulysses")]


@pytest.mark.parametrize(
    "method, world_size, layout, causal, kv_heads, split",
    [pytest.param(*case, id=f"{case[0]}-P{case[1]}-{case[2]}-{'causal' if case[3] else 'full'}-kv{case[4]}")
     for case in ONE_ROW_CASES],
)  # fmt: skip
def test_ring_methods_with_one_batch_row_send_row_spans(
    distributed, method, world_size, layout, causal, kv_heads, split
):
    seed = world_size * 5 + kv_heads
    ids = packed_document_ids(SEQ, world_size * chunks_per_rank(layout), seed)[:1]
    per_rank = distributed(world_size, _softmax_worker, method, seed, kv_heads, causal, layout, ids, *split)
    q, k, v, dout = (t[:1] for t in _inputs(seed, kv_heads))
    want = _softmax_reference(q, k, v, dout, ids, causal)
    _assert_close(per_rank, layout, want, f"{method} P={world_size}, B=1")


def _traffic_worker(ids, causal):
    """Bytes this rank sends in TokenRing's forward and backward, B = 1, zigzag."""
    sent = {"forward": 0, "backward": 0}
    original = tokenring.RingComm.start

    def counted(self, sends, recvs, description="ring exchange"):
        kind = "forward" if "forward" in description else "backward"
        sent[kind] += sum(tensor.numel() * tensor.element_size() for tensor, _ in sends)
        return original(self, sends, recvs, description)

    tokenring.RingComm.start = counted
    try:
        q, k, v, dout = (t[:1] for t in _inputs(3, 2))
        rank, world = dist.get_rank(), dist.get_world_size()
        local = [shard_tensor(t.float(), 1, rank, world, "zigzag").requires_grad_() for t in (q, k, v)]
        local_ids = shard_tensor(ids, 1, rank, world, "zigzag")
        out = tokenring_attention(*local, dist.group.WORLD, causal, document_ids=local_ids)
        out.backward(shard_tensor(dout.float(), 1, rank, world, "zigzag"))
        return sent
    finally:
        tokenring.RingComm.start = original


def test_queries_travel_only_as_far_as_a_shared_document(distributed):
    """Q (and in backward Q, dO, O, lse) goes round the ring only to ranks that compute with it, and
    only the rows they need: documents inside one chunk send nothing; one document over chunks 0 and 1
    sends chunk 1's rows from rank 1 to rank 0 (3 hops round a ring of 4) and the partial back."""
    world, rows = 4, SEQ // 8  # zigzag: 8 chunks of 8 rows, rank r holds chunks r and 7 - r
    per_chunk = lengths_to_ids([rows] * 8).unsqueeze(0)
    assert distributed(world, _traffic_worker, per_chunk, True) == [{"forward": 0, "backward": 0}] * world
    crossing = per_chunk.clone()
    crossing[:, rows : 2 * rows] = crossing[:, :1]  # chunk 1 (rank 1's first rows) continues chunk 0's
    row_bytes, lse_bytes = HEADS * DIM * 4, HEADS * 4  # fp32 row of q / dO / O / out, of lse
    hop = {"forward": rows * row_bytes, "backward": 3 * rows * row_bytes + (SEQ // world) * lse_bytes}
    back_to_owner = {"forward": rows * (row_bytes + lse_bytes), "backward": rows * row_bytes}  # out+lse, dq
    # Rank 1 sends Q[1]'s rows to 2, 2 to 3, 3 to 0; rank 0 computes with them and returns its partial.
    assert distributed(world, _traffic_worker, crossing, True) == [back_to_owner, hop, hop, hop]


def _counting_worker(ids, causal):
    """Block pairs computed (forward, backward) by this rank, with and without documents."""
    calls = {"forward": 0, "backward": 0}
    originals = (tokenring.block_attention_forward, tokenring.block_attention_backward)

    def count(kind, function):
        def counted(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)

        return counted

    tokenring.block_attention_forward = count("forward", originals[0])
    tokenring.block_attention_backward = count("backward", originals[1])
    try:
        results = []
        for document_ids in (None, ids):
            calls.update(forward=0, backward=0)
            q, k, v, dout = _inputs(3, 2)
            rank, world = dist.get_rank(), dist.get_world_size()
            local = [shard_tensor(t.float(), 1, rank, world, "zigzag").requires_grad_() for t in (q, k, v)]
            local_ids = None if document_ids is None else shard_tensor(document_ids, 1, rank, world, "zigzag")
            out = tokenring_attention(*local, dist.group.WORLD, causal, document_ids=local_ids)
            out.backward(shard_tensor(dout.float(), 1, rank, world, "zigzag"))
            results.append(dict(calls))
        return results
    finally:
        tokenring.block_attention_forward, tokenring.block_attention_backward = originals


@pytest.mark.parametrize("causal", [True, False])
def test_block_pairs_without_a_shared_document_are_skipped(distributed, causal):
    """One document per zigzag chunk: no off-diagonal block pair shares a document, so each rank
    computes only its own block; one document crossing chunks 1 and 2 adds exactly that pair."""
    world = 4
    per_chunk = lengths_to_ids([SEQ // (2 * world)] * (2 * world)).unsqueeze(0).repeat(2, 1)
    results = distributed(world, _counting_worker, per_chunk, causal)
    for without, with_documents in results:
        assert without == {"forward": world, "backward": world}
        assert with_documents == {"forward": 1, "backward": 1}
    crossing = per_chunk.clone()
    crossing[:, SEQ // 8 : SEQ // 4] = crossing[:, :1]  # chunk 1 continues chunk 0's document (ranks 0, 1)
    results = distributed(world, _counting_worker, crossing, causal)
    # Rank 0 holds chunk 0, rank 1 chunk 1; K/V stay put: rank 0 computes Q[1] on K[0], and when not
    # causal rank 1 also computes Q[0] on K[1].
    extra = [with_documents["forward"] - 1 for _, with_documents in results]
    assert extra == ([1, 0, 0, 0] if causal else [1, 1, 0, 0])


def _lasp2_worker(seed, with_decay, layout, ids):
    q, k, v, dout = (t.float() for t in _inputs(seed, HEADS, dim_v=6))
    decay = torch.linspace(0.8, 1.0, HEADS) if with_decay else None
    group = dist.group.WORLD
    q, k, v, dout, local_ids = (shard_sequence(t, 1, group, layout) for t in (q, k, v, dout, ids))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = lasp2_linear_attention(q, k, v, group, decay=decay, layout=layout, document_ids=local_ids)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    "world_size, layout, with_decay",
    [
        (2, "zigzag", True),
        (4, "contiguous", False),
        (4, "zigzag", False),
        (8, "zigzag", True),
        (8, "contiguous", True),
    ],
)
def test_lasp2_restarts_state_and_decay_at_documents(distributed, world_size, layout, with_decay):
    ids = packed_document_ids(SEQ, world_size * chunks_per_rank(layout), world_size)
    per_rank = distributed(world_size, _lasp2_worker, 5, with_decay, layout, ids)
    q, k, v, dout = _inputs(5, HEADS, dim_v=6)
    decay = torch.linspace(0.8, 1.0, HEADS).double() if with_decay else None
    leaves = [t.float().double().requires_grad_() for t in (q, k, v)]
    out = reference_linear_attention(*leaves, decay, document_ids=ids)
    out.backward(dout.float().double())
    _assert_close(per_rank, layout, [out.detach()] + [leaf.grad for leaf in leaves], f"lasp2 P={world_size}")


def _bad_ids_worker():
    world = dist.get_world_size()
    q = torch.zeros(1, 4, 4, 8)
    decreasing = torch.tensor([[0, 1, 1, 0]])
    dims = ParallelDims.build(dp=1, ulysses=world)
    for name, call in (
        ("ulysses_attention", lambda ids: ulysses_attention(q, q, q, dist.group.WORLD, document_ids=ids)),
        ("tokenring_attention", lambda ids: tokenring_attention(q, q, q, dist.group.WORLD, document_ids=ids)),
        ("ring_attention", lambda ids: ring_attention(q, q, q, dist.group.WORLD, document_ids=ids)),
        (
            "sequence_parallel_attention",
            lambda ids: sequence_parallel_attention(q, q, q, dims, document_ids=ids),
        ),
        (
            "lasp2_linear_attention",
            lambda ids: lasp2_linear_attention(q, q, q, dist.group.WORLD, document_ids=ids),
        ),
    ):
        with pytest.raises(
            ValueError, match=rf"{name}: document_ids decrease at local position 3.*never decrease"
        ):
            call(decreasing)
        with pytest.raises(
            ValueError, match=rf"{name}: document_ids has shape \(1, 3\) but q is \(1, 4, 4, 8\)"
        ):
            call(torch.zeros(1, 3, dtype=torch.long))
    return world


def test_bad_document_ids_raise_value_error(distributed):
    assert distributed(2, _bad_ids_worker) == [2, 2]


def test_lasp2_triton_scan_restarts_at_documents():
    """The CUDA path's local scan (Triton, here interpreted) per document, zigzag chunks, with decay."""
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 24, 2, 4, generator=generator) for _ in range(4))
    ids = lengths_to_ids([1, 7, 3, 13])[None]  # a one-token document; boundaries inside both zigzag chunks
    decay = torch.tensor([0.9, 1.0])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lasp2_linear_attention(
        *leaves, None, decay=decay, layout="zigzag", backend="triton", document_ids=ids
    )
    out.backward(dout)
    reference = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference_linear_attention(*reference, decay.double(), document_ids=ids)
    want.backward(dout.double())
    for got, expected in zip((out, *(t.grad for t in leaves)), (want, *(t.grad for t in reference))):
        assert (got.double() - expected).abs().max() <= TOLERANCE * expected.abs().max()
