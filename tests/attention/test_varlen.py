"""The ragged (varlen) plumbing of packed-document blocks, on CPU through the plain-torch emulation.

The GPU kernels (cuDNN ragged, flash varlen) plug into the same `ragged_forward` / `ragged_backward`,
so these tests pin the segment plan, the THD layouts, the lse layout and the rows without a partner;
tests/gpu/test_varlen_cuda.py checks each kernel on the GPU.
"""

import pytest
import torch

from longloom.attention.blocks import block_attention_backward, block_attention_forward
from longloom.attention.reference import attention_with_lse
from longloom.attention.varlen import EMULATED, ragged_backward, ragged_forward
from longloom.attention.varlen_plan import DenseGroup, dense_run_length, plan_segments
from longloom.parallel import sharding
from longloom.parallel.ring_plan import RingDocuments, plan_pair
from tests.parallel.documents import lengths_to_ids, packed_document_ids


def _dense_forward(q, k, v, causal, scale):
    return block_attention_forward(q, k, v, causal, scale, "torch")


def _dense_backward(dout, q, k, v, out, lse, causal, scale):
    return block_attention_backward(dout, q, k, v, out, lse, causal, scale, "torch")


def test_plan_segments_lays_out_documents_and_rows_without_partners():
    q_docs = torch.tensor([[2, 2, 3, 3, 3], [5, 5, 5, 5, 5]])
    k_docs = torch.tensor([[0, 1, 2, 2, 2], [4, 4, 5, 6, 6]])
    plan = plan_segments(q_docs, k_docs, causal=False)
    # Row 0: doc 0 (k 1), doc 1 (k 1), doc 2 (q 2, k 3), doc 3 (q 3); row 1: doc 4 (k 2), 5 (q 5, k 1), 6 (k 2).
    assert plan.cu_seqlens_q.tolist() == [0, 0, 0, 2, 5, 5, 10, 10]
    assert plan.cu_seqlens_k.tolist() == [0, 1, 2, 5, 5, 7, 8, 10]
    assert plan.cu_seqlens_q.dtype == torch.int32 and (plan.max_q, plan.max_k) == (5, 3)
    assert plan.queries_without_keys.tolist() == [False, False, True, True, True] + [False] * 5
    assert plan.keys_without_queries.tolist() == [
        True,
        True,
        False,
        False,
        False,
        True,
        True,
        False,
        True,
        True,
    ]
    assert plan.rectangle is None  # rows 0 and 1 share different rectangles


def test_plan_segments_finds_a_single_rectangle_and_refuses_misaligned_causal_blocks():
    q_docs = torch.tensor([[3, 3, 3, 4]])
    k_docs = torch.tensor([[1, 2, 3, 3]])
    assert plan_segments(q_docs, k_docs, False).rectangle == (slice(0, 3), slice(2, 4))
    ids = torch.tensor([[1, 1, 1, 1]])
    plan = plan_segments(ids, ids, True)
    assert plan.rectangle == (slice(0, 4), slice(0, 4)) and plan.queries_without_keys is None
    assert plan_segments(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 1]]), True) is None


def _check_block(q, k, v, q_docs, k_docs, causal, expect_rectangle=None, plan=None):
    """Emulated ragged block == fp64 reference with the document mask, forward and q/k/v grads."""
    plan = plan or plan_segments(q_docs, k_docs, causal)
    assert plan is not None
    if expect_rectangle is not None:
        assert (plan.rectangle is not None) == expect_rectangle
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = attention_with_lse(*leaves, causal, None, q_docs, k_docs)
    dout = torch.randn_like(want)
    want.backward(dout)
    scale = q.size(-1) ** -0.5
    out, lse = ragged_forward(q, k, v, plan, scale, EMULATED, _dense_forward)
    assert lse.shape == want_lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "rows without a key must have lse -inf"
    finite = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], rtol=0, atol=1e-10)
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=1e-10)
    # Given the final lse: a row without a key here has a finite lse from another block, and no grads here.
    final_lse = torch.where(finite, want_lse, torch.full_like(want_lse, 0.5)).detach()
    grads = ragged_backward(dout, q, k, v, want.detach(), final_lse, plan, scale, EMULATED, _dense_backward)
    assert not any(bool(g.isnan().any()) for g in grads)
    for got, expected in zip(grads, (x.grad for x in leaves)):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-10)
    return plan


