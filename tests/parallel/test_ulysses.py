import functools

import pytest
import torch
import torch.distributed as dist

from longloom.attention.reference import reference_attention
from longloom.parallel import ParallelDims, ulysses
from longloom.parallel.sharding import shard_sequence, unshard_tensors
from longloom.parallel.ulysses import (
    heads_to_seq,
    kv_head_replication,
    qkv_seq_to_heads,
    seq_to_heads,
    ulysses_attention,
)
from tests.parallel.documents import packed_document_ids

QUERY_HEADS, SEQ, HEAD_DIM, BATCH = 8, 64, 8, 2
TOLERANCE = 2e-5  # max abs error allowed, relative to the largest magnitude of the fp64 reference


def _inputs(kv_heads: int, seed: int, batch: int = BATCH, seq: int = SEQ):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, QUERY_HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, kv_heads, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, kv_heads, HEAD_DIM, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, seq, QUERY_HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _reference(q, k, v, dout, causal, softmax_scale=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _ulysses_worker(full_inputs, causal, dtype, softmax_scale=None):
    """Shards the full q/k/v/dout, runs ulysses forward + backward, returns the local out/dq/dk/dv."""
    group = dist.group.WORLD
    q, k, v, dout = (shard_sequence(t, 1, group).to(dtype) for t in full_inputs)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ulysses_attention(q, k, v, group=group, causal=causal, softmax_scale=softmax_scale)
    out.backward(dout)
    return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)]


def _gather(results):
    """Per-rank [out, dq, dk, dv] -> full-sequence tensors."""
    return [unshard_tensors([rank[i] for rank in results], 1, "contiguous") for i in range(4)]


def _assert_close(got, want, tolerance, what):
    scale = want.abs().max().item()
    error = (got - want).abs().max().item()
    assert error <= tolerance * scale, (
        f"{what}: max abs error {error:.3e} > {tolerance:.0e} x scale {scale:.3e}"
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ulysses_matches_single_device_fp64(distributed, world_size, causal):
    # Hkv = Hq (MHA), Hq/2, 1 (MQA): with P = 4 or 8, Hkv = 1 (and Hkv = 4 at P = 8) needs replication.
    for kv_heads in (QUERY_HEADS, QUERY_HEADS // 2, 1):
        full = _inputs(kv_heads, seed=world_size * 10 + kv_heads)
        want = _reference(*full, causal=causal)
        got = _gather(distributed(world_size, _ulysses_worker, full, causal, torch.float32))
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            _assert_close(g, w, TOLERANCE, f"P={world_size} Hkv={kv_heads} causal={causal} {name}")


def test_ulysses_softmax_scale(distributed):
    full = _inputs(2, seed=7)
    want = _reference(*full, causal=True, softmax_scale=0.5)
    got = _gather(distributed(4, _ulysses_worker, full, True, torch.float32, 0.5))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, TOLERANCE, f"softmax_scale {name}")


def test_ulysses_bf16_error_is_that_of_single_device_bf16(distributed):
    full = _inputs(2, seed=3)
    want = _reference(*full, causal=True)
    single = _reference(*(t.bfloat16() for t in full), causal=True)
    got = _gather(distributed(4, _ulysses_worker, full, True, torch.bfloat16))
    for name, g, s, w in zip(("out", "dq", "dk", "dv"), got, single, want):
        single_error = (s.double() - w).abs().max().item()
        error = (g - w).abs().max().item()
        assert error <= 2 * single_error + 1e-6, (
            f"bf16 {name}: {error:.3e} vs single device {single_error:.3e}"
        )


def _subgroup_worker(full_by_replica, causal):
    """dp=2 x ulysses=2 on 4 ranks: each Ulysses group works on its own sequence."""
    dims = ParallelDims.build(dp=2, ulysses=2)
    full = full_by_replica[dims.dp_rank]
    group = dims.ulysses_group
    q, k, v, dout = (shard_sequence(t, 1, group).float() for t in full)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ulysses_attention(q, k, v, group=group, causal=causal)
    out.backward(dout)
    return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)]


