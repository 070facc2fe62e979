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
