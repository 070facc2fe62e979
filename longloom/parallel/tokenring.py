"""TokenRing: ring attention where queries travel and partial outputs come back, using both directions.

Paper: "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via Bidirectional
Communication" (Wang et al., 2024). Idea: K and V never move; at step t rank r attends the Q block
of rank r - t to its own K/V while, at the same time, that Q block goes on to rank r + 1 and the
partial (out, lse) of the previous step goes back to its Q's owner, so both directions of the links
carry data and the transfers overlap the block attention. The owner merges partials in fp32.

Schedule on rank r of P (every rank posts the same pattern, so no step can deadlock):

    step t < P:   compute  attn(Q[r-t], K[r], V[r]) -> partial for owner r-t
                  send     Q[r-t] -> r+1,   partial of step t-1 -> owner r-t+1   (while computing)
                  receive  Q[r-t-1] <- r-1, my partial of step t-1 <- r+t-1
    step P:       send the last partial (to r+1) and receive mine (from r-1)

The partial of step t goes straight to its owner r - t (a direct NVLink/NVSwitch transfer, "the
other way round the ring"). Backward follows the same schedule with (Q, dO, O, lse) travelling
instead of Q and dQ partials coming back; dK and dV never leave the rank and accumulate in fp32.

Causal load balance: with the zigzag layout (rank r holds chunks r and 2P-1-r of 2P, see
parallel/sharding.py) each off-diagonal step is either the second half of Q on all of K/V (Q's
owner is before r) or all of Q on the first half of K/V (Q's owner is after r): the same work on
every rank at every step. `ring_plan.plan_block` derives this from the chunk ids, so the contiguous layout
(correct, unbalanced) and non-causal attention come out of the same rule.

Q travels only as far as it is used: every rank plans every block pair (`plan_pair`, the same answer
on every rank), so at each step the sender and the receiver agree whether any rank further on computes
with that Q and on which of its rows (`travelling_rows`). Only those rows go (with B = 1; every row
with B > 1, where a row slice is not contiguous); none where no rank further on needs it. In backward
the same holds for the (Q, dO, O, lse) that travel. Without documents this spares Q[0] of a contiguous
causal ring its whole trip (no later rank sees its keys).

Packed documents (`document_ids` [B, S/P], same layout as q): blocks are planned with every rank's
ids (parallel/ring_plan.RingDocuments): a block pair without a shared document is neither computed
nor is its partial output (or dQ) sent back, the rest is cut to the rows that can share a document;
inside a block the kernels mask (and on GPU skip) the other documents' tiles. With the travel rule
above, documents that stay inside one shard cost no communication at all (fixed-length packing), and
a document crossing shards moves only the query rows that share it.

Shapes: q [B, S/P, Hq, D], k/v [B, S/P, Hkv, D] (GQA: Hq % Hkv == 0); out like q; lse [B, Hq, S/P].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from longloom.attention import merge
from longloom.attention.blocks import block_attention_backward, block_attention_forward
from longloom.attention.document_plans import DocumentPlans, check_document_ids_once
from longloom.attention.linear_chunked import compute_dtype
from longloom.attention.tokenwise import AttentionOutputs, tokenwise_attention
from longloom.parallel import sharding
from longloom.parallel.p2p import RingComm
from longloom.parallel.ring_plan import (  # noqa: F401 - BlockPlan, plan_block: public here too
    BlockPlan,
    RingDocuments,
    block_documents,
    plan_block,
    plan_pair,
    restrict_to_query_prefix,
    ring_documents,
)


def check_ring_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world_size: int, layout: str
) -> None:
    """Sizes a ring schedule needs; the message names the config keys to change."""
    per_rank = sharding.chunks_per_rank(layout)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.size(1) != k.size(1) or k.size(1) != v.size(1):
        raise ValueError(
            f"q holds {q.size(1)} tokens but k/v hold {k.size(1)}/{v.size(1)} on this rank: shard q, k and v "
            f"over the same group with the same layout (parallel.ring={world_size})"
        )
    if q.size(1) % per_rank:
        raise ValueError(
            f"sequence length {q.size(1) * world_size} ({q.size(1)} tokens on each of parallel.ring="
            f"{world_size} ranks) is not divisible by {per_rank * world_size} ({layout} layout): change "
            f"data.seq_len to a multiple of {per_rank * world_size} or parallel.ring"
        )


def travelling_rows(
    owner: int, hop: int, world: int, plan_of: Callable[[int, int], BlockPlan | None]
) -> slice | None:
    """The rows of Q[owner] that must reach the rank `hop` steps past its owner: the span of the query
    rows that rank and every rank after it on the ring compute with (`plan_of(q_owner, kv_owner)`),
    None where none of them does. Both ends of a transfer call this with the same arguments."""
    needed = [plan_of(owner, (owner + later) % world) for later in range(hop, world)]
    rows = [plan.q_rows for plan in needed if plan is not None]
    if not rows:
        return None
    return slice(min(r.start for r in rows), max(r.stop for r in rows))


def _message_rows(rows: slice, x: torch.Tensor) -> slice:
    """`rows` where x[:, rows] is contiguous (B = 1), else every row (p2p sends contiguous tensors)."""
    return rows if x.size(0) == 1 else slice(0, x.size(1))


def merge_into(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merges a partial into fp32 accumulator views in place (Triton kernel on CUDA)."""
    if out.is_cuda:
        from longloom.attention.triton_merge import merge_attention_partials_triton_

        merge_attention_partials_triton_(out, lse, block_out, block_lse)
    else:
        merge.merge_attention_partials_(out, lse, block_out, block_lse)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: RingComm,
    causal: bool,
    layout: str,
    scale: float | None,
    documents: RingDocuments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, q, Hq, D], lse [B, Hq, q] in fp32) for this rank's queries: out in fp32 where partials of
    other ranks' blocks are merged into it, else the own block's as it is (q's dtype on the fused
    kernels: no fp32 copy and no conversion back when, e.g., every document stays in its shard).
    fp64 inputs accumulate in fp64 (the test references), so both cases keep their precision.

    q may be the first q of the S/P local queries (token-wise recomputation, the same q on every rank):
    only those travel and only their blocks are computed.
    """
    world, rank, local_len = comm.size, comm.rank, k.size(1)
    query_rows = q.size(1)

    def plan_for(q_owner: int, kv_owner: int) -> BlockPlan | None:
        plan = plan_pair(q_owner, kv_owner, world, layout, causal, local_len, documents)
        return restrict_to_query_prefix(plan, query_rows, local_len)

    q_buffers: list[torch.Tensor | None] = [None, None]  # double buffer, allocated when Q arrives
    q_current: torch.Tensor | None = q
    out = lse = None
    accumulation = compute_dtype(q.dtype)  # fp32 (fp64 for the fp64 test references)
    # Partials of my queries come back only from ranks my Q travels to.
    partials_arrive = travelling_rows(rank, 1, world, plan_for) is not None
    outgoing: tuple[torch.Tensor, torch.Tensor, int] | None = None  # last step's partial, for its owner
    for step in range(world + 1):
        sends: list[tuple[torch.Tensor, int]] = []
        recvs: list[tuple[torch.Tensor, int]] = []
        q_next = None
        if step + 1 < world:
            # Q[rank - step] goes on to the next rank only if it or a rank after it needs it; the
            # next Q comes from the previous rank likewise (rows outside the span are never read).
            outgoing_rows = travelling_rows((rank - step) % world, step + 1, world, plan_for)
            if outgoing_rows is not None:
                sends.append((q_current[:, _message_rows(outgoing_rows, q)], comm.next_rank))
            incoming_rows = travelling_rows((rank - 1 - step) % world, step + 1, world, plan_for)
            if incoming_rows is not None:
                if q_buffers[step % 2] is None:  # the other one is being computed on
                    q_buffers[step % 2] = torch.empty_like(q)
                q_next = q_buffers[step % 2]
                recvs.append((q_next[:, _message_rows(incoming_rows, q)], comm.prev_rank))
        if outgoing is not None:
            block_out, block_lse, owner = outgoing
            sends += [(block_out, comm.global_rank(owner)), (block_lse, comm.global_rank(owner))]
        incoming = None
        if step >= 2:  # the rank that held my Q during the previous step sends its partial back now
            source = (rank + step - 1) % world
            plan = plan_for(rank, source)
            if plan is not None:
                rows = plan.q_rows.stop - plan.q_rows.start
                incoming = (
                    plan.q_rows,
                    q.new_empty(q.size(0), rows, q.size(2), q.size(3)),
                    torch.empty(q.size(0), q.size(2), rows, dtype=accumulation, device=q.device),
                )
                recvs += [(incoming[1], comm.global_rank(source)), (incoming[2], comm.global_rank(source))]
        exchange = comm.start(sends, recvs, f"TokenRing forward step {step}")
        outgoing = None
        if step < world:
            owner = (rank - step) % world
            plan = plan_for(owner, rank)
            if plan is not None:
                block_out, block_lse = block_attention_forward(
                    q_current[:, plan.q_rows],
                    k[:, plan.kv_rows],
                    v[:, plan.kv_rows],
                    plan.causal,
                    scale,
                    **block_documents(documents, plan, owner, rank),
                )
                if step == 0:  # own block: always every row (diagonal or full), starts the accumulator
                    out = block_out.to(accumulation) if partials_arrive else block_out
                    lse = block_lse.to(accumulation).contiguous()
                else:
                    outgoing = (block_out.contiguous(), block_lse.to(accumulation).contiguous(), owner)
        exchange.wait()
        if incoming is not None:
            rows, block_out, block_lse = incoming
            merge_into(out[:, rows], lse[:, :, rows], block_out, block_lse)
        if step + 1 < world:
            q_current = q_next  # None where nothing came: then no plan of this rank reads it
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    comm: RingComm,
    causal: bool,
    layout: str,
    scale: float | None,
    documents: RingDocuments | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): each in fp32 where other blocks add into it, else the own block's as it is (no
    fp32 zeros, additions and conversion back when no other rank's block meets this rank's rows).
    (q, dO, O) travel as three messages of the rows needed, plus lse."""
    world, rank, local_len = comm.size, comm.rank, q.size(1)
    # What travels: (q, dO, O) and lse; at step 0 this rank's own (sent as they are, never written:
    # a retained graph may run backward again), then double buffers allocated when something arrives.
    current_lse = lse.contiguous()
    current: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = (
        tuple(x.to(q.dtype).contiguous() for x in (q, dout, out)),  # copies only where not already
        current_lse,
    )
    buffers: list[tuple[tuple[torch.Tensor, ...], torch.Tensor] | None] = [None, None]
    outgoing: tuple[torch.Tensor, int] | None = None  # last step's dq partial, for its owner

    def plan_of(q_owner: int, kv_owner: int) -> BlockPlan | None:
        return plan_pair(q_owner, kv_owner, world, layout, causal, local_len, documents)

    # fp32 accumulators only where other ranks' blocks add in; else the own block's gradients are used
    # as they come (set at step 0, whose block covers every row).
    dq = dk = dv = None
    if travelling_rows(rank, 1, world, plan_of) is not None:  # dQ partials come back
        dq = torch.zeros(q.shape, dtype=compute_dtype(q.dtype), device=q.device)
    if any(plan_of(owner, rank) is not None for owner in range(world) if owner != rank):
        dk = torch.zeros(k.shape, dtype=compute_dtype(k.dtype), device=k.device)
        dv = torch.zeros(v.shape, dtype=compute_dtype(v.dtype), device=v.device)

    def messages(
        travelling: tuple[tuple[torch.Tensor, ...], torch.Tensor], rows: slice
    ) -> list[torch.Tensor]:
        # q, dO and O as row slices (contiguous with B = 1), and the whole lse (1/D of one of them).
        rows = _message_rows(rows, q)
        return [*(part[:, rows] for part in travelling[0]), travelling[1]]

    for step in range(world + 1):
        sends: list[tuple[torch.Tensor, int]] = []
        recvs: list[tuple[torch.Tensor, int]] = []
        following = None
        if step + 1 < world:
            outgoing_rows = travelling_rows((rank - step) % world, step + 1, world, plan_of)
            if outgoing_rows is not None:
                sends += [(tensor, comm.next_rank) for tensor in messages(current, outgoing_rows)]
            incoming_rows = travelling_rows((rank - 1 - step) % world, step + 1, world, plan_of)
            if incoming_rows is not None:
                if buffers[step % 2] is None:  # the other one is being computed on
                    bundle = torch.empty((3, *q.shape), dtype=q.dtype, device=q.device)
                    buffers[step % 2] = (tuple(bundle.unbind(0)), torch.empty_like(current_lse))
                following = buffers[step % 2]
                recvs += [(tensor, comm.prev_rank) for tensor in messages(following, incoming_rows)]
        if outgoing is not None:
            sends.append((outgoing[0], comm.global_rank(outgoing[1])))
        incoming = None
        if step >= 2:
            source = (rank + step - 1) % world
            plan = plan_of(rank, source)
            if plan is not None:
                rows = plan.q_rows.stop - plan.q_rows.start
                incoming = (plan.q_rows, q.new_empty(q.size(0), rows, q.size(2), q.size(3)))
                recvs.append((incoming[1], comm.global_rank(source)))
        exchange = comm.start(sends, recvs, f"TokenRing backward step {step}")
        outgoing = None
        if step < world:
            owner = (rank - step) % world
            plan = plan_of(owner, rank)
            if plan is not None:
                q_block, dout_block, out_block = (part[:, plan.q_rows] for part in current[0])
                dq_part, dk_part, dv_part = block_attention_backward(
                    dout_block,
                    q_block,
                    k[:, plan.kv_rows],
                    v[:, plan.kv_rows],
                    out_block,
                    current[1][:, :, plan.q_rows],
                    plan.causal,
                    scale,
                    **block_documents(documents, plan, owner, rank),
                )
                if dk is None:  # only at step 0: no other block meets these keys
                    dk, dv = dk_part, dv_part
                else:
                    dk[:, plan.kv_rows] += dk_part
                    dv[:, plan.kv_rows] += dv_part
                if step == 0 and dq is None:
                    dq = dq_part
                elif step == 0:
                    dq[:, plan.q_rows] += dq_part
                else:
                    outgoing = (dq_part.to(q.dtype).contiguous(), owner)
        exchange.wait()
        if incoming is not None:
            dq[:, incoming[0]] += incoming[1]
        if step + 1 < world:
            current = following  # None where nothing came: then no plan of this rank reads it
    return dq, dk, dv


