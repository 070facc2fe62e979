"""Ulysses sequence parallelism: all-to-all from "all heads, 1/P of the sequence" to "1/P of the heads,
all of the sequence", attention on the whole sequence, and the inverse all-to-all.

Paper: Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models" (2023), arXiv:2309.14509.
Idea: attention heads are independent, so trade the sequence split for a head split around attention.

Communication per layer (P ranks, contiguous layout, rank r holds tokens [r*S/P, (r+1)*S/P)):

    q, k, v [B, S/P, H, D] --one fused all-to-all--> [B, S, H/P, D] --local attention--> out
    out [B, S, Hq/P, D] --all-to-all--> [B, S/P, Hq, D]

The backward is the same two all-to-alls in the opposite direction. q, k and v travel in ONE
collective (concatenated along heads) through one autograd.Function, so the order of collectives
is fixed by the graph and cannot be reordered by autograd on some ranks and not others.

Cost per direction: one copy packing the tensors into the send buffer, the collective (each rank
sends (P-1)/P of its q/k/v), and at most one copy unpacking (none for B == 1 on the q/k/v side).

Hidden communication (`head_chunks`, parallel/ulysses_pipeline.py): the heads are split into C chunks
of whole GQA groups and exchanged asynchronously, chunk c+1's q/k/v and chunk c-1's output travelling
(NCCL's stream) while chunk c is attended (compute stream); only 1/C of the exchange stays exposed.
Same numbers in, same kernel per head: results equal C = 1. Costs C x more, smaller launches, and
NCCL's kernels take SMs from attention while they overlap (exchanges on the copy engines were tried
and removed: parallel/ulysses_pipeline.py says why). Measured on 2x H200 (NVLink) at 64K, 32/8
heads, fwd+bwd: C = 1 528.7 TFLOP/s/GPU, C = 2 523.1, C = 4 504.5 (BENCHMARKS.md): slower, so the
default is C = 1 (the path drawn above); `head_chunks=None` picks C by size (`choose_head_chunks`).

GQA: K/V heads are sent unexpanded when Hkv % P == 0. When Hkv < P (and P % Hkv == 0) each K/V head
is replicated P / Hkv times, to exactly P heads, so every rank receives the one K/V head its query
heads read. Anything else raises ValueError.

Building blocks for 2D SP (parallel/two_d.py): `seq_to_heads`, `heads_to_seq` and
`qkv_seq_to_heads` are public and autograd-aware; `ulysses_attention(..., local_attention=fn)` runs
any `fn(q, k, v) -> out` on the gathered [B, S, H/P, D] tensors. The gathered sequence is the ranks'
local chunks concatenated in group-rank order; a layout other than contiguous (zigzag over a larger
group) must be handled by the caller's `local_attention` or by permuting around these functions.

Packed documents: `document_ids` [B, S/P] are all-gathered once (they are tiny) into [B, S] in the
same order as the gathered sequence, so the local attention masks documents on the whole sequence
(attention/blocks.document_attention: the ragged and dense fused kernels on GPU, skipping other
documents' work). With one sequence per micro batch, documents inside one rank's shard are attended
there and only the ones crossing shard edges are exchanged (parallel/ulysses_documents.py), where that
keeps the ranks balanced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist

from longloom.attention.blocks import document_attention
from longloom.attention.document_plans import DocumentPlans, cached, check_document_ids_once
from longloom.attention.local import check_heads, expand_kv_heads, sdpa_attention
from longloom.parallel.ulysses_documents import document_local_attention, plan_document_split
from longloom.parallel.ulysses_pipeline import (
    choose_head_chunks,
    exchange_heads_to_seq,
    exchange_seq_to_heads,
    head_chunked_attention,
    layout_copy_,
    unpack_heads_to_seq,
    unpack_seq_to_heads,
)

LocalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _world_size(group: dist.ProcessGroup | None) -> int:
    # `None` means "no sequence parallelism" here, as in parallel/sharding.py (not the world group).
    return dist.get_world_size(group) if group is not None else 1


def _check_same_layout(tensors: Sequence[torch.Tensor], what: str) -> None:
    first = tensors[0]
    for tensor in tensors:
        if tensor.dim() != 4:
            raise ValueError(
                f"{what}: tensors must be [batch, seq, heads, head_dim]; got {tuple(tensor.shape)}"
            )
        if (tensor.size(0), tensor.size(1), tensor.size(3)) != (first.size(0), first.size(1), first.size(3)):
            raise ValueError(
                f"{what}: tensors disagree on batch, seq or head_dim: {[tuple(t.shape) for t in tensors]}"
            )
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(
                f"{what}: tensors must share dtype and device; got {tensor.dtype} and {first.dtype}"
            )


def _all_to_all_seq_to_heads(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, world_size: int
) -> list[torch.Tensor]:
    """[B, S/P, H_i, D] each -> [B, S, H_i/P, D] each, with one all_to_all_single. No autograd."""
    # Send buffer [P, B, S/P, sum_i H_i/P, D]: row p holds head slice p of every tensor, so one
    # collective moves all of them.
    parts = [tensor.unflatten(2, (world_size, tensor.size(2) // world_size)) for tensor in tensors]
    received = exchange_seq_to_heads(parts, group, world_size).result()
    # received[p] is rank p's sequence chunk of our head slice; chunks in rank order make the sequence.
    return unpack_seq_to_heads(received, [part.size(3) for part in parts])


def _all_to_all_heads_to_seq(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, world_size: int
) -> list[torch.Tensor]:
    """[B, S, h_i, D] each -> [B, S/P, P*h_i, D] each, with one all_to_all_single. No autograd."""
    # Send row p: sequence chunk p, which rank p keeps.
    received = exchange_heads_to_seq(tensors, group, world_size).result()
    # received[p] holds rank p's heads for our chunk: global head = p * h_i + local head.
    parts = unpack_heads_to_seq(received, [tensor.size(2) for tensor in tensors])
    gathered = [part.new_empty(*part.shape[:2], part.size(2) * part.size(3), part.size(4)) for part in parts]
    for into, part in zip(gathered, parts):
        layout_copy_(into.unflatten(2, part.shape[2:4]), part)  # [B, S/P, P, h, D] rows into [B, S/P, P*h, D]
    return gathered


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, world_size: int, *tensors: torch.Tensor):
        ctx.group, ctx.world_size = group, world_size
        return tuple(_all_to_all_seq_to_heads(tensors, group, world_size))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # One collective for all gradients, mirroring the forward (autograd materialises None as 0).
        return (None, None, *_all_to_all_heads_to_seq(grads, ctx.group, ctx.world_size))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, world_size: int, *tensors: torch.Tensor):
        ctx.group, ctx.world_size = group, world_size
        return tuple(_all_to_all_heads_to_seq(tensors, group, world_size))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, None, *_all_to_all_seq_to_heads(grads, ctx.group, ctx.world_size))


def seq_to_heads_fused(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, ...]:
    """Sequence-sharded -> head-sharded for several tensors in ONE all-to-all (and one in backward).

    Each tensor is [B, S/P, H_i, D] (same B, S/P, D, dtype) with H_i % P == 0; returns [B, S, H_i/P, D]
    each: rank r gets heads [r*H_i/P, (r+1)*H_i/P) of every tensor over the whole sequence, the
    sequence being the P local chunks in group-rank order. The outputs may be non-contiguous views.
    `group=None` means P = 1 (no communication, tensors returned as they are).
    """
    _check_same_layout(tensors, "seq_to_heads")
    world_size = _world_size(group)
    if world_size == 1:
        return tuple(tensors)
    for tensor in tensors:
        if tensor.size(2) % world_size:
            raise ValueError(
                f"seq_to_heads: {tensor.size(2)} heads cannot be split over {world_size} ranks: "
                "change model.heads / model.kv_heads or parallel.ulysses"
            )
    return _SeqToHeads.apply(group, world_size, *tensors)


def heads_to_seq_fused(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, ...]:
    """Inverse of `seq_to_heads_fused`: [B, S, h_i, D] each -> [B, S/P, P*h_i, D] each, one all-to-all."""
    _check_same_layout(tensors, "heads_to_seq")
    world_size = _world_size(group)
    if world_size == 1:
        return tuple(tensors)
    if tensors[0].size(1) % world_size:
        raise ValueError(
            f"heads_to_seq: sequence length {tensors[0].size(1)} is not divisible by {world_size} ranks: "
            f"change data.seq_len to a multiple of {world_size} or parallel.ulysses"
        )
    return _HeadsToSeq.apply(group, world_size, *tensors)


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, S/P, H, D] -> [B, S, H/P, D] (one all-to-all; backward is `heads_to_seq`)."""
    return seq_to_heads_fused([x], group)[0]


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, S, H/P, D] -> [B, S/P, H, D] (one all-to-all; backward is `seq_to_heads`)."""
    return heads_to_seq_fused([x], group)[0]


def kv_head_replication(query_heads: int, kv_heads: int, world_size: int) -> int:
    """How many copies of each K/V head the Ulysses all-to-all needs: 1 if kv_heads % P == 0, else P / kv_heads.

    Raises ValueError when the heads cannot be split over P ranks.
    """
    if query_heads % world_size:
        raise ValueError(
            f"Ulysses splits attention heads over {world_size} ranks but model.heads = {query_heads} is not "
            f"divisible by parallel.ulysses = {world_size}: change model.heads or parallel.ulysses"
        )
    if query_heads % kv_heads:
        raise ValueError(
            f"query heads {query_heads} are not a multiple of key/value heads {kv_heads}: "
            "model.heads must be divisible by model.kv_heads"
        )
    if kv_heads % world_size == 0:
        return 1
    if world_size % kv_heads == 0:
        return world_size // kv_heads
    raise ValueError(
        f"Ulysses needs model.kv_heads = {kv_heads} to be a multiple or a divisor of parallel.ulysses = "
        f"{world_size} (model.heads = {query_heads}): change model.kv_heads or parallel.ulysses"
    )


def qkv_seq_to_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, S/P, Hq, D], k/v [B, S/P, Hkv, D] -> [B, S, Hq/P, D], [B, S, max(Hkv, P)/P, D] x 2, one all-to-all.

    Rank r gets query heads [r*Hq/P, (r+1)*Hq/P) and exactly the K/V heads those read (replicated,
    P / Hkv copies each, only when Hkv < P), in the same GQA grouping: SDPA with enable_gqa on the
    local tensors is the global GQA attention restricted to rank r's query heads.
    """
    world_size = _world_size(group)
    check_heads(q, k, v)
    replication = kv_head_replication(q.size(2), k.size(2), world_size)
    # repeat_interleave is differentiable: the replicas' gradients are summed back onto the K/V head.
    k, v = expand_kv_heads(k, replication), expand_kv_heads(v, replication)
    q_heads, k_heads, v_heads = seq_to_heads_fused([q, k, v], group)
    return q_heads, k_heads, v_heads


