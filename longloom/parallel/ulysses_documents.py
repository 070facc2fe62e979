"""Ulysses over packed documents: a document inside one rank's shard is attended where it lies.

Why: ulysses_attention moves every token's heads across the group (all-to-alls of q, k, v and out, and
again in backward), so with documents masked the exchange costs what it costs for one long sequence
while the attention shrinks to a few percent of it. Measured at 256K tokens on 2 H200s (BENCHMARKS.md,
"Packed documents, P=2"): 2K documents took 50.8 ms with Ulysses against 32.3 ms for one GPU's share of
the attention alone. A document that starts and ends inside rank r's shard needs nothing from the other
ranks: rank r can attend it with all heads, with no exchange at all.

What (one sequence per micro batch, B = 1): rank r's shard of L rows splits into
- its middle rows [a_r, b_r): the documents that start and end in the shard, attended locally with all
  heads (views of q, k, v: no copies);
- its edge rows [0, a_r) and [b_r, L): the documents that cross a shard edge. Every rank's edge rows
  go through Ulysses' exchange (uneven: each rank sends only its own edge rows), are attended
  head-sharded in sequence order, and come back.
Every document lies wholly in one part, so both parts are exact and the result is ulysses_attention's.
Documents that stay inside their shards (fixed-length packing) need no collective at all.

When: every rank derives the same split from the gathered ids (`plan_document_split`, on the host, once
per model call where the caller passes DocumentPlans). It is used only where it keeps the ranks within
DOCUMENT_LOCAL_BALANCE of each other (`document_balance.ulysses_rank_work`: rank r attends its middle
documents with all heads and 1/P of the heads of the crossing ones), while the plain exchange gives every
rank the same share. The trainer reorders each sample's documents to balance exactly this
(ParallelDims.balance_documents). Not used for B > 1 (each sequence of a batch has its own edges), when
no document lies inside a shard, or when the caller brings its own local attention (token-wise
recomputation under activation offload, the ring of 2D SP): ulysses_attention then exchanges every
token as before. Where it runs, it replaces the head-chunk pipelining too (there is little left to hide).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longloom.attention.blocks import document_attention
from longloom.attention.document_plans import DocumentPlans
from longloom.attention.linear_chunked import document_segments
from longloom.attention.local import expand_kv_heads
from longloom.parallel.document_balance import ulysses_rank_work

# The document-local split runs where its busiest rank does at most this many times the mean rank's
# attention work (the balance bound for packed documents); otherwise the plain exchange runs.
DOCUMENT_LOCAL_BALANCE = 1.10


@dataclass(frozen=True)
class DocumentSplit:
    """Where each rank's documents are attended. `middles[r]` = (a_r, b_r): rank r's local rows [a_r,
    b_r) hold whole documents; its other rows cross a shard edge. `local_ids`: this rank's middle ids
    [1, b_r - a_r]; `edge_ids`: every rank's edge rows' ids in sequence order [1, sum of edge rows]
    (both kept as tensors so the per-layer plans derived from them are cached with them)."""

    middles: tuple[tuple[int, int], ...]
    shard_len: int
    local_ids: torch.Tensor
    edge_ids: torch.Tensor

    def edge_rows(self) -> list[int]:
        return [a + self.shard_len - b for a, b in self.middles]


def plan_document_split(
    gathered_ids: torch.Tensor, world_size: int, rank: int, causal: bool
) -> DocumentSplit | None:
    """The split of the gathered ids [1, S] (contiguous shards of S/P), or None where the plain exchange
    should run (B > 1, no document inside a shard, or the ranks would be out of balance)."""
    if gathered_ids.size(0) != 1:
        return None
    seq = gathered_ids.size(1)
    shard = seq // world_size
    documents = document_segments(gathered_ids)[0]  # (start, stop), in sequence order
    middles = []
    starts = [start for start, _ in documents]
    for r in range(world_size):
        low, high = r * shard, (r + 1) * shard
        # The document holding the shard's first row crosses in if it started before the shard; the
        # one holding its last row crosses out if it ends after it.
        first_doc = documents[_document_at(starts, low)]
        last_doc = documents[_document_at(starts, high - 1)]
        a = min(first_doc[1], high) - low if first_doc[0] < low else 0
        b = max(last_doc[0], low) - low if last_doc[1] > high else shard
        middles.append((a, max(a, b)))
    if all(a == b for a, b in middles):
        return None
    work = ulysses_rank_work([stop - start for start, stop in documents], world_size, causal)
    if work.max() > DOCUMENT_LOCAL_BALANCE * work.mean():
        return None
    a, b = middles[rank]
    local_ids = gathered_ids[:, rank * shard + a : rank * shard + b]
    edges = [
        piece
        for r, (low_end, high_start) in enumerate(middles)
        for piece in (slice(r * shard, r * shard + low_end), slice(r * shard + high_start, (r + 1) * shard))
        if piece.stop > piece.start
    ]
    edge_ids = torch.cat([gathered_ids[:, piece] for piece in edges], dim=1) if edges else gathered_ids[:, :0]
    return DocumentSplit(tuple(middles), shard, local_ids, edge_ids)


def _document_at(starts: list[int], row: int) -> int:
    """Index of the document (by sorted starts) holding `row`."""
    return bisect.bisect_right(starts, row) - 1


class _UnevenAllToAll(torch.autograd.Function):
    """dist.all_to_all_single along dim 0 with row counts per rank; the backward is the same exchange
    with the counts swapped. (torch.distributed.nn.functional's version is deprecated.)"""

    @staticmethod
    def forward(ctx, x, output_rows: list[int], input_rows: list[int], group: dist.ProcessGroup):
        ctx.rows, ctx.group = (output_rows, input_rows), group
        received = x.new_empty(sum(output_rows), *x.shape[1:])
        dist.all_to_all_single(received, x.contiguous(), output_rows, input_rows, group=group)
        return received

    @staticmethod
    def backward(ctx, grad):
        output_rows, input_rows = ctx.rows
        returned = grad.new_empty(sum(input_rows), *grad.shape[1:])
        dist.all_to_all_single(returned, grad.contiguous(), input_rows, output_rows, group=ctx.group)
        return returned, None, None, None


def _edges_to_heads(
    parts: list[torch.Tensor], rows: list[int], group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """This rank's edge rows of q, k, v ([1, u_r, H_i, D] each) -> every rank's edge rows with this
    rank's 1/P of each one's heads ([1, sum(rows), H_i/P, D] each): one uneven all-to-all for all three
    (autograd-aware), as the plain exchange sends q, k and v together."""
    world, mine, dim = len(rows), parts[0].size(1), parts[0].size(3)
    shares = [part.size(2) // world for part in parts]
    # [u_r, P, sum of shares, D] -> destination-major [P * u_r, sum of shares, D]
    per_rank = torch.cat([part[0].unflatten(1, (world, share)) for part, share in zip(parts, shares)], dim=2)
    send = per_rank.transpose(0, 1).reshape(world * mine, sum(shares), dim)
    received = _UnevenAllToAll.apply(send, rows, [mine] * world, group)
    return [piece.unsqueeze(0) for piece in received.split(shares, dim=1)]


def _heads_to_edges(y: torch.Tensor, rows: list[int], rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of `_edges_to_heads`: [1, sum(rows), H/P, D] -> this rank's rows [1, u_r, H, D]."""
    world, mine = len(rows), rows[rank]
    _, _, heads_here, dim = y.shape
    back = _UnevenAllToAll.apply(y[0], [mine] * world, rows, group)
    return back.unflatten(0, (world, mine)).transpose(0, 1).reshape(1, mine, world * heads_here, dim)


def document_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    split: DocumentSplit,
    group: dist.ProcessGroup,
    kv_replication: int,
    causal: bool,
    softmax_scale: float | None,
    document_plans: DocumentPlans | None,
) -> torch.Tensor:
    """ulysses_attention's result for q [1, L, Hq, D], k/v [1, L, Hkv, D] under `split`; differentiable.

    `kv_replication`: ulysses' K/V head copies (Hkv < P), so that each rank's share of the edge rows gets
    the K/V heads its query heads read, as in the plain exchange."""
    rank = dist.get_rank(group)
    a, b = split.middles[rank]
    middle = []
    if b > a:
        middle.append(
            document_attention(
                q[:, a:b], k[:, a:b], v[:, a:b], split.local_ids, causal, softmax_scale, document_plans
            )
        )
    rows = split.edge_rows()
    if sum(rows) == 0:  # every document inside its shard: no collective at all
        return middle[0]
    k_rep, v_rep = expand_kv_heads(k, kv_replication), expand_kv_heads(v, kv_replication)
    edges = [torch.cat((x[:, :a], x[:, b:]), dim=1) for x in (q, k_rep, v_rep)]
    if len({x.size(3) for x in edges}) == 1:
        gathered = _edges_to_heads(edges, rows, group)
    else:  # V's head size differs from Q/K's: one exchange each
        gathered = [_edges_to_heads([x], rows, group)[0] for x in edges]
    edge_out = document_attention(*gathered, split.edge_ids, causal, softmax_scale, document_plans)
    mine = _heads_to_edges(edge_out, rows, rank, group)
    return torch.cat([mine[:, :a], *middle, mine[:, a:]], dim=1)
