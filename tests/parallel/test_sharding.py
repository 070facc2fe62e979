import pytest
import torch

from longloom.parallel import ParallelDims
from longloom.parallel.sharding import local_chunk_ids, shard_tensor, unshard_tensors


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_shard_unshard_round_trip(layout, world_size):
    x = torch.arange(2 * 48 * 3).view(2, 48, 3)
    parts = [shard_tensor(x, 1, rank, world_size, layout) for rank in range(world_size)]
    assert all(part.shape == (2, 48 // world_size, 3) for part in parts)
    assert torch.equal(unshard_tensors(parts, 1, layout), x)


def test_zigzag_holds_one_early_and_one_late_chunk():
    assert local_chunk_ids("zigzag", 0, 4) == [0, 7]
    assert local_chunk_ids("zigzag", 3, 4) == [3, 4]
    x = torch.arange(16)
    assert shard_tensor(x, 0, 1, 4, "zigzag").tolist() == [2, 3, 12, 13]


def test_indivisible_length_names_the_fix():
    with pytest.raises(ValueError, match="data.seq_len"):
        shard_tensor(torch.zeros(1, 10), 1, 0, 4, "contiguous")
    with pytest.raises(ValueError, match="layout"):
        shard_tensor(torch.zeros(1, 8), 1, 0, 2, "striped")


def _dims_worker(dp, ulysses, ring):
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    x = torch.arange(2 * dims.sp * 4).view(1, -1)
    local = dims.shard_sequence(x)
    full = dims.unshard_sequence(local)
    groups = {
        name: torch.distributed.get_process_group_ranks(getattr(dims, name))
        for name in ("dp_group", "sp_group", "ulysses_group", "ring_group")
    }
    return torch.equal(full, x), groups, dims.ring_ranks, (dims.dp_rank, dims.ring_rank, dims.ulysses_rank)


def test_parallel_dims_groups(distributed):
    results = distributed(8, _dims_worker, 2, 2, 2)
    for rank, (round_trip, groups, ring_ranks, coords) in enumerate(results):
        assert round_trip
        assert coords == (rank // 4, (rank // 2) % 2, rank % 2)
        assert groups["ulysses_group"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["sp_group"] == list(range(rank - rank % 4, rank - rank % 4 + 4))
        assert (
            groups["ring_group"]
            == ring_ranks
            == [rank - (rank % 4) + rank % 2, rank - (rank % 4) + rank % 2 + 2]
        )
        assert groups["dp_group"] == [rank % 4, rank % 4 + 4]


def _bad_dims_worker():
    with pytest.raises(ValueError, match="world size 2"):
        ParallelDims.build(dp=1, ulysses=4, ring=1)
    return True


def test_parallel_dims_rejects_wrong_product(distributed):
    assert all(distributed(2, _bad_dims_worker))


def test_document_ids_are_cut_with_the_tokens_and_stay_non_decreasing():
    """Zigzag holds an early and a late chunk, in sequence order: ids never decrease on any shard."""
    tokens = torch.arange(32).repeat(2, 1)
    ids = torch.tensor([0] * 5 + [1] * 20 + [2] * 7).repeat(2, 1)
    for rank in range(4):
        local_tokens, local_ids = (shard_tensor(t, 1, rank, 4, "zigzag") for t in (tokens, ids))
        assert torch.equal(local_ids, ids[:, local_tokens[0]])
        assert bool((local_ids[:, 1:] >= local_ids[:, :-1]).all())