def test_ulysses_on_subgroups(distributed):
    replicas = [_inputs(4, seed=11), _inputs(4, seed=12)]
    results = distributed(4, _subgroup_worker, replicas, True)
    for replica, full in enumerate(replicas):
        want = _reference(*full, causal=True)
        got = _gather(results[2 * replica : 2 * replica + 2])
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            _assert_close(g, w, TOLERANCE, f"replica {replica} {name}")


def _building_blocks_worker(x_full, y_full):
    """seq_to_heads gives this rank's head slice of the whole sequence; its gradient is heads_to_seq."""
    group = dist.group.WORLD
    world_size, rank = dist.get_world_size(), dist.get_rank()
    x = shard_sequence(x_full, 1, group).requires_grad_()
    heads = seq_to_heads(x, group)
    per_rank = x_full.size(2) // world_size
    expected = x_full[:, :, rank * per_rank : (rank + 1) * per_rank]
    # y is a cotangent in the head-sharded layout; d<seq_to_heads(x), y>/dx must be heads_to_seq(y).
    y = y_full[:, :, rank * per_rank : (rank + 1) * per_rank]
    (heads * y).sum().backward()
    round_trip = heads_to_seq(heads.detach(), group)
    return (
        torch.equal(heads.detach(), expected),
        torch.equal(round_trip, x.detach()),
        torch.equal(x.grad, heads_to_seq(y, group)),
        torch.equal(x.grad, shard_sequence(y_full, 1, group)),
    )


@pytest.mark.parametrize("world_size", [2, 4])
def test_seq_to_heads_and_back_are_exact_permutations(distributed, world_size):
    g = torch.Generator().manual_seed(5)
    x_full = torch.randn(2, 16, 8, 4, generator=g)
    y_full = torch.randn(2, 16, 8, 4, generator=g)
    for rank, checks in enumerate(distributed(world_size, _building_blocks_worker, x_full, y_full)):
        assert all(checks), f"rank {rank}: {checks}"


def _send_in_place_worker():
    """heads_to_seq of one contiguous B = 1 tensor sends from it (it is its own send layout); otherwise packs."""
    from longloom.parallel import ulysses_pipeline

    group, world_size = dist.group.WORLD, dist.get_world_size()
    packs = []
    original = ulysses_pipeline.pack_heads_to_seq

    def counting(tensors, send):
        packs.append(tensors[0].size(0))
        return original(tensors, send)

    ulysses_pipeline.pack_heads_to_seq = counting
    try:
        results = []
        for batch in (1, 2):
            x = torch.randn(batch, 16, 8, 4, generator=torch.Generator().manual_seed(batch))
            heads = seq_to_heads(x, group)
            strided = heads.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] memory: packed
            results += [
                torch.equal(heads_to_seq(heads, group), x),
                torch.equal(heads_to_seq(strided, group), x),
            ]
    finally:
        ulysses_pipeline.pack_heads_to_seq = original
    return all(results), packs, world_size


def test_heads_to_seq_sends_a_contiguous_single_sample_without_packing(distributed):
    for exact, packs, _ in distributed(2, _send_in_place_worker):
        # B = 1 contiguous: no pack; B = 1 strided, and B = 2 both ways: packed. Results exact either way.
        assert exact and packs == [1, 2, 2]


def _collective_count_worker(kv_heads):
    """Counts all-to-alls: q/k/v must travel in one collective forward and one backward."""
    group = dist.group.WORLD
    calls = []
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append("a2a")
        return original(*args, **kwargs)

    q = torch.randn(1, 8, 8, 4, requires_grad=True)
    k = torch.randn(1, 8, kv_heads, 4, requires_grad=True)
    v = torch.randn(1, 8, kv_heads, 4, requires_grad=True)
    ulysses.dist.all_to_all_single = counting
    try:
        out = ulysses_attention(q, k, v, group=group)
        forward_calls = len(calls)
        out.sum().backward()
    finally:
        ulysses.dist.all_to_all_single = original
    return forward_calls, len(calls) - forward_calls


def test_one_all_to_all_each_way_for_qkv(distributed):
    for forward_calls, backward_calls in distributed(2, _collective_count_worker, 2):
        assert (forward_calls, backward_calls) == (2, 2)


