import pytest
import torch

from longloom.parallel import ParallelDims
from longloom.parallel.sharding import shard_tensor, unshard_tensors
from longloom.parallel.two_d import (
    _super_chunks_to_zigzag_shards,
    _zigzag_shards_to_super_chunks,
    choose_ring_degree,
    ring_layer_cost,
    sequence_parallel_attention,
)
from tests.parallel.test_tokenring import make_inputs, reference_with_grads


def two_d_worker(dp, ulysses, ring, seed, kv_heads, causal):
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    q, k, v, dout = make_inputs(seed, kv_heads)
    local = [dims.shard_sequence(t.float()).requires_grad_() for t in (q, k, v)]
    out = sequence_parallel_attention(*local, dims=dims, causal=causal)
    out.backward(dims.shard_sequence(dout.float()))
    return out.detach(), local[0].grad, local[1].grad, local[2].grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "dp, ulysses, ring, kv_heads",
    [
        (1, 2, 2, 4),
        (1, 2, 2, 1),  # Hkv < U: Ulysses replicates K/V heads before the ring
        (1, 2, 4, 2),
        (1, 4, 2, 2),
        (2, 2, 2, 2),  # two SP groups side by side
        (2, 1, 1, 2),  # no SP: local attention
        (1, 2, 1, 2),  # Ulysses only
        (1, 1, 2, 2),  # TokenRing only
    ],
)
def test_sequence_parallel_attention_matches_reference(distributed, dp, ulysses, ring, kv_heads, causal):
    seed = 100 * ulysses + 10 * ring + kv_heads
    sp, layout = ulysses * ring, "zigzag" if ring > 1 else "contiguous"
    results = distributed(dp * sp, two_d_worker, dp, ulysses, ring, seed, kv_heads, causal)
    want = reference_with_grads(*make_inputs(seed, kv_heads), causal)
    for replica in range(dp):
        shards = results[replica * sp : (replica + 1) * sp]
        for index, expected in enumerate(want):
            got = unshard_tensors([shard[index] for shard in shards], 1, layout).double()
            scale = expected.abs().max().item()
            error = (got - expected).abs().max().item()
            assert error <= 2e-5 * scale, (
                f"tensor {index}, replica {replica}: max abs err {error} > 2e-5 * {scale}"
            )


@pytest.mark.parametrize("ulysses, ring", [(2, 2), (2, 4), (4, 2), (3, 2)])
def test_gathered_ulysses_shards_permute_to_ring_zigzag(ulysses, ring):
    """The docstring's claim: the permuted Ulysses gather is super-chunk zigzag over the ring."""
    sp = ulysses * ring
    tokens = torch.arange(2 * sp * 3).view(1, -1, 1, 1)
    for ring_rank in range(ring):
        gathered = torch.cat(
            [shard_tensor(tokens, 1, ring_rank * ulysses + u, sp, "zigzag") for u in range(ulysses)], dim=1
        )
        permuted = _zigzag_shards_to_super_chunks(gathered, ulysses)
        assert torch.equal(permuted, shard_tensor(tokens, 1, ring_rank, ring, "zigzag"))
        assert torch.equal(_super_chunks_to_zigzag_shards(permuted, ulysses), gathered)


def bad_dims_worker():
    dims = ParallelDims.build(dp=1, ulysses=2, ring=2)
    q = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"sequence length 12 .*parallel\.ring=2.*data\.seq_len"):
        sequence_parallel_attention(q, q, q, dims)
    dims.ring = 4  # groups built for another split
    q = torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"dims\.ring_group has 2 ranks but parallel\.ring=4"):
        sequence_parallel_attention(q, q, q, dims)
    return True


def test_mismatched_dims_and_indivisible_sequence_raise(distributed):
    assert all(distributed(4, bad_dims_worker))


def test_choose_ring_degree_follows_the_cost_model():
    # Ulysses cannot split 4 heads 8 ways: ring >= 2 whatever the cost.
    assert choose_ring_degree(8, heads=4, kv_heads=4, seq_len=8192) >= 2
    # Short sequences: ring transfers cannot hide behind tiny blocks, Ulysses alone wins.
    assert choose_ring_degree(8, heads=32, kv_heads=8, seq_len=8192) == 1
    # Very long sequences: ring transfers hide behind quadratic compute and beat the all-to-all volume.
    assert choose_ring_degree(8, heads=32, kv_heads=8, seq_len=1 << 20) == 8
    for sp, seq_len in ((16, 65536), (32, 262144)):
        chosen = choose_ring_degree(sp, heads=32, kv_heads=8, seq_len=seq_len)
        costs = {r: ring_layer_cost(sp, r, 32, 8, seq_len) for r in (1, 2, 4, 8, 16, 32) if sp % r == 0}
        assert costs[chosen] == min(costs.values())
    with pytest.raises(ValueError, match=r"data\.seq_len=100"):
        choose_ring_degree(8, heads=4, kv_heads=4, seq_len=100)


def test_the_public_import_path_parallel_hybrid_still_gives_the_2d_functions():
    # shared/DESIGN.md's contract `from longloom.parallel.hybrid import sequence_parallel_attention`.
    from longloom.parallel import hybrid, two_d

    for name in ("sequence_parallel_attention", "choose_ring_degree", "ring_layer_cost"):
        assert getattr(hybrid, name) is getattr(two_d, name), name
