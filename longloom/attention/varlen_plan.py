"""The segment plan of a packed-document block: which rows go to the ragged kernel, which to the dense one.

Documents are contiguous and their ids never decrease along a block's rows (attention/documents.py),
so in a (query rows, key rows) block every document is one run of query rows and one run of key rows.
Attention within documents is then ragged attention over "segments", one per document per batch row,
on the rows flattened to [B * S, H, D] (the THD layout of flash-attention's varlen kernels):

- causal diagonal block (the same rows on both sides): every document is a causal square;
- non-causal block: a shared document's query run attends its key run (separate cu_seqlens_q / _k);
  a block whose keys all precede its queries shares at most one document, one dense rectangle;
- a document present on one side only becomes a segment with no partner rows (its queries get out 0
  and lse -inf, its keys zero dK/dV), so both sides' segments stay back to back as cu_seqlens need.

The dense fused kernel (cuDNN) is faster than the ragged one wherever the work has a dense shape, so
the plan hands it three kinds of work and leaves the ragged kernel only the rest:

- `rectangle`: the block holds one rectangle per batch row at the same rows (one document, or B = 1
  off the diagonal);
- dense groups of long documents (at least `dense_from` rows on both sides), one call each;
- dense groups of equal-length documents side by side (fixed-length packing, chat data cut to one
  length), viewed as a batch [count, length, H, D] and run as ONE dense call: this replaces a ragged
  call over many short segments, where the ragged kernel is slowest.

A long document of a causal block runs at a length from a fixed grid (`dense_run_length`), so that the
dense kernel, which torch compiles once per shape, sees a bounded set of shapes however the documents
of a corpus fall.

The plan is built on the host (from host ids: ring schedules already hold them there), so the kernels
get max lengths without a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# From this many query and key rows on, a document runs through the dense kernel (cuDNN, about 520
# TFLOP/s fwd+bwd on H200 at 256K) rather than in the ragged call (flash varlen: 331 / 316 / 263 at
# 128K / 8K / 2K segments). Measured on one H200 (BENCHMARKS.md session 16, bench/document_shapes.py:
# 256K tokens of lognormal documents, 16 / 4 heads), fwd+bwd ms at 8192 / 6144 / 4096 / 2048 / 1024 /
# 512: 102.5 / 99.3 / 97.1 / 99.2 / 98.9 / 102.8 (medians, 4096 and 8192 the mean of three runs): below
# 4096 the extra calls cost the host more than cuDNN saves on the GPU.
DENSE_DOCUMENT_TOKENS = 4096
# Equal-length documents side by side go to the dense kernel as one batch when they hold this many
# tokens together and each at least DENSE_BATCH_MIN_LENGTH (shorter rows fill cuDNN's tiles poorly).
# bench/documents.py's fixed-length rows are the test of these numbers.
DENSE_BATCH_TOKENS = 8192
DENSE_BATCH_MIN_LENGTH = 128
# A long causal document runs through the dense kernel at a length from a fixed grid, this many lengths
# per power of two (rounded up; the extra rows cannot reach the document's own: varlen.py). Why: torch
# builds a cuDNN graph for every new shape, 76-115 ms each on H200 (bench/document_shapes.py), and a real
# corpus brings new document lengths every step: at 256K tokens of lognormal documents (mean 8K) a step
# with new lengths took 0.83-1.15 s against 0.09-0.20 s with the same lengths again. On the grid, shapes
# are few (32 per octave) and the extra work is at most 6.3% of a document's length (3% on average).
DENSE_LENGTHS_PER_OCTAVE = 32


def _granule(length: int, per_octave: int | None) -> int:
    """The grid's step at `length`: 2^(floor(log2 length)) / per_octave, at least 1 (None:
    DENSE_LENGTHS_PER_OCTAVE, read at the call; 0: no grid, step 1)."""
    per_octave = DENSE_LENGTHS_PER_OCTAVE if per_octave is None else per_octave
    return 1 if per_octave == 0 else max(1, (1 << (length.bit_length() - 1)) // per_octave)


def dense_run_length(length: int, per_octave: int | None = None) -> int:
    """`length` rounded up to the grid of `per_octave` lengths per power of two (`_granule`)."""
    granule = _granule(length, per_octave)
    return -(-length // granule) * granule


def dense_grid_floor(length: int, per_octave: int | None = None) -> int:
    """The longest grid length <= `length` (`_granule`)."""
    granule = _granule(length, per_octave)
    return length // granule * granule


@dataclass(frozen=True)
class DenseGroup:
    """`count` documents of equal length side by side in one batch row, run as one dense batch.

    q_rows / k_rows: the group's rows (count x its documents' query / key length), contiguous.
    padded_to: a single causal document runs at this many rows, its own followed by rows it cannot see
    (dense_run_length; varlen.py); None: at its own length.
    """

    row: int
    q_rows: slice
    k_rows: slice
    count: int
    padded_to: int | None = None


@dataclass(frozen=True)
class SegmentPlan:
    """A packed-document block as ragged segments over rows flattened to [B * Sq] / [B * Sk]."""

    cu_seqlens_q: torch.Tensor  # int32 [N + 1]
    cu_seqlens_k: torch.Tensor  # int32 [N + 1]
    max_q: int
    max_k: int
    causal: bool
    # Rows that need out 0 / lse -inf (queries) or zero gradients (keys) set after the kernels: rows of
    # no shared document. None where there are none. Rows of dense groups are not in them (their
    # segments have no partner too, but the dense results overwrite them): a diagonal block whose long
    # documents went to the dense kernel needs no fill pass over its outputs and gradients.
    queries_without_keys: torch.Tensor | None  # bool [B * Sq]
    keys_without_queries: torch.Tensor | None  # bool [B * Sk]
    rectangle: tuple[slice, slice] | None  # (query rows, key rows) of the only work, same in every row
    dense_groups: tuple[DenseGroup, ...] = ()  # documents that run through the dense kernel instead
    ragged_work: bool = True  # whether any segment is left for the ragged kernel

    def to(self, device: torch.device) -> SegmentPlan:
        """The plan's tensors on `device` (pinned and asynchronous from the host: no stream sync)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.device == device:
                return t
            if device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return SegmentPlan(
            move(self.cu_seqlens_q),
            move(self.cu_seqlens_k),
            self.max_q,
            self.max_k,
            self.causal,
            move(self.queries_without_keys),
            move(self.keys_without_queries),
            self.rectangle,
            self.dense_groups,
            self.ragged_work,
        )


