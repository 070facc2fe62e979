import pytest

from longloom.parallel.ring_baseline import ring_attention
from tests.parallel.test_tokenring import CASES, assert_matches_reference, make_inputs, ring_worker


@pytest.mark.parametrize("causal, layout, kv_heads", CASES)
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ring_baseline_matches_reference(distributed, world_size, causal, layout, kv_heads):
    seed = world_size * 10 + kv_heads + 1
    results = distributed(world_size, ring_worker, seed, kv_heads, causal, layout, 1, ring_attention)
    assert_matches_reference(results, *make_inputs(seed, kv_heads), causal, layout)


def test_ring_baseline_on_strided_subgroups(distributed):
    results = distributed(8, ring_worker, 5, 2, True, "zigzag", 2, ring_attention)
    assert_matches_reference(results, *make_inputs(5, 2), True, "zigzag", stride=2)
