"""Reorder the documents of a packed sample so the SP layout gives every rank the same attention work.

Why: zigzag (parallel/sharding.py) balances causal attention over a ring for ONE sequence: rank r holds
chunks r and 2P-1-r of 2P, an early and a late one. With document masking a query only sees the earlier
tokens of its own document, so a rank's work is the sum over its tokens of (position in document + 1),
and that depends on where the documents fall: a long document in a late chunk loads one rank alone
(measured at 256K tokens, P = 2, lognormal documents of mean 8K: max/mean 1.114 over the ranks).

What: under document masking the documents of a sample are independent: each token's loss depends only
on its own document's earlier tokens, its position id and its label, so any order of the documents gives
the same per-token losses (the summation order of the mean aside). `balance_documents` picks an order
whose zigzag chunks give every rank nearly the same work and moves tokens, labels, position ids and
document ids together, renumbering the ids so they still increase along the sequence. A "document" here
is a run of equal ids, so the cut pieces at a sample's ends move as units too.

How: a rank's work is exact in closed form from the run lengths (sums of arithmetic series at the chunk
boundaries), so one candidate order costs O(documents). A deterministic local search (seeded; every rank
of an SP group computes the same order from the same batch) starts from the best of three orders and
applies swaps and moves of single documents that do not increase the spread (sum of squared deviations
from the mean rank work), stopping at max/mean <= 1.001, after 500 candidates in a row without a lower
spread, or after 4000 in all.

Ulysses (contiguous shards, no ring): its all-to-all splits heads, so every rank does the same work
whatever the order, except where parallel/ulysses_documents.py attends documents inside a shard where
they lie (no exchange); `ulysses_rank_work` is that split's work, and the same search balances it.

Limits: one document much longer than a chunk carries quadratic work that no order can split between
ranks (splitting each document over the ranks, Megatron's per-sequence zigzag, would); the search then
does what an order can. Rows with one document are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from longloom.attention.linear_chunked import document_segments

# Candidate orders tried per sample at most. Measured on a loaded 2-core host (bench/documents.py's
# lognormal draws, mean 8K): 10-70 ms per 256K or 1M-token sample on 2 ranks, 0.1-4 s on 4-8 ranks where
# no order balances (one document carries most of the work); a step at these lengths takes tens of seconds.
SEARCH_CANDIDATES = 4000
GOOD_ENOUGH = 1.001  # max/mean rank work at which the search stops
GIVE_UP_AFTER = 500  # candidates in a row without a lower spread: a local minimum


def zigzag_rank_work(lengths: list[int] | np.ndarray, world_size: int) -> np.ndarray:
    """Causal document-masked attention work (query, key) pairs of each rank, [world_size], for runs of
    `lengths` (in sequence order) sharded zigzag over `world_size` ranks."""
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = 2 * world_size
    chunk_len = int(lengths.sum()) // chunks
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    whole = lengths * (lengths + 1) / 2.0  # pairs of a whole document
    before = np.concatenate(([0.0], np.cumsum(whole)))  # pairs of the documents before each one
    bounds = np.arange(chunks + 1) * chunk_len
    inside = np.clip(np.searchsorted(starts, bounds, side="right") - 1, 0, len(lengths) - 1)
    taken = np.minimum(bounds - starts[inside], lengths[inside])  # tokens of that document before the bound
    pairs_before_bound = before[inside] + taken * (taken + 1) / 2.0
    per_chunk = np.diff(pairs_before_bound)
    return per_chunk[:world_size] + per_chunk[::-1][:world_size]


def ulysses_rank_work(lengths: list[int] | np.ndarray, world_size: int, causal: bool = True) -> np.ndarray:
    """Document-masked attention work of each rank, [world_size], under Ulysses' document-local split
    (parallel/ulysses_documents.py) of runs of `lengths` sharded contiguously: the (query, key) pairs of
    the documents inside its shard (all heads, where they lie) plus 1/P of the pairs of the documents
    crossing a shard edge (exchanged, split by heads)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    shard = int(lengths.sum()) // world_size
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    first, last = starts // shard, (starts + lengths - 1) // shard
    pairs = lengths * (lengths + 1) / 2.0 if causal else lengths * lengths * 1.0
    inside = first == last
    local = np.bincount(first[inside], weights=pairs[inside], minlength=world_size)
    return local + pairs[~inside].sum() / world_size