def _runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, counts = torch.unique_consecutive(ids, return_counts=True)
    return values, counts


def _dense_groups_of_row(
    q_len: list[int],
    k_len: list[int],
    shared: list[bool],
    dense_from: int,
    batch_from: int,
    batch_min_length: int,
) -> list[tuple[int, int]]:
    """(first document, count) of each dense group among one row's documents (sorted by id).

    Runs of consecutive shared documents with the same query and key lengths: one group when long
    (each at least `dense_from` rows on both sides) or when many together (`batch_from` tokens, each at
    least `batch_min_length`).
    Consecutive in id order means adjacent in rows on both sides (no one-sided document between them).
    """
    groups = []
    first = 0
    while first < len(shared):
        if not shared[first]:
            first += 1
            continue
        end = first + 1
        while end < len(shared) and shared[end] and (q_len[end], k_len[end]) == (q_len[first], k_len[first]):
            end += 1
        count, shortest = end - first, min(q_len[first], k_len[first])
        long = shortest >= dense_from
        batched = count > 1 and shortest >= batch_min_length and count * q_len[first] >= batch_from
        if long or batched:
            groups.append((first, count))
        first = end
    return groups


def plan_segments(
    q_docs: torch.Tensor,
    k_docs: torch.Tensor,
    causal: bool,
    dense_from: int | None = None,
    batch_from: int = DENSE_BATCH_TOKENS,
    batch_min_length: int = DENSE_BATCH_MIN_LENGTH,
    lengths_per_octave: int | None = None,
) -> SegmentPlan | None:
    """The segments of a block from host ids q_docs [B, Sq], k_docs [B, Sk] (each row non-decreasing).

    `dense_from`: the length from which a document runs on the dense kernel (None: DENSE_DOCUMENT_TOKENS,
    read at the call). `lengths_per_octave`: the grid long causal documents are padded to (None:
    DENSE_LENGTHS_PER_OCTAVE, read at the call; 0: every document at its own length).

    Documents of a dense group leave two partnerless segments each in their place (so the ragged kernel
    skips them): (queries, no keys) and (no queries, keys).

    None where ragged kernels cannot express the block: a causal block whose shared documents do not
    sit at the same rows on both sides (the kernels align a segment's causal mask bottom-right, the
    block's is top-left; only diagonal blocks are causal in our schedules, and there they coincide).
    """
    dense_from = DENSE_DOCUMENT_TOKENS if dense_from is None else dense_from
    q_docs, k_docs = q_docs.cpu(), k_docs.cpu()
    batch, seq_q = q_docs.shape
    seq_k = k_docs.size(1)
    q_lengths, k_lengths = [], []
    rectangles = set()
    dense_groups = []
    for row in range(batch):
        q_ids, q_counts = _runs(q_docs[row])
        k_ids, k_counts = _runs(k_docs[row])
        ids = torch.unique(torch.cat((q_ids, k_ids)))  # sorted: both sides' runs in document order
        q_len = torch.zeros(ids.numel(), dtype=torch.int64)
        k_len = torch.zeros(ids.numel(), dtype=torch.int64)
        q_len[torch.searchsorted(ids, q_ids)] = q_counts
        k_len[torch.searchsorted(ids, k_ids)] = k_counts
        shared = (q_len > 0) & (k_len > 0)
        q_start, k_start = q_len.cumsum(0) - q_len, k_len.cumsum(0) - k_len
        if causal and not bool(((q_start == k_start) & (q_len == k_len))[shared].all()):
            return None
        if int(shared.sum()) == 1:
            i = int(shared.nonzero())
            rectangles.add(
                (int(q_start[i]), int(q_start[i] + q_len[i]), int(k_start[i]), int(k_start[i] + k_len[i]))
            )
        else:
            rectangles.add(None)
        dense = torch.zeros(ids.numel(), dtype=torch.bool)
        lengths = (q_len.tolist(), k_len.tolist(), shared.tolist())
        for first, count in _dense_groups_of_row(*lengths, dense_from, batch_from, batch_min_length):
            q0, k0 = int(q_start[first]), int(k_start[first])
            q1, k1 = q0 + count * int(q_len[first]), k0 + count * int(k_len[first])
            padded_to = None
            if causal and count == 1:
                padded_to = dense_run_length(q1 - q0, lengths_per_octave)
                padded_to = None if padded_to == q1 - q0 else padded_to
            dense_groups.append(DenseGroup(row, slice(q0, q1), slice(k0, k1), count, padded_to))
            dense[first : first + count] = True
        if bool(dense.any()):  # split each dense document into (queries, no keys) + (no queries, keys)
            copies = 1 + dense.long()
            first_copy = (copies.cumsum(0) - copies)[dense]
            index = torch.repeat_interleave(torch.arange(ids.numel()), copies)
            q_len, k_len = q_len[index], k_len[index]
            k_len[first_copy] = 0
            q_len[first_copy + 1] = 0
        q_lengths.append(q_len)
        k_lengths.append(k_len)
    q_len, k_len = torch.cat(q_lengths), torch.cat(k_lengths)
    zero = torch.zeros(1, dtype=torch.int64)
    cu_q = torch.cat((zero, q_len.cumsum(0))).to(torch.int32)
    cu_k = torch.cat((zero, k_len.cumsum(0))).to(torch.int32)
    # Rows of segments with no partner: a query with no key of its document, a key with no query;
    # less the rows a dense group writes.
    queries_without_keys = torch.repeat_interleave(k_len == 0, q_len)
    keys_without_queries = torch.repeat_interleave(q_len == 0, k_len)
    assert queries_without_keys.numel() == batch * seq_q and keys_without_queries.numel() == batch * seq_k
    for group in dense_groups:
        queries_without_keys[group.row * seq_q :][group.q_rows] = False
        keys_without_queries[group.row * seq_k :][group.k_rows] = False
    rectangle = None
    if len(rectangles) == 1 and None not in rectangles:
        q0, q1, k0, k1 = rectangles.pop()
        rectangle = (slice(q0, q1), slice(k0, k1))
    return SegmentPlan(
        cu_q,
        cu_k,
        int(q_len.max()),
        int(k_len.max()),
        causal,
        queries_without_keys if bool(queries_without_keys.any()) else None,
        keys_without_queries if bool(keys_without_queries.any()) else None,
        rectangle,
        tuple(dense_groups),
        bool(((q_len > 0) & (k_len > 0)).any()),
    )