def _qkv(batch, seq_q, seq_k, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq_k, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq_k, kv_heads, dim, generator=g, dtype=torch.float64)
    return q, k, v


BLOCKS = [
    pytest.param(slice(0, 40), slice(0, 40), True, id="diagonal-causal"),
    pytest.param(slice(0, 40), slice(0, 40), False, id="diagonal-full"),
    pytest.param(slice(20, 40), slice(0, 20), False, id="later-queries"),
    pytest.param(slice(0, 20), slice(13, 40), False, id="earlier-queries"),
]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_rows, k_rows, causal", BLOCKS)
def test_emulated_ragged_blocks_match_the_reference(q_rows, k_rows, causal, kv_heads):
    """B = 2 with different documents per row (one-token documents, rows with no key), GQA and MQA."""
    q, k, v = _qkv(2, 40, 40, kv_heads=kv_heads)
    ids = packed_document_ids(40, 4)
    _check_block(q[:, q_rows], k[:, k_rows], v[:, k_rows], ids[:, q_rows], ids[:, k_rows], causal)


@pytest.mark.parametrize("causal", [True, False])
def test_one_document_runs_the_dense_kernel_on_the_whole_block(causal):
    q, k, v = _qkv(1, 24, 24)
    ids = torch.zeros(1, 24, dtype=torch.long)
    _check_block(q, k, v, ids, ids, causal, expect_rectangle=True)


def test_keys_before_queries_share_one_rectangle():
    """Off the diagonal with B = 1 at most one document is shared: the dense kernel on its slices."""
    ids = lengths_to_ids([5, 20, 9, 14])[None]  # documents [0,5) [5,25) [25,34) [34,48)
    q, k, v = _qkv(1, 22, 16)
    plan = _check_block(q, k, v, ids[:, 26:], ids[:, 10:26], False, expect_rectangle=True)
    assert plan.rectangle == (slice(0, 8), slice(15, 16))  # document 2: queries 26..33, key 25


def test_long_documents_leave_the_ragged_call_for_the_dense_kernel():
    q_docs = torch.tensor([[0, 1, 1, 1, 1, 2, 2]])
    plan = plan_segments(q_docs, q_docs, True, dense_from=4)
    assert plan.dense_groups == (DenseGroup(0, slice(1, 5), slice(1, 5), 1),)
    # Document 1 becomes (4 queries, no key) + (no query, 4 keys): the ragged kernel skips it.
    assert plan.cu_seqlens_q.tolist() == [0, 1, 5, 5, 7] and plan.cu_seqlens_k.tolist() == [0, 1, 1, 5, 7]
    assert plan.ragged_work and plan.rectangle is None
    # Every row has a partner or a dense group's result: nothing is left to fill after the kernels.
    assert plan.queries_without_keys is None and plan.keys_without_queries is None
    only_long = plan_segments(torch.tensor([[3] * 5 + [4] * 5]), torch.tensor([[3] * 5 + [4] * 5]), True, 5)
    # Two long documents of equal length side by side: one dense call over both, as a batch of 2.
    assert not only_long.ragged_work and only_long.dense_groups == (
        DenseGroup(0, slice(0, 10), slice(0, 10), 2),
    )


