"""Classic ring attention (K/V travel, Q stays): the baseline TokenRing is measured against.

Paper: "Ring Attention with Blockwise Transformers for Near-Infinite Context" (Liu et al., 2023);
zigzag load balance as in zhuzilin/ring-flash-attention. Idea: at step t rank r attends its own Q
to the K/V block of rank r - t while that block moves on to rank r + 1; only one direction of each
link is used. Backward sends K/V round again, and the dK/dV accumulator of each block follows it one
step behind, collecting every rank's share before it arrives back at its owner after P hops:

    step t < P:   compute  grads of attn(Q[r], K[r-t], V[r-t]); add dK/dV to the accumulator of r-t
                  send     K/V[r-t] -> r+1,   accumulator of r-t+1 (from step t-1) -> r+1
                  receive  K/V[r-t-1] <- r-1, accumulator of r-t <- r-1 (holds ranks r-t .. r-1)
    step P:       send the finished accumulator of r+1 to r+1 and receive mine

Which rows attend which is `ring_plan.plan_block` (same zigzag halves, same causal rule), with the
roles of the owners swapped. dK/dV accumulators travel in fp32.

Packed documents: planned as in TokenRing (`ring_plan.RingDocuments`): a block pair without a shared
document is not computed; K/V still travel the whole ring (later ranks need them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longloom.attention.blocks import block_attention_backward, block_attention_forward
from longloom.attention.document_plans import DocumentPlans, check_document_ids_once
from longloom.parallel.p2p import RingComm
from longloom.parallel.ring_plan import RingDocuments, block_documents, plan_pair, ring_documents
from longloom.parallel.tokenring import RingScheduleFunction, check_ring_inputs, merge_into


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: RingComm,
    causal: bool,
    layout: str,
    scale,
    documents: RingDocuments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out fp32, lse fp32) of this rank's Q over every rank's K/V."""
    world, rank, local_len = comm.size, comm.rank, q.size(1)
    kv_current = torch.stack((k, v))  # [2, B, S/P, Hkv, D]: one message per step
    # Double buffers; the stacked copy is free once sent at step 0, so it is the second one.
    buffers = [torch.empty_like(kv_current), kv_current] if world > 1 else []
    out = lse = None
    for step in range(world):
        kv_next = None
        sends, recvs = [], []
        if step + 1 < world:
            kv_next = buffers[step % 2]
            sends.append((kv_current, comm.next_rank))
            recvs.append((kv_next, comm.prev_rank))
        exchange = comm.start(sends, recvs, f"ring attention forward step {step}")
        kv_owner = (rank - step) % world
        plan = plan_pair(rank, kv_owner, world, layout, causal, local_len, documents)
        if plan is not None:
            k_block, v_block = kv_current[:, :, plan.kv_rows].unbind(0)
            block_out, block_lse = block_attention_forward(
                q[:, plan.q_rows],
                k_block,
                v_block,
                plan.causal,
                scale,
                **block_documents(documents, plan, rank, kv_owner),
            )
            if step == 0:  # own block: every row
                out, lse = block_out.float(), block_lse.float().contiguous()
            else:
                merge_into(out[:, plan.q_rows], lse[:, :, plan.q_rows], block_out, block_lse)
        exchange.wait()
        if kv_next is not None:
            kv_current = kv_next
    return out, lse


def _backward(dout, q, k, v, out, lse, comm: RingComm, causal: bool, layout: str, scale, documents=None):
    """(dq, dk, dv) in fp32."""
    world, rank, local_len = comm.size, comm.rank, q.size(1)
    kv_current = torch.stack((k, v))
    kv_buffers = [torch.empty_like(kv_current), kv_current] if world > 1 else []
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dout = dout.to(q.dtype)
    # dkv accumulators: the one finished last step goes out while this step's arrives.
    finished = None
    for step in range(world + 1):
        sends, recvs = [], []
        kv_next = arriving = None
        if step + 1 < world:
            kv_next = kv_buffers[step % 2]
            sends.append((kv_current, comm.next_rank))
            recvs.append((kv_next, comm.prev_rank))
        if step >= 1 and world > 1:
            sends.append((finished, comm.next_rank))
            arriving = torch.empty_like(finished)
            recvs.append((arriving, comm.prev_rank))
        exchange = comm.start(sends, recvs, f"ring attention backward step {step}")
        grads = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device) if step < world else None
        if step < world:
            kv_owner = (rank - step) % world
            plan = plan_pair(rank, kv_owner, world, layout, causal, local_len, documents)
            if plan is not None:
                k_block, v_block = kv_current[:, :, plan.kv_rows].unbind(0)
                dq_part, dk_part, dv_part = block_attention_backward(
                    dout[:, plan.q_rows],
                    q[:, plan.q_rows],
                    k_block,
                    v_block,
                    out[:, plan.q_rows],
                    lse[:, :, plan.q_rows],
                    plan.causal,
                    scale,
                    **block_documents(documents, plan, rank, kv_owner),
                )
                dq[:, plan.q_rows] += dq_part
                grads[0][:, plan.kv_rows] += dk_part
                grads[1][:, plan.kv_rows] += dv_part
        exchange.wait()
        if step < world:
            finished = grads if arriving is None else grads.add_(arriving)
        elif arriving is not None:
            finished = arriving  # step P: my own K/V's gradients, back from the last rank
        if kv_next is not None:
            kv_current = kv_next
    dk, dv = finished.unbind(0)
    return dq, dk, dv


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    causal: bool = True,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    document_plans: DocumentPlans | None = None,
) -> torch.Tensor:
    """Same contract as `tokenring_attention` (q [B, S/P, Hq, D], k/v [B, S/P, Hkv, D]), K/V travelling."""
    comm = RingComm(group)
    check_ring_inputs(q, k, v, comm.size, layout)
    check_document_ids_once(document_ids, q, "ring_attention", document_plans)
    documents = ring_documents(document_ids, q, comm, document_plans)
    return RingScheduleFunction.apply(
        q, k, v, comm, causal, layout, softmax_scale, _forward, _backward, documents
    )
