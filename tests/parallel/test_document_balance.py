"""Documents reordered for the SP layout (zigzag; Ulysses' document-local split): exact rank work,
balance reached, and a pure permutation."""

import numpy as np
import pytest
import torch

from longloom.parallel.document_balance import (
    balance_documents,
    balanced_document_order,
    imbalance,
    ulysses_rank_work,
    zigzag_rank_work,
)
from longloom.parallel.sharding import shard_tensor
from tests.parallel.documents import packed_batch


def _lognormal_lengths(seq: int, mean: int, seed: int) -> list[int]:
    """Document lengths drawn as bench/documents.py's lognormal case (sigma 1), the last one cut."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < seq:
        draw = round(np.exp(np.log(mean) - 0.5 + rng.standard_normal()))
        lengths.append(min(max(1, draw), seq - sum(lengths)))
    return lengths


def _brute_force_work(lengths: list[int], world: int) -> list[int]:
    """Per rank: sum over its zigzag-sharded query tokens of the keys each attends to."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    starts = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
    keys_seen = torch.arange(ids.size(1)) - starts[ids[0]] + 1
    return [int(shard_tensor(keys_seen[None], 1, rank, world, "zigzag").sum()) for rank in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_work_equals_counting_every_query(world):
    for seed in range(5):
        lengths = _lognormal_lengths(48 * world, 10, seed)
        assert zigzag_rank_work(np.array(lengths), world).tolist() == _brute_force_work(lengths, world)
    # One document over the whole sequence: zigzag balances it by construction.
    assert imbalance(np.array([96]), 4) == 1.0


def test_lognormal_documents_of_the_benchmark_are_balanced_on_two_ranks():
    """256K tokens, mean 8K (issue 16's case b): zigzag alone leaves ranks apart, the order evens them."""
    ratios = []
    for seed in range(8):
        lengths = np.array(_lognormal_lengths(262144, 8192, seed))
        order = balanced_document_order(lengths, 2)
        assert sorted(order) == list(range(len(lengths)))
        ratios.append((imbalance(lengths, 2), imbalance(lengths[order], 2)))
    assert max(after for _, after in ratios) <= 1.01, ratios
    assert max(before for before, _ in ratios) > 1.05, ratios  # the case is not trivially balanced


def test_order_never_spreads_the_work_more_than_the_original():
    for world in (4, 8):
        for seed in range(2):
            lengths = np.array(_lognormal_lengths(65536, 4096, seed))
            order = balanced_document_order(lengths, world)
            before, after = zigzag_rank_work(lengths, world), zigzag_rank_work(lengths[order], world)
            assert ((after - after.mean()) ** 2).sum() <= ((before - before.mean()) ** 2).sum()


def test_batch_is_permuted_by_whole_documents_and_ids_renumbered():
    lengths = [[1, 20, 3, 2, 6], [32], [9, 7, 16]]  # a one-token document; a row of one document
    batch = packed_batch(lengths)
    balanced = balance_documents(batch, 4)
    assert balanced.keys() == batch.keys()
    torch.testing.assert_close(balanced["tokens"][1], batch["tokens"][1])  # one document: unchanged
    for row, row_lengths in enumerate(lengths):
        ids = balanced["document_ids"][row]
        assert bool((ids[1:] >= ids[:-1]).all()) and int(ids[0]) == 0 and int(ids[-1]) == len(row_lengths) - 1
        # Each new document is one old document, moved whole: its tokens, labels and positions together.
        old_documents = {
            tuple(batch["tokens"][row][batch["document_ids"][row] == d].tolist()): d
            for d in range(len(row_lengths))
        }
        for new_id in range(len(row_lengths)):
            where = ids == new_id
            old_id = old_documents[tuple(balanced["tokens"][row][where].tolist())]
            was = batch["document_ids"][row] == old_id
            for name in ("labels", "position_ids"):
                assert balanced[name][row][where].tolist() == batch[name][row][was].tolist()
    # Deterministic: every rank of an SP group computes the same order from the same batch.
    again = balance_documents(batch, 4)
    assert all(torch.equal(again[name], balanced[name]) for name in batch)
    # No ids, or one rank: nothing to balance.
    assert balance_documents({"tokens": batch["tokens"]}, 4)["tokens"] is batch["tokens"]
    assert balance_documents(batch, 1)["tokens"] is batch["tokens"]


def test_parallel_dims_reorders_for_its_layout():
    """The trainer's call: zigzag splits (a ring) balance zigzag over every SP rank; Ulysses-only splits
    balance Ulysses' document-local split; without SP the order is kept."""
    from longloom.parallel import ParallelDims

    batch = packed_batch([[1, 20, 3, 2, 6]])
    ring = ParallelDims(dp=1, ulysses=2, ring=2, rank=0, world_size=4).balance_documents(batch)
    assert not torch.equal(ring["tokens"], batch["tokens"])
    assert all(torch.equal(ring[name], balance_documents(batch, 4)[name]) for name in batch)
    ulysses_only = ParallelDims(dp=1, ulysses=4, ring=1, rank=0, world_size=4).balance_documents(batch)
    expected = balance_documents(batch, 4, ulysses_rank_work)
    assert all(torch.equal(ulysses_only[name], expected[name]) for name in batch)
    assert ParallelDims(dp=4, ulysses=1, ring=1, rank=0, world_size=4).balance_documents(batch) is batch


@pytest.mark.parametrize("world_size, causal", [(2, True), (4, True), (4, False), (8, True)])
def test_ulysses_rank_work_is_the_work_of_the_document_local_split(monkeypatch, world_size, causal):
    """What the balancer counts is what parallel/ulysses_documents.py runs: each rank's middle documents
    with all heads, 1/P of the heads of the documents in the exchanged edge rows."""
    from longloom.parallel import ulysses_documents
    from longloom.parallel.ulysses_documents import plan_document_split
    from tests.parallel.documents import lengths_to_ids

    monkeypatch.setattr(ulysses_documents, "DOCUMENT_LOCAL_BALANCE", 1e9)
    lengths = _lognormal_lengths(4096, 300, seed=world_size)
    ids = lengths_to_ids(lengths)[None]

    def pairs(ids_row):
        runs = [(ids_row == value).sum().item() for value in torch.unique(ids_row)]
        return sum(n * (n + 1) / 2 if causal else n * n for n in runs)

    for rank in range(world_size):
        split = plan_document_split(ids, world_size, rank, causal)
        run = pairs(split.local_ids[0]) + pairs(split.edge_ids[0]) / world_size
        assert ulysses_rank_work(lengths, world_size, causal)[rank] == pytest.approx(run, rel=1e-12)


def test_ulysses_balance_evens_out_lognormal_documents():
    for seed in range(3):
        lengths = _lognormal_lengths(262144, 8192, seed)
        order = balanced_document_order(lengths, 2, rank_work=ulysses_rank_work)
        assert sorted(order) == list(range(len(lengths)))
        assert imbalance([lengths[i] for i in order], 2, ulysses_rank_work) <= 1.01