RankWork = Callable[[np.ndarray, int], np.ndarray]


def imbalance(
    lengths: list[int] | np.ndarray, world_size: int, rank_work: RankWork = zigzag_rank_work
) -> float:
    """max / mean of the ranks' work (1.0 = perfectly balanced)."""
    work = rank_work(lengths, world_size)
    return float(work.max() / work.mean())


def balanced_document_order(
    lengths: list[int] | np.ndarray, world_size: int, seed: int = 0, rank_work: RankWork = zigzag_rank_work
) -> list[int]:
    """An order of the documents (indices into `lengths`) whose sharding is nearly balanced by
    `rank_work` (zigzag by default)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    count = len(lengths)
    if count < 2 or world_size < 2:
        return list(range(count))

    def spread(order: list[int]) -> tuple[float, float]:
        work = rank_work(lengths[order], world_size)
        return float(((work - work.mean()) ** 2).sum()), float(work.max() / work.mean())

    longest_first = [int(i) for i in np.argsort(-lengths, kind="stable")]
    starts = [list(range(count)), longest_first, longest_first[::-1]]
    order, (cost, ratio) = min(((o, spread(o)) for o in starts), key=lambda pair: pair[1][0])
    rng = np.random.default_rng(seed)
    since_improved = 0
    for _ in range(SEARCH_CANDIDATES):
        if ratio <= GOOD_ENOUGH or since_improved >= GIVE_UP_AFTER:
            break
        since_improved += 1
        a, b = (int(i) for i in rng.integers(0, count, 2))
        if a == b:
            continue
        candidate = list(order)
        if rng.random() < 0.5:
            candidate[a], candidate[b] = candidate[b], candidate[a]
        else:
            candidate.insert(b, candidate.pop(a))
        candidate_cost, candidate_ratio = spread(candidate)
        if candidate_cost <= cost:
            since_improved = 0 if candidate_cost < cost else since_improved
            order, cost, ratio = candidate, candidate_cost, candidate_ratio
    return order


def balance_documents(
    batch: Mapping[str, torch.Tensor], world_size: int, rank_work: RankWork = zigzag_rank_work
) -> dict[str, torch.Tensor]:
    """The batch with each row's documents reordered to balance `rank_work` over `world_size` ranks
    (zigzag by default).

    Every tensor of `batch` is [B, S] along the sequence (tokens, position ids, labels, document ids) and
    moves with the same token permutation; `document_ids` are renumbered 0, 1, ... in the new order.
    Without document ids, or on fewer than 2 ranks, the batch is returned as it is."""
    ids = batch.get("document_ids")
    if ids is None or world_size < 2:
        return dict(batch)
    permutations, new_ids = [], []
    for row, runs in zip(ids, document_segments(ids), strict=True):
        order = balanced_document_order(
            [stop - start for start, stop in runs], world_size, rank_work=rank_work
        )
        permutations.append(torch.cat([torch.arange(*runs[i]) for i in order]))
        lengths = torch.tensor([runs[i][1] - runs[i][0] for i in order])
        new_ids.append(torch.repeat_interleave(torch.arange(len(order), dtype=row.dtype), lengths))
    index = torch.stack(permutations).to(ids.device)
    balanced = {name: torch.gather(tensor, 1, index.to(tensor.device)) for name, tensor in batch.items()}
    balanced["document_ids"] = torch.stack(new_ids).to(ids.device)
    return balanced