def test_kv_head_replication_rules():
    assert kv_head_replication(32, 8, 8) == 1
    assert kv_head_replication(32, 8, 4) == 1
    assert kv_head_replication(32, 2, 8) == 4
    assert kv_head_replication(8, 1, 8) == 8
    with pytest.raises(ValueError, match=r"model\.heads = 6 .*parallel\.ulysses = 4"):
        kv_head_replication(6, 6, 4)
    with pytest.raises(ValueError, match=r"model\.kv_heads = 6 .*parallel\.ulysses = 4"):
        kv_head_replication(12, 6, 4)
    with pytest.raises(ValueError, match=r"model\.kv_heads"):
        kv_head_replication(8, 3, 2)


def _bad_sizes_worker():
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=r"model\.heads = 6 is not divisible by parallel\.ulysses = 4"):
        ulysses_attention(torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), group)
    with pytest.raises(ValueError, match=r"model\.kv_heads = 6"):
        ulysses_attention(torch.randn(1, 4, 12, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), group)
    with pytest.raises(ValueError, match=r"model\.heads must be divisible by model\.kv_heads"):
        ulysses_attention(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), group)
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        heads_to_seq(torch.randn(1, 6, 2, 8), group)
    # Nothing above reached a collective; this one must still work on every rank.
    q_heads, k_heads, _ = qkv_seq_to_heads(
        torch.randn(1, 4, 8, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), group
    )
    return tuple(q_heads.shape), tuple(k_heads.shape)


def test_bad_sizes_raise(distributed):
    for q_shape, k_shape in distributed(4, _bad_sizes_worker):
        assert q_shape == (1, 16, 2, 8) and k_shape == (1, 16, 1, 8)


def test_single_rank_is_plain_attention():
    full = _inputs(4, seed=1, seq=16)
    q, k, v = (t.float().requires_grad_() for t in full[:3])
    out = ulysses_attention(q, k, v, group=None, causal=True)
    out.backward(full[3].float())
    want = _reference(*full, causal=True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), want):
        _assert_close(g.detach().double(), w, TOLERANCE, name)


def _custom_local_attention_worker(full, causal):
    """local_attention receives the gathered [B, S, H/P, D] tensors; the reference math is plugged in."""
    group = dist.group.WORLD
    q, k, v, dout = (shard_sequence(t, 1, group).float() for t in full)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shapes = []

    def local(q_heads, k_heads, v_heads):
        shapes.append((tuple(q_heads.shape), tuple(k_heads.shape)))
        return reference_attention(q_heads, k_heads, v_heads, causal=causal)

    out = ulysses_attention(q, k, v, group=group, local_attention=local)
    out.backward(dout)
    return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)], shapes


def test_custom_local_attention(distributed):
    full = _inputs(2, seed=9)
    results = distributed(4, _custom_local_attention_worker, full, False)
    assert all(shapes == [((BATCH, SEQ, 2, HEAD_DIM), (BATCH, SEQ, 1, HEAD_DIM))] for _, shapes in results)
    got = _gather([outputs for outputs, _ in results])
    want = _reference(*full, causal=False)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(g, w, TOLERANCE, f"custom local attention {name}")


# Head-chunked pipelining (parallel/ulysses_pipeline.py): exchange of one head chunk overlaps attention
# of another. Each head is attended by the same kernel on the same numbers, so every C gives the SAME
# bits as C = 1, and both match the fp64 reference.