def gather_document_ids(document_ids: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, S/P] -> [B, S]: every rank's ids, chunks in group-rank order (one all-gather; no autograd)."""
    world_size = _world_size(group)
    if world_size == 1:
        return document_ids
    parts = [torch.empty_like(document_ids) for _ in range(world_size)]
    dist.all_gather(parts, document_ids.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def resolve_head_chunks(
    head_chunks: int | None, batch: int, seq: int, query_heads_per_rank: int, kv_heads_per_rank: int
) -> int:
    """The number of pipelined head chunks C: `head_chunks`, checked, or the automatic choice when None."""
    if head_chunks is None:
        return choose_head_chunks(batch, seq, query_heads_per_rank, kv_heads_per_rank)
    if head_chunks < 1 or kv_heads_per_rank % head_chunks:
        raise ValueError(
            f"ulysses_attention: head_chunks = {head_chunks} must be >= 1 and divide the {kv_heads_per_rank} "
            f"K/V heads each rank attends (chunks carry whole GQA groups): choose a divisor of "
            f"{kv_heads_per_rank}, or None for the automatic choice"
        )
    return head_chunks


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    softmax_scale: float | None = None,
    local_attention: LocalAttention | None = None,
    document_ids: torch.Tensor | None = None,
    head_chunks: int | None = 1,
    document_plans: DocumentPlans | None = None,
) -> torch.Tensor:
    """Exact attention over the whole sequence from sequence shards, via two all-to-alls.

    q: [B, S/P, Hq, D]; k, v: [B, S/P, Hkv, D], contiguous layout over `group` (rank r holds chunk r).
    Returns out [B, S/P, Hq, D] in q's dtype. Differentiable in q, k, v.

    `local_attention(q, k, v) -> out` replaces the default SDPA on the gathered tensors
    (q [B, S, Hq/P, D], k/v [B, S, max(Hkv, P)/P, D]; with head chunks, C calls on 1/C of those heads
    each); it then owns the mask and the scale, and `causal` / `softmax_scale` are not used.
    `group=None` means one rank (plain attention).

    `document_ids` [B, S/P] (packed documents, same sharding as q): each token attends only within its
    document; a given `local_attention` is then called with `document_ids=` the gathered [B, S] ids.
    `document_plans`: the model call's cache (attention/document_plans.py): the ids are then checked
    and gathered once for every layer (the gathered tensor is the same object each time, so plans
    derived from it are shared too); None does both per call.

    `head_chunks` C pipelines the exchange with attention (parallel/ulysses_pipeline.py): C must divide
    the max(Hkv, P)/P K/V heads per rank; 1 (the default: pipelining measured slower on 2x H200, see the
    module docstring) is the unpipelined path; None chooses (`choose_head_chunks`: 4 or 2 at long
    sequences, 1 at short ones). The result is the same for every C. Every all-to-all is NCCL's
    all_to_all_single (gloo's on CPU).
    """
    check_document_ids_once(document_ids, q, "ulysses_attention", document_plans)
    world_size = _world_size(group)
    chunks = 1
    if world_size > 1:
        check_heads(q, k, v)
        replication = kv_head_replication(q.size(2), k.size(2), world_size)
        chunks = resolve_head_chunks(
            head_chunks,
            q.size(0),
            q.size(1) * world_size,
            q.size(2) // world_size,
            k.size(2) * replication // world_size,
        )
    # Gathered once; every head chunk's attention masks with the same [B, S] ids.
    gathered_ids = None
    if document_ids is not None:
        gather = partial(gather_document_ids, document_ids, group)
        gathered_ids = cached(document_plans, document_ids, "ulysses gathered ids", group, gather)
    if gathered_ids is not None and world_size > 1 and local_attention is None:
        # Documents inside one shard are attended there, with no exchange (parallel/ulysses_documents.py).
        plan = partial(plan_document_split, gathered_ids, world_size, dist.get_rank(group), causal)
        split = cached(document_plans, gathered_ids, "ulysses document split", (group, causal), plan)
        if split is not None:
            return document_local_attention(
                q, k, v, split, group, replication, causal, softmax_scale, document_plans
            )

    def attend(q_heads: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor) -> torch.Tensor:
        if gathered_ids is not None:
            if local_attention is None:
                return document_attention(
                    q_heads, k_heads, v_heads, gathered_ids, causal, softmax_scale, document_plans
                )
            return local_attention(q_heads, k_heads, v_heads, document_ids=gathered_ids)
        if local_attention is None:
            return sdpa_attention(q_heads, k_heads, v_heads, causal, softmax_scale)
        return local_attention(q_heads, k_heads, v_heads)

    if chunks == 1:
        return heads_to_seq(attend(*qkv_seq_to_heads(q, k, v, group)), group)
    _check_same_layout([q, k, v], "ulysses_attention")
    # repeat_interleave is differentiable: the replicas' gradients are summed back onto the K/V head.
    k, v = expand_kv_heads(k, replication), expand_kv_heads(v, replication)
    return head_chunked_attention(q, k, v, attend, group, world_size, chunks)