@pytest.mark.parametrize("dense_from", [3, 8])
@pytest.mark.parametrize("q_rows, k_rows, causal", BLOCKS)
def test_long_documents_through_the_dense_kernel_match_the_reference(q_rows, k_rows, causal, dense_from):
    q, k, v = _qkv(2, 40, 40)
    ids = packed_document_ids(40, 4)
    q_docs, k_docs = ids[:, q_rows], ids[:, k_rows]
    plan = plan_segments(q_docs, k_docs, causal, dense_from=dense_from)
    if plan.rectangle is None and dense_from == 3:
        assert plan.dense_groups, "the case must send some document to the dense kernel"
    _check_block(q[:, q_rows], k[:, k_rows], v[:, k_rows], q_docs, k_docs, causal, plan=plan)


@pytest.mark.parametrize("world_size", [2, 4])
def test_zigzag_ring_blocks_match_the_reference(world_size):
    """Every (Q owner, K/V owner) block the ring plans for zigzag shards, segments from the host ids."""
    seq = 16 * world_size
    ids = packed_document_ids(seq, 2 * world_size, seed=3)
    q_full, k_full, v_full = _qkv(2, seq, seq, seed=1)
    shards = [
        [sharding.shard_tensor(t, 1, rank, world_size, "zigzag") for t in (ids, q_full, k_full, v_full)]
        for rank in range(world_size)
    ]
    host = torch.stack([shard[0] for shard in shards])
    documents = RingDocuments(host=host, device=host)
    blocks = 0
    for q_owner in range(world_size):
        for kv_owner in range(world_size):
            plan = plan_pair(q_owner, kv_owner, world_size, "zigzag", True, seq // world_size, documents)
            if plan is None:
                continue
            q = shards[q_owner][1][:, plan.q_rows]
            k, v = shards[kv_owner][2][:, plan.kv_rows], shards[kv_owner][3][:, plan.kv_rows]
            q_docs, kv_docs = host[q_owner][:, plan.q_rows], host[kv_owner][:, plan.kv_rows]
            # The plan the ring hands the block (from its host ids) is run against the reference.
            segments = documents.segment_plan(plan, q_owner, kv_owner)
            _check_block(q, k, v, q_docs, kv_docs, plan.causal, plan=segments)
            assert segments is documents.segment_plan(plan, q_owner, kv_owner)  # built once, for the backward
            blocks += 1
    assert blocks >= world_size


def test_equal_length_documents_side_by_side_form_one_dense_batch():
    # Documents 1-3 have 3 rows each (9 rows together): one batched dense group; 0 and 4 stay ragged.
    ids = lengths_to_ids([2, 3, 3, 3, 1])[None]
    plan = plan_segments(ids, ids, True, dense_from=100, batch_from=9, batch_min_length=2)
    assert plan.dense_groups == (DenseGroup(0, slice(2, 11), slice(2, 11), 3),)
    assert plan.ragged_work and plan.rectangle is None
    # Too few tokens together, or documents shorter than the minimum: all ragged.
    assert plan_segments(ids, ids, True, dense_from=100, batch_from=10, batch_min_length=2).dense_groups == ()
    assert plan_segments(ids, ids, True, dense_from=100, batch_from=9, batch_min_length=4).dense_groups == ()
    # Off the diagonal: the shared documents' key runs have their own (equal) length.
    q_docs, k_docs = torch.tensor([[1, 1, 2, 2, 3]]), torch.tensor([[0, 1, 1, 1, 2, 2, 2]])
    plan = plan_segments(q_docs, k_docs, False, dense_from=100, batch_from=4, batch_min_length=2)
    assert plan.dense_groups == (DenseGroup(0, slice(0, 4), slice(1, 7), 2),)


@pytest.mark.parametrize("causal", [True, False])
def test_equal_length_documents_filling_the_block_return_the_dense_results(causal):
    """Fixed-length packing cut at document edges: one dense batch is the whole block, and its results
    come back as they are (no block-sized output to fill and copy into)."""
    q, k, v = _qkv(1, 24, 24)
    ids = lengths_to_ids([6] * 4)[None]
    plan = plan_segments(ids, ids, causal, dense_from=100, batch_from=8, batch_min_length=2)
    assert plan.dense_groups == (DenseGroup(0, slice(0, 24), slice(0, 24), 4),) and not plan.ragged_work
    assert plan.queries_without_keys is None and plan.keys_without_queries is None
    _check_block(q, k, v, ids, ids, causal, plan=plan)
    results = {}  # the dense kernel's results, contiguous [count, L, H, D] as cuDNN's are

    def dense_forward(*args):
        out, lse = _dense_forward(*args)
        results["forward"] = out.contiguous(), lse
        return results["forward"]

    def dense_backward(*args):
        results["backward"] = tuple(grad.contiguous() for grad in _dense_backward(*args))
        return results["backward"]

    out, lse = ragged_forward(q, k, v, plan, 0.5, EMULATED, dense_forward)
    grads = ragged_backward(torch.randn_like(out), q, k, v, out, lse, plan, 0.5, EMULATED, dense_backward)
    for got, dense in zip((out, *grads), (results["forward"][0], *results["backward"])):
        assert got.data_ptr() == dense.data_ptr(), "a view of the dense result, not a copy"


@pytest.mark.parametrize("q_rows, k_rows, causal", BLOCKS[:2])
def test_equal_length_groups_through_the_dense_kernel_match_the_reference(q_rows, k_rows, causal):
    """Fixed-length packing with ragged ends: the batched dense call, the ragged rest and the overwrite.

    Diagonal blocks only: off the diagonal a row shares at most one document (the rectangle case)."""
    q, k, v = _qkv(2, 40, 40)
    ids = torch.stack([lengths_to_ids([3, 4, 4, 4, 4, 4, 4, 4, 4, 5]), lengths_to_ids([6] * 6 + [4])])
    q_docs, k_docs = ids[:, q_rows], ids[:, k_rows]
    plan = plan_segments(q_docs, k_docs, causal, dense_from=100, batch_from=8, batch_min_length=2)
    assert plan.rectangle is None and [group.count for group in plan.dense_groups] == [8, 6]
    _check_block(q[:, q_rows], k[:, k_rows], v[:, k_rows], q_docs, k_docs, causal, plan=plan)


def test_dense_run_lengths_form_a_coarse_grid():
    assert [dense_run_length(n) for n in (1, 31, 32, 8192, 8193, 8447, 8448, 262143)] == [
        1, 31, 32, 8192, 8448, 8448, 8448, 262144,
    ]  # fmt: skip
    runs = [dense_run_length(n) for n in range(8192, 262145)]
    assert len(set(runs)) == 5 * 32 + 1  # 32 lengths per power of two from 8K to 256K
    for length, run in zip(range(8192, 262145), runs):
        assert length <= run < length * (1 + 1 / 32) and dense_run_length(run) == run
    assert [dense_run_length(n, per_octave=2) for n in (5, 9, 13, 33)] == [6, 12, 16, 48]


def test_long_causal_documents_are_padded_to_the_grid_only_when_alone_and_off_it():
    ids = lengths_to_ids([3, 5, 4, 4])[None]
    plan = plan_segments(ids, ids, True, dense_from=5, batch_from=100, lengths_per_octave=2)
    assert plan.dense_groups == (DenseGroup(0, slice(3, 8), slice(3, 8), 1, padded_to=6),)
    exact = plan_segments(ids, ids, True, dense_from=5, batch_from=100, lengths_per_octave=0)
    assert exact.dense_groups == (DenseGroup(0, slice(3, 8), slice(3, 8), 1),)
    batched = plan_segments(ids, ids, True, dense_from=4, batch_from=8, lengths_per_octave=2)
    assert [group.padded_to for group in batched.dense_groups] == [6, None]  # 4 + 4: one batch of 2
    q_docs, k_docs = torch.tensor([[1] * 5 + [2] * 3]), torch.tensor([[0] * 4 + [1] * 5])
    rectangle = plan_segments(q_docs, k_docs, False, dense_from=5, lengths_per_octave=2)
    assert all(group.padded_to is None for group in rectangle.dense_groups)  # not causal: exact rows


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_padded_documents_match_the_reference(kv_heads):
    """Padded runs read the rows after a document where the block has them (a view) and zeros past
    its end (a copy); neither may change its output or let gradient reach it from the extra rows."""
    ids = torch.stack([lengths_to_ids([5, 9, 3, 13, 10]), lengths_to_ids([7, 33])])
    plan = plan_segments(ids, ids, True, dense_from=3, lengths_per_octave=2)
    padded = [
        (group.row, group.q_rows.start, group.padded_to) for group in plan.dense_groups if group.padded_to
    ]
    # Row 0: 5 -> 6, 9 -> 12, 13 -> 16 as views, 10 -> 12 past the block's end; row 1: 7 -> 8, 33 -> 48.
    assert padded == [(0, 0, 6), (0, 5, 12), (0, 17, 16), (0, 30, 12), (1, 0, 8), (1, 7, 48)]
    assert not plan.ragged_work
    q, k, v = _qkv(2, 40, 40, kv_heads=kv_heads)
    _check_block(q, k, v, ids, ids, True, plan=plan)


def test_document_shaped_non_causal_work_leaves_cudnn_for_flash(monkeypatch):
    """cuDNN builds a graph per new shape: the ragged path's dense work keeps it for the whole block and
    for causal (grid-padded) documents, and gives flash the non-causal parts shaped by the documents."""
    from longloom.attention import blocks

    calls = []

    def record(name):
        def kernel(*args):
            calls.append((name, args[-1]))  # (which pass, backend)

        return kernel

    monkeypatch.setattr(blocks, "select_backend", lambda q, documents=False: "cudnn")
    monkeypatch.setattr(blocks, "block_attention_forward", record("forward"))
    monkeypatch.setattr(blocks, "block_attention_backward", record("backward"))
    q, k, _ = _qkv(1, 240, 320, heads=1, kv_heads=1, dim=1)
    forward, backward = blocks._dense(q, k)
    forward(q, k, k, False, 1.0)  # the whole block, not causal: the schedule's shape
    forward(q[:, :101], k[:, 3:206], k[:, 3:206], False, 1.0)  # 101 x 203: off the grid (100, 200)
    backward(q[:, :101], q[:, :101], k[:, 3:206], k[:, 3:206], q[:, :101], None, False, 1.0)
    forward(q[:, :100], k[:, :200], k[:, :200], False, 1.0)  # on the grid: cuDNN has seen it
    forward(q[:, :101], q[:, :101], q[:, :101], True, 1.0)  # causal: padded to the grid before this
    assert calls == [
        ("forward", "cudnn"), ("forward", "flash"), ("backward", "flash"), ("forward", "cudnn"), ("forward", "cudnn"),
    ]  # fmt: skip


def test_a_rectangle_runs_on_grid_shapes_and_matches_the_reference(monkeypatch):
    """Queries padded to the grid against the longest grid run of keys, the last keys apart, merged:
    exact, forward and gradients (a grid of 2 per octave makes the small case split)."""
    import sys

    from longloom.attention import varlen_plan

    monkeypatch.setattr(varlen_plan, "DENSE_LENGTHS_PER_OCTAVE", 2)
    this_module = sys.modules[__name__]
    shapes, dense_forward = [], _dense_forward

    def recording_forward(q, k, v, causal, scale):
        shapes.append((q.size(1), k.size(1)))
        return dense_forward(q, k, v, causal, scale)

    monkeypatch.setattr(this_module, "_dense_forward", recording_forward)
    ids = lengths_to_ids([4, 30, 6])[None]  # document 1 holds rows 4..33
    q, k, v = _qkv(1, 20, 19)
    plan = _check_block(q, k, v, ids[:, 20:40], ids[:, 0:19], False, expect_rectangle=True)
    assert plan.rectangle == (slice(0, 14), slice(4, 19))  # 14 queries x 15 keys
    assert shapes == [(16, 12), (14, 3)]  # queries 14 -> 16 (zeros), keys 12 on the grid + the last 3