def _chunks_worker(full, causal, chunk_choices, dtype, ids_full=None, local_attention=None):
    """ulysses_attention forward + backward for each head_chunks value; per value the local out/dq/dk/dv."""
    group = dist.group.WORLD
    ids = None if ids_full is None else shard_sequence(ids_full, 1, group)
    results = {}
    for chunks in chunk_choices:
        q, k, v, dout = (shard_sequence(t, 1, group).to(dtype) for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ulysses_attention(
            q, k, v, group, causal, document_ids=ids, local_attention=local_attention, head_chunks=chunks
        )
        out.backward(dout)
        results[chunks] = [t.detach() for t in (out, q.grad, k.grad, v.grad)]
    return results


def _check_chunks(per_rank, chunk_choices, want, what, bit_identical=None):
    """Every C matches the reference; those in `bit_identical` (default: all) equal C = 1 bit for bit."""
    bit_identical = chunk_choices if bit_identical is None else bit_identical
    for chunks in chunk_choices:
        got = _gather([[t.double() for t in rank[chunks]] for rank in per_rank])
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            _assert_close(g, w, TOLERANCE, f"{what} head_chunks={chunks} {name}")
        for rank, results in enumerate(per_rank if chunks in bit_identical else []):
            for name, chunked, plain in zip(("out", "dq", "dk", "dv"), results[chunks], results[1]):
                assert torch.equal(chunked, plain), f"{what} rank {rank} head_chunks={chunks} {name} != C=1"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world_size", [2, 4])
def test_head_chunks_match_reference_and_are_bit_identical(distributed, world_size, causal):
    # K/V heads per rank: P=2: Hkv 8 -> 4 (C = 2, 4), Hkv 4 -> 2 (C = 2: 2 query heads per K/V head);
    # P=4: Hkv 8 -> 2 (C = 2). None (auto) is 1 at these sizes.
    for kv_heads in (8, 4) if world_size == 2 else (8,):
        choices = (1, 2, None) + ((4,) if kv_heads // world_size % 4 == 0 else ())
        full = _inputs(kv_heads, seed=world_size * 100 + kv_heads)
        want = _reference(*full, causal=causal)
        per_rank = distributed(world_size, _chunks_worker, full, causal, choices, torch.float64)
        _check_chunks(per_rank, choices, want, f"P={world_size} Hkv={kv_heads} causal={causal}")


def test_head_chunks_with_documents_and_custom_attention(distributed):
    full = _inputs(8, seed=21)
    ids = packed_document_ids(SEQ, chunks=2)
    leaves = [t.clone().requires_grad_() for t in full[:3]]
    out = reference_attention(*leaves, causal=True, document_ids=ids)
    out.backward(full[3])
    want = [out.detach()] + [leaf.grad for leaf in leaves]
    per_rank = distributed(2, _chunks_worker, full, True, (1, 2, 4), torch.float64, ids)
    # CPU's document attention is batched matmuls; at ONE head per call (C=4 here) BLAS takes another
    # kernel for the size-1 head dimension and rounds differently (1 ulp); at 2+ heads it is bit-exact.
    _check_chunks(per_rank, (1, 2, 4), want, "documents", bit_identical=(1, 2))
    custom = functools.partial(_reference_with_documents, causal=True)
    per_rank = distributed(2, _chunks_worker, full, True, (1, 2), torch.float64, ids, custom)
    _check_chunks(per_rank, (1, 2), want, "documents, custom local attention")


def _reference_with_documents(q, k, v, causal, document_ids):
    # A local_attention that takes the gathered ids (module level: sent to the worker processes).
    return reference_attention(q, k, v, causal=causal, document_ids=document_ids)


def _pipeline_collectives_worker(chunks):
    """All-to-alls in forward and backward with C chunks: one q/k/v and one output exchange per chunk."""
    calls, original = [], dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        calls.append(tuple(input.shape))
        return original(output, input, *args, **kwargs)

    g = torch.Generator().manual_seed(dist.get_rank())
    q = torch.randn(1, 8, 8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 8, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 8, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ulysses.dist.all_to_all_single = counting
    try:
        out = ulysses_attention(q, k, v, group=dist.group.WORLD, head_chunks=chunks)
        forward_calls = list(calls)
        out.sum().backward()
    finally:
        ulysses.dist.all_to_all_single = original
    with torch.no_grad():  # no graph is built; same result
        again = ulysses_attention(q, k, v, group=dist.group.WORLD, head_chunks=chunks)
    return forward_calls, calls[len(forward_calls) :], torch.equal(again, out.detach())


def test_head_chunks_issue_two_collectives_per_chunk_each_way(distributed):
    # P=2, S/P=8, Hq=8, Hkv=4: per rank 4 query and 2 K/V heads; C=2 chunks of 2 q + 1 k + 1 v heads.
    # Send buffers [P, B, S/P, heads, D].
    for forward_calls, backward_calls, no_grad_equal in distributed(2, _pipeline_collectives_worker, 2):
        assert forward_calls == [(2, 1, 8, 4, 4), (2, 1, 8, 4, 4), (2, 1, 8, 2, 4), (2, 1, 8, 2, 4)]
        # Backward: dout chunk 0, dout chunk 1 (issued before chunk 0's attention backward), dq/dk/dv.
        assert backward_calls == [(2, 1, 8, 2, 4), (2, 1, 8, 2, 4), (2, 1, 8, 4, 4), (2, 1, 8, 4, 4)]
        assert no_grad_equal


def _checkpoint_worker(chunks):
    """Non-reentrant activation checkpointing over the pipeline: same gradients, and the attention's
    saved tensors pass through the saved-tensor hooks (so checkpointing / offload can free them)."""
    from torch.utils.checkpoint import checkpoint

    group = dist.group.WORLD
    full = _inputs(8, seed=31)
    q, k, v, dout = (shard_sequence(t, 1, group) for t in full)
    results, packed_bytes = [], []
    for use_checkpoint in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        total = [0]

        def pack(tensor, total=total):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if use_checkpoint:
                out = checkpoint(ulysses_attention, *leaves, group, use_reentrant=False, head_chunks=chunks)
            else:
                out = ulysses_attention(*leaves, group, head_chunks=chunks)
        out.backward(dout)
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
        packed_bytes.append(total[0])
    same = all(torch.equal(a, b) for a, b in zip(*results))
    return same, packed_bytes[0], results[0]


def test_head_chunks_under_activation_checkpointing(distributed):
    plain = distributed(2, _checkpoint_worker, 1)
    chunked = distributed(2, _checkpoint_worker, 2)
    for (same_1, bytes_1, results_1), (same_2, bytes_2, results_2) in zip(plain, chunked):
        assert same_1 and same_2, "checkpointed gradients differ from the plain run"
        # C=2 saves the same attention activations as C=1 (per chunk), all through the hooks.
        assert bytes_2 >= bytes_1 > 0, (bytes_1, bytes_2)
        assert all(torch.equal(a, b) for a, b in zip(results_1, results_2))


def test_choose_head_chunks_and_bad_values():
    from longloom.parallel.ulysses import resolve_head_chunks
    from longloom.parallel.ulysses_pipeline import MIN_ROWS_PER_CHUNK, choose_head_chunks

    # Llama-3-8B on 2 ranks: 16 query / 4 K/V heads per rank.
    assert choose_head_chunks(1, 65536, 16, 4) == 4
    assert choose_head_chunks(1, 16384, 16, 4) == 2  # 4 query heads x 16K rows per call is too small
    assert choose_head_chunks(1, 4096, 16, 4) == 1
    assert choose_head_chunks(1, 1 << 20, 16, 1) == 1  # one K/V head per rank cannot be split
    assert choose_head_chunks(1, 1 << 20, 4, 2) == 2
    assert choose_head_chunks(2, MIN_ROWS_PER_CHUNK // 2, 4, 4) == 4
    assert resolve_head_chunks(2, 1, 64, 4, 2) == 2
    for bad in (0, 3):
        with pytest.raises(ValueError, match=rf"head_chunks = {bad} .* 4 K/V heads"):
            resolve_head_chunks(bad, 1, 64, 8, 4)


def _replicated_kv_worker():
    # Hkv = 1 < P = 2: each rank gets one replicated K/V head, which cannot be split into chunks.
    q, k = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match=r"head_chunks = 2 .* 1 K/V heads"):
        ulysses_attention(q, k, k, dist.group.WORLD, head_chunks=2)
    return tuple(ulysses_attention(q, k, k, dist.group.WORLD, head_chunks=None).shape)


def test_head_chunks_with_replicated_kv_heads(distributed):
    assert distributed(2, _replicated_kv_worker) == [(1, 4, 8, 8)] * 2


def _second_backward_worker():
    q = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = ulysses_attention(q, q, q, dist.group.WORLD, head_chunks=2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second backward .* head_chunks=1"):
        out.sum().backward()
    return True


def test_head_chunks_second_backward_says_what_to_do(distributed):
    assert distributed(2, _second_backward_worker) == [True, True]