class RingScheduleFunction(torch.autograd.Function):
    """Autograd around a ring schedule:
    `forward_fn(q, k, v, comm, causal, layout, scale, documents) -> (out, lse)` and
    `backward_fn(dout, q, k, v, out, lse, comm, causal, layout, scale, documents) -> (dq, dk, dv)`.

    Shared by TokenRing and the K/V-ring baseline, which differ only in their schedules.
    """

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        comm: RingComm,
        causal: bool,
        layout: str,
        scale: float | None,
        forward_fn,
        backward_fn,
        documents: RingDocuments | None = None,
    ):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = forward_fn(q, k, v, comm, causal, layout, scale, documents)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.causal, ctx.layout, ctx.scale, ctx.backward_fn = (
            comm,
            causal,
            layout,
            scale,
            backward_fn,
        )
        ctx.documents = documents
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(
            dout, q, k, v, out, lse, ctx.comm, ctx.causal, ctx.layout, ctx.scale, ctx.documents
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


class TokenRingSchedule:
    """The causal TokenRing schedule as attention/tokenwise.py's `AttentionSchedule`: the first
    `query_rows` local queries round the ring, and the full backward."""

    def __init__(
        self,
        comm: RingComm,
        layout: str,
        softmax_scale: float | None,
        documents: RingDocuments | None = None,
    ):
        self.comm, self.layout, self.softmax_scale = comm, layout, softmax_scale
        self.documents = documents

    def forward(self, q, k, v, query_rows):
        query_prefix = q[:, :query_rows].contiguous()  # it travels round the ring
        return _forward(query_prefix, k, v, self.comm, True, self.layout, self.softmax_scale, self.documents)

    def backward(self, dout, q, k, v, out, lse):
        return _backward(
            dout, q, k, v, out, lse, self.comm, True, self.layout, self.softmax_scale, self.documents
        )


def tokenring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    causal: bool = True,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    attention_outputs: AttentionOutputs | None = None,
    document_ids: torch.Tensor | None = None,
    document_plans: DocumentPlans | None = None,
) -> torch.Tensor:
    """Exact attention over the sequence sharded across `group` in `layout`; differentiable in q, k, v.

    q: [B, S/P, Hq, D]; k, v: [B, S/P, Hkv, D]; returns [B, S/P, Hq, D] in this rank's layout.
    `attention_outputs` (causal only): token-wise recomputation, attention/tokenwise.py.
    `document_ids` [B, S/P] (packed documents, sharded like q): attention within each document only.
    `document_plans`: the model call's cache (attention/document_plans.py): the ids' ring plans are
    then gathered and built once for every layer; None builds them per call.
    A peer that stops answering fails the call after the process group's timeout (see parallel/p2p.py).
    """
    comm = RingComm(group)
    check_ring_inputs(q, k, v, comm.size, layout)
    check_document_ids_once(document_ids, q, "tokenring_attention", document_plans)
    documents = ring_documents(document_ids, q, comm, document_plans)
    if attention_outputs is not None:
        if not causal:
            raise ValueError("token-wise attention recomputation needs causal attention (causal=True)")
        schedule = TokenRingSchedule(comm, layout, softmax_scale, documents)
        return tokenwise_attention(q, k, v, attention_outputs, schedule)
    return RingScheduleFunction.apply(
        q, k, v, comm, causal, layout, softmax_scale, _forward, _backward, documents
    )
