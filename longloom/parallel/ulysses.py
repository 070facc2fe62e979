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
(attention/blocks.document_attention: Triton on GPU, skipping other documents' tiles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from longloom.attention.blocks import document_attention
from longloom.attention.documents import check_document_ids
from longloom.attention.local import check_heads, expand_kv_heads, sdpa_attention

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
    batch, seq_local, _, head_dim = tensors[0].shape
    local_heads = [tensor.size(2) // world_size for tensor in tensors]
    # Send buffer [P, B, S/P, sum_i H_i/P, D]: row p holds head slice p of every tensor, so one
    # collective moves all of them. Writing each tensor straight into its slot is the only copy.
    send = tensors[0].new_empty(world_size, batch, seq_local, sum(local_heads), head_dim)
    offset = 0
    for tensor, heads in zip(tensors, local_heads):
        send[..., offset : offset + heads, :].copy_(
            tensor.unflatten(2, (world_size, heads)).permute(2, 0, 1, 3, 4)
        )
        offset += heads
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[p] is rank p's sequence chunk of our head slice; chunks in rank order make the sequence.
    # A view when B == 1 (the usual long-sequence case), one copy otherwise.
    gathered = received.transpose(0, 1).reshape(batch, world_size * seq_local, sum(local_heads), head_dim)
    return list(gathered.split(local_heads, dim=2))


def _all_to_all_heads_to_seq(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, world_size: int
) -> list[torch.Tensor]:
    """[B, S, h_i, D] each -> [B, S/P, P*h_i, D] each, with one all_to_all_single. No autograd."""
    batch, seq, _, head_dim = tensors[0].shape
    seq_local = seq // world_size
    local_heads = [tensor.size(2) for tensor in tensors]
    # Send buffer [P, B, S/P, sum_i h_i, D]: row p holds sequence chunk p, which rank p keeps.
    send = tensors[0].new_empty(world_size, batch, seq_local, sum(local_heads), head_dim)
    offset = 0
    for tensor, heads in zip(tensors, local_heads):
        send[..., offset : offset + heads, :].copy_(
            tensor.unflatten(1, (world_size, seq_local)).transpose(0, 1)
        )
        offset += heads
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    # received[p] holds rank p's heads for our chunk: global head = p * h_i + local head.
    outputs, offset = [], 0
    for heads in local_heads:
        part = received[..., offset : offset + heads, :].permute(1, 2, 0, 3, 4)  # [B, S/P, P, h_i, D]
        outputs.append(part.reshape(batch, seq_local, world_size * heads, head_dim))
        offset += heads
    return outputs


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


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    causal: bool = True,
    softmax_scale: float | None = None,
    local_attention: LocalAttention | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over the whole sequence from sequence shards, via two all-to-alls.

    q: [B, S/P, Hq, D]; k, v: [B, S/P, Hkv, D], contiguous layout over `group` (rank r holds chunk r).
    Returns out [B, S/P, Hq, D] in q's dtype. Differentiable in q, k, v.

    `local_attention(q, k, v) -> out` replaces the default SDPA on the gathered tensors
    (q [B, S, Hq/P, D], k/v [B, S, max(Hkv, P)/P, D]); it then owns the mask and the scale, and
    `causal` / `softmax_scale` are not used. `group=None` means one rank (plain attention).

    `document_ids` [B, S/P] (packed documents, same sharding as q): each token attends only within its
    document; a given `local_attention` is then called with `document_ids=` the gathered [B, S] ids.
    """
    check_document_ids(document_ids, q, "ulysses_attention")
    q_heads, k_heads, v_heads = qkv_seq_to_heads(q, k, v, group)
    if document_ids is not None:
        gathered_ids = gather_document_ids(document_ids, group)
        if local_attention is None:
            out_heads = document_attention(q_heads, k_heads, v_heads, gathered_ids, causal, softmax_scale)
        else:
            out_heads = local_attention(q_heads, k_heads, v_heads, document_ids=gathered_ids)
    elif local_attention is None:
        out_heads = sdpa_attention(q_heads, k_heads, v_heads, causal, softmax_scale)
    else:
        out_heads = local_attention(q_heads, k_heads, v_heads)
    return heads_to_seq(out_heads, group)
