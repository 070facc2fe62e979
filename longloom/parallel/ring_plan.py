"""Ring block plans: which rows of one rank's Q block attend which rows of another rank's K/V block.

Shared by TokenRing (parallel/tokenring.py) and the K/V-ring baseline (parallel/ring_baseline.py). Both
the rank that computes a block and the rank that receives its result derive the plan from the same
arguments, so they agree on whether a message exists and on its size.

- `plan_block`: from the layout alone (zigzag halves, the causal rule).
- `RingDocuments`: packed documents. Every rank's ids are all-gathered (tiny) and copied to the host
  once per call, or once per model call with its `DocumentPlans` (`ring_documents`: every layer, its
  recomputation and its backward then share them and their segment plans); a block pair whose
  documents do not overlap gets no plan (neither computed nor answered), the rest is cut down to the
  rows that can share a document. Q or K/V still travel the whole ring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from longloom.attention.blocks import select_backend
from longloom.attention.document_plans import DocumentPlans, cached
from longloom.attention.documents import meeting_rows
from longloom.attention.varlen_plan import SegmentPlan, plan_segments
from longloom.parallel import sharding
from longloom.parallel.p2p import RingComm


@dataclass(frozen=True)
class BlockPlan:
    """Which rows of a Q block attend to which rows of a K/V block, and whether with a causal mask."""

    q_rows: slice
    kv_rows: slice
    causal: bool


def plan_block(
    q_owner: int, kv_owner: int, world_size: int, layout: str, causal: bool, local_len: int
) -> BlockPlan | None:
    """The attention between the Q of ring rank `q_owner` and the K/V of `kv_owner`; None if fully masked.

    Rows are in the owners' local order (`sharding.local_chunk_ids`). Both the rank that computes a
    block and the rank that receives its result call this with the same arguments, so they agree on
    whether a message exists and on its size.
    """
    q_chunks = sharding.local_chunk_ids(layout, q_owner, world_size)
    kv_chunks = sharding.local_chunk_ids(layout, kv_owner, world_size)
    everything = slice(0, local_len)
    if not causal:
        return BlockPlan(everything, everything, False)
    if q_owner == kv_owner:
        # Local chunk ids increase, so a top-left causal mask over the concatenated chunks is exact.
        return BlockPlan(everything, everything, True)
    visible = [(i, j) for i, qc in enumerate(q_chunks) for j, kc in enumerate(kv_chunks) if qc > kc]
    if not visible:
        return None
    rows = sorted({i for i, _ in visible})
    cols = sorted({j for _, j in visible})
    # Zigzag and contiguous only produce full rectangles of chunks; anything else is a layout bug.
    assert len(visible) == len(rows) * len(cols) and rows[-1] - rows[0] == len(rows) - 1
    assert cols[-1] - cols[0] == len(cols) - 1
    chunk = local_len // len(q_chunks)
    return BlockPlan(
        slice(rows[0] * chunk, (rows[-1] + 1) * chunk), slice(cols[0] * chunk, (cols[-1] + 1) * chunk), False
    )


def restrict_to_query_prefix(plan: BlockPlan | None, query_rows: int, local_len: int) -> BlockPlan | None:
    """`plan` for the first `query_rows` queries of the Q owner only (token-wise recomputation).

    Off-diagonal blocks are full rectangles: fewer query rows, the same keys. The causal diagonal block
    shares its row order with its keys, so the first r queries see exactly the first r keys.
    """
    if plan is None or query_rows >= local_len:
        return plan
    stop = min(plan.q_rows.stop, query_rows)
    if stop <= plan.q_rows.start:
        return None
    kv_rows = slice(0, query_rows) if plan.causal else plan.kv_rows
    return BlockPlan(slice(plan.q_rows.start, stop), kv_rows, plan.causal)


@dataclass(frozen=True)
class RingDocuments:
    """Every ring rank's document ids [P, B, S/P]: on the host to plan blocks, on q's device for masks."""

    host: torch.Tensor
    device: torch.Tensor
    # Whether the blocks run on the "varlen" backend (attention/blocks.py), which takes segment plans.
    ragged: bool = False
    # Ragged segment plans by block (varlen backend only), built from the host ids once for forward and
    # backward (and for every layer where the RingDocuments come from the model call's DocumentPlans).
    segments: dict = field(default_factory=dict, compare=False, repr=False)
    # Block plans cut to the rows that meet (`plan`), by block: host scans of the ids, made once likewise.
    cut_plans: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def gather(
        document_ids: torch.Tensor | None, comm: RingComm, ragged: bool = False
    ) -> RingDocuments | None:
        """One all-gather over the ring group (every rank must call it); None without ids.
        `ragged`: the blocks run on the varlen backend (they are then given segment plans)."""
        if document_ids is None:
            return None
        document_ids = document_ids.contiguous()
        parts = [torch.empty_like(document_ids) for _ in range(comm.size)]
        dist.all_gather(parts, document_ids, group=comm.group)
        stacked = torch.stack(parts)
        return RingDocuments(host=stacked.cpu(), device=stacked, ragged=ragged)

    def plan(self, plan: BlockPlan | None, q_owner: int, kv_owner: int, chunk_len: int) -> BlockPlan | None:
        """`plan` cut down to the rows that can share a document; None if none can.

        The diagonal block keeps its rows (every token meets itself, and its causal mask is aligned
        top-left over the whole block). Rows are compared chunk by chunk (`chunk_len` local rows): a
        zigzag shard's two chunks are far apart in the sequence, so its ids are not one interval.
        """
        if plan is None or q_owner == kv_owner:
            return plan
        key = (q_owner, kv_owner, *_bounds(plan), chunk_len)
        if key not in self.cut_plans:
            self.cut_plans[key] = self._cut(plan, q_owner, kv_owner, chunk_len)
        return self.cut_plans[key]

    def _cut(self, plan: BlockPlan, q_owner: int, kv_owner: int, chunk_len: int) -> BlockPlan | None:
        q_pieces, kv_pieces = _pieces(plan.q_rows, chunk_len), _pieces(plan.kv_rows, chunk_len)
        q_host, kv_host = self.host[q_owner], self.host[kv_owner]
        q_start = kv_start = None
        for q_piece in q_pieces:
            for kv_piece in kv_pieces:
                rows = meeting_rows(q_host[:, q_piece], kv_host[:, kv_piece])
                if rows is None:
                    continue
                q_rows = range(q_piece.start + rows[0].start, q_piece.start + rows[0].stop)
                kv_rows = range(kv_piece.start + rows[1].start, kv_piece.start + rows[1].stop)
                if q_start is None:
                    q_start, q_stop, kv_start, kv_stop = (
                        q_rows.start,
                        q_rows.stop,
                        kv_rows.start,
                        kv_rows.stop,
                    )
                else:
                    q_start, q_stop = min(q_start, q_rows.start), max(q_stop, q_rows.stop)
                    kv_start, kv_stop = min(kv_start, kv_rows.start), max(kv_stop, kv_rows.stop)
        if q_start is None:
            return None
        return BlockPlan(slice(q_start, q_stop), slice(kv_start, kv_stop), plan.causal)

    def block(self, plan: BlockPlan, q_owner: int, kv_owner: int) -> dict:
        """The `q_docs` / `k_docs` (and on the varlen backend `segments`) arguments of block attention.

        The segments come from the host ids, so the ragged kernels need no device-to-host copy per block.
        """
        arguments = {
            "q_docs": self.device[q_owner][:, plan.q_rows],
            "k_docs": self.device[kv_owner][:, plan.kv_rows],
        }
        if self.ragged:
            arguments["segments"] = self.segment_plan(plan, q_owner, kv_owner)
        return arguments

    def segment_plan(self, plan: BlockPlan, q_owner: int, kv_owner: int) -> SegmentPlan | None:
        key = (q_owner, kv_owner, *_bounds(plan))
        if key not in self.segments:
            segments = plan_segments(
                self.host[q_owner][:, plan.q_rows], self.host[kv_owner][:, plan.kv_rows], plan.causal
            )
            self.segments[key] = None if segments is None else segments.to(self.device.device)
        return self.segments[key]


def ring_documents(
    document_ids: torch.Tensor | None, q: torch.Tensor, comm: RingComm, plans: DocumentPlans | None = None
) -> RingDocuments | None:
    """`RingDocuments.gather` for blocks of q's backend (every rank of the ring must call it), once per
    ids tensor and ring group for the model call where `plans` is given; None without ids."""
    if document_ids is None:
        return None
    ragged = select_backend(q, documents=True) == "varlen"
    gather = partial(RingDocuments.gather, document_ids, comm, ragged)
    return cached(plans, document_ids, "ring documents", (comm.group, ragged), gather)


def _bounds(plan: BlockPlan) -> tuple[int, int, int, int, bool]:
    """A block plan as a dictionary key (slices are unhashable before Python 3.12)."""
    return (plan.q_rows.start, plan.q_rows.stop, plan.kv_rows.start, plan.kv_rows.stop, plan.causal)


def _pieces(rows: slice, chunk_len: int) -> list[slice]:
    """`rows` cut at the local chunk edges (multiples of `chunk_len`)."""
    edges = range((rows.start // chunk_len + 1) * chunk_len, rows.stop, chunk_len)
    starts = [rows.start, *edges]
    return [slice(start, stop) for start, stop in zip(starts, [*edges, rows.stop])]


def plan_pair(
    q_owner: int,
    kv_owner: int,
    world_size: int,
    layout: str,
    causal: bool,
    local_len: int,
    documents: RingDocuments | None,
) -> BlockPlan | None:
    """`plan_block`, then cut to the rows that share documents when there are documents."""
    plan = plan_block(q_owner, kv_owner, world_size, layout, causal, local_len)
    if documents is None:
        return plan
    return documents.plan(plan, q_owner, kv_owner, local_len // sharding.chunks_per_rank(layout))


def block_documents(documents: RingDocuments | None, plan: BlockPlan, q_owner: int, kv_owner: int) -> dict:
    return {} if documents is None else documents.block(plan, q_owner, kv_owner)
