"""2D sequence parallelism: Ulysses all-to-all inside a group, TokenRing across groups.

Papers: USP, "A Unified Sequence Parallelism Approach for Long Context Generative AI" (Fang & Zhao,
2024) for the 2D split; TokenRing (parallel/tokenring.py) for the ring half. Idea: Ulysses is one
all-to-all pair per layer but limited by the head count and the all-to-all reach; the ring scales
past both and hides its transfers behind the block attention. Use each where it is cheapest.
`sequence_parallel_attention` is the one entry point for softmax attention under any split (none,
Ulysses, TokenRing or both); `choose_ring_degree` picks the split for `parallel.ring=auto`.

Naming: "2D" is this split of the SP group. "Hybrid" in longloom means LASP-2H models (linear and
softmax layers mixed, `model.layer_pattern`, parallel/lasp2.py), not this file. parallel/hybrid.py
only re-exports these names for the public import path of earlier releases.

Layout (parallel/dims.py): the sequence is zigzag over the whole SP group of P = R * U ranks; SP
rank p = r * U + u holds chunks p and 2P-1-p of 2P. The Ulysses all-to-all of ring rank r gathers
the U shards of its group in rank order:

    [c_{rU}, c_{2P-1-rU}, c_{rU+1}, c_{2P-2-rU}, ..., c_{rU+U-1}, c_{2P-U-rU}]

and a local permutation makes it [c_{rU} .. c_{rU+U-1}, c_{(2R-1-r)U} .. c_{(2R-1-r)U+U-1}], which
is super-chunks r and 2R-1-r of 2R: a zigzag layout over the ring group. TokenRing runs on that,
the permutation is undone and the inverse all-to-all restores [B, S/P, Hq, D].

Packed documents: Ulysses all-gathers the ids with its sequence (parallel/ulysses.py), the same
permutation puts them in super-chunk order, and TokenRing plans and masks its blocks with them.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from longloom.attention.blocks import document_attention
from longloom.attention.document_plans import DocumentPlans, cached, check_document_ids_once
from longloom.attention.local import sdpa_attention
from longloom.attention.tokenwise import AttentionOutputs, LocalCausalSchedule, tokenwise_attention
from longloom.parallel.dims import ParallelDims
from longloom.parallel.tokenring import tokenring_attention
from longloom.parallel.ulysses import kv_head_replication, ulysses_attention


def _zigzag_shards_to_super_chunks(x: torch.Tensor, ulysses: int) -> torch.Tensor:
    """[B, U*L, H, D], U zigzag shards [early, late] in rank order -> [early_0..early_{U-1}, late_{U-1}..late_0]."""
    halves = x.unflatten(1, (ulysses, 2, x.size(1) // (2 * ulysses)))  # [B, U, 2, L/2, H, D]
    early = halves[:, :, 0].flatten(1, 2)
    late = halves[:, :, 1].flip(1).flatten(1, 2)  # late chunk ids decrease with the Ulysses rank
    return torch.cat((early, late), dim=1)


def _super_chunks_to_zigzag_shards(x: torch.Tensor, ulysses: int) -> torch.Tensor:
    """Inverse of `_zigzag_shards_to_super_chunks`."""
    early, late = x.chunk(2, dim=1)
    early = early.unflatten(1, (ulysses, -1))
    late = late.unflatten(1, (ulysses, -1)).flip(1)
    return torch.stack((early, late), dim=2).flatten(1, 3)


def _check_dims(q: torch.Tensor, dims: ParallelDims) -> None:
    for name, group, size in (
        ("ulysses", dims.ulysses_group, dims.ulysses),
        ("ring", dims.ring_group, dims.ring),
    ):
        actual = dist.get_world_size(group) if group is not None else 1
        if actual != size:
            raise ValueError(
                f"dims.{name}_group has {actual} ranks but parallel.{name}={size}: build the groups with "
                "ParallelDims.build from the same parallel.* config"
            )
    per_rank = 2 if dims.layout == "zigzag" else 1
    if q.size(1) % per_rank:
        raise ValueError(
            f"sequence length {q.size(1) * dims.sp} ({q.size(1)} tokens on each of {dims.sp} SP ranks) is not "
            f"divisible by {per_rank * dims.sp} ({dims.layout} layout, parallel.ring={dims.ring}, "
            f"parallel.ulysses={dims.ulysses}): change data.seq_len to a multiple of {per_rank * dims.sp}"
        )


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dims: ParallelDims,
    causal: bool = True,
    softmax_scale: float | None = None,
    attention_outputs: AttentionOutputs | None = None,
    document_ids: torch.Tensor | None = None,
    document_plans: DocumentPlans | None = None,
) -> torch.Tensor:
    """Exact attention over the sequence sharded over `dims.sp_group` in `dims.layout`.

    q: [B, S/P, Hq, D]; k, v: [B, S/P, Hkv, D]; returns [B, S/P, Hq, D]. Dispatch: no SP -> local
    SDPA; ring == 1 -> Ulysses; ulysses == 1 -> TokenRing; both -> Ulysses inside, TokenRing across.
    `attention_outputs` (causal only): token-wise recomputation (attention/tokenwise.py) where the
    attention runs: on the whole sequence, after Ulysses' all-to-all, or round the ring.
    `document_ids` [B, S/P] (packed documents, sharded like q): attention within each document only.
    `document_plans` (attention/document_plans.py): the model call's cache, made next to the ids
    (models/llama.py): what attention derives from them (checks, gathers, ring and segment plans) is
    then made once for every layer, its recomputation and its backward; None makes it per call.
    """
    _check_dims(q, dims)
    check_document_ids_once(document_ids, q, "sequence_parallel_attention", document_plans)
    if attention_outputs is not None and not causal:
        raise ValueError("token-wise attention recomputation needs causal attention (causal=True)")
    local_attention = None
    if attention_outputs is not None:

        def local_attention(q_all, k_all, v_all, document_ids=None):
            schedule = LocalCausalSchedule(softmax_scale, document_ids, document_plans)
            return tokenwise_attention(q_all, k_all, v_all, attention_outputs, schedule)

    if dims.sp == 1:
        if document_ids is not None:
            if local_attention is not None:
                return local_attention(q, k, v, document_ids=document_ids)
            return document_attention(q, k, v, document_ids, causal, softmax_scale, document_plans)
        if local_attention is not None:
            return local_attention(q, k, v)
        return sdpa_attention(q, k, v, causal, softmax_scale)
    if dims.ring == 1:
        return ulysses_attention(
            q,
            k,
            v,
            dims.ulysses_group,
            causal,
            softmax_scale,
            local_attention=local_attention,
            document_ids=document_ids,
            document_plans=document_plans,
        )
    if dims.ulysses == 1:
        return tokenring_attention(
            q,
            k,
            v,
            dims.ring_group,
            causal,
            dims.layout,
            softmax_scale,
            attention_outputs,
            document_ids,
            document_plans,
        )

    def ring_across_groups(
        q_heads: torch.Tensor,
        k_heads: torch.Tensor,
        v_heads: torch.Tensor,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # [B, S/R, H/U, D] in gathered order -> zigzag super-chunks over the ring group and back.
        q_ring, k_ring, v_ring = (
            _zigzag_shards_to_super_chunks(t, dims.ulysses) for t in (q_heads, k_heads, v_heads)
        )
        ring_ids = None
        if document_ids is not None:  # the gathered ids: one tensor per model call with plans
            reorder = partial(_zigzag_shards_to_super_chunks, document_ids, dims.ulysses)
            ring_ids = cached(document_plans, document_ids, "ring order", dims.ulysses, reorder)
        out = tokenring_attention(
            q_ring,
            k_ring,
            v_ring,
            dims.ring_group,
            causal,
            "zigzag",
            softmax_scale,
            attention_outputs,
            ring_ids,
            document_plans,
        )
        return _super_chunks_to_zigzag_shards(out, dims.ulysses)

    return ulysses_attention(
        q,
        k,
        v,
        dims.ulysses_group,
        local_attention=ring_across_groups,
        document_ids=document_ids,
        document_plans=document_plans,
    )


# Cost model constants for `choose_ring_degree` (bf16 on H100/H200 nodes of 8 GPUs with NVLink and
# 400 Gb/s InfiniBand per GPU; replace with measured bench/ring.py figures).
ATTENTION_FLOPS = 400e12  # achieved attention FLOP/s per GPU
NVLINK_BYTES_PER_S = 150e9  # achieved point-to-point or all-to-all bandwidth per GPU inside a node
NETWORK_BYTES_PER_S = 40e9  # the same between nodes
RING_STEP_OVERHEAD_S = 50e-6  # launch, synchronisation and merge cost of one ring step
BYTES_PER_ELEMENT = 2  # bf16


def ring_layer_cost(
    sp: int, ring: int, heads: int, kv_heads: int, seq_len: int, head_dim: int = 128, gpus_per_node: int = 8
) -> float:
    """Modelled communication time (s) NOT hidden behind compute, one attention layer fwd+bwd, per rank.

    With n = S/sp tokens per rank, U = sp/ring and e = BYTES_PER_ELEMENT * head_dim bytes per token-head:
    - Ulysses (U > 1): q, k, v and out cross the all-to-all in forward, their gradients in backward:
      2 * n * e * (2 Hq + 2 Hkv') * (U-1)/U bytes, Hkv' = max(Hkv, U) (K/V replication); not hidden.
      Between nodes when U > gpus_per_node (Ulysses groups are neighbouring ranks, parallel/dims.py).
    - TokenRing (ring > 1), per step on L = S/ring tokens and h = Hq/U heads: forward sends Q (L h e
      bytes) while computing a zigzag half block (2 L^2 h D FLOPs); backward sends (Q, dO, O) (3 L h e)
      while computing 5 L^2 h D FLOPs. Exposed: the part of each of the ring-1 transfers longer than
      its compute, the last partial / dQ return (L h e, not overlapped) and a fixed per-step cost.
      A step runs at the pace of its slowest hop: between nodes once the SP group spans several.
    The attention FLOPs themselves are the same for every split and are left out.
    """
    ulysses = sp // ring
    tokens = seq_len / sp
    token_head_bytes = BYTES_PER_ELEMENT * head_dim
    cost = 0.0
    if ulysses > 1:
        bandwidth = NVLINK_BYTES_PER_S if ulysses <= gpus_per_node else NETWORK_BYTES_PER_S
        volume = 2 * tokens * token_head_bytes * (2 * heads + 2 * max(kv_heads, ulysses))
        cost += volume * (ulysses - 1) / ulysses / bandwidth
    if ring > 1:
        bandwidth = NVLINK_BYTES_PER_S if sp <= gpus_per_node else NETWORK_BYTES_PER_S
        length, local_heads = seq_len / ring, heads / ulysses
        for messages, flops in ((1.0, 2.0), (3.0, 5.0)):  # forward, backward
            transfer = messages * length * local_heads * token_head_bytes / bandwidth
            compute = flops * length * length * local_heads * head_dim / ATTENTION_FLOPS
            cost += (ring - 1) * max(0.0, transfer - compute)
            cost += length * local_heads * token_head_bytes / bandwidth + ring * RING_STEP_OVERHEAD_S
    return cost


def choose_ring_degree(
    sp: int, heads: int, kv_heads: int, seq_len: int, head_dim: int = 128, gpus_per_node: int = 8
) -> int:
    """`parallel.ring=auto`: the ring degree (ulysses = sp / ring) with the lowest `ring_layer_cost`.

    Only splits that work are considered: ring divides sp, Ulysses can split the heads (heads % U == 0
    and kv_heads a multiple or divisor of U) and seq_len fits the layout (2 * sp chunks when ring > 1).
    Ties go to the smaller ring (fewer steps, fewer kernels).
    """
    feasible = []
    for ring in range(1, sp + 1):
        if sp % ring:
            continue
        try:
            kv_head_replication(heads, kv_heads, sp // ring)
        except ValueError:
            continue
        if seq_len % (2 * sp if ring > 1 else sp) == 0:
            cost = ring_layer_cost(sp, ring, heads, kv_heads, seq_len, head_dim, gpus_per_node)
            feasible.append((cost, ring))
    if not feasible:
        raise ValueError(
            f"no split of the SP degree {sp} into parallel.ulysses x parallel.ring fits model.heads={heads}, "
            f"model.kv_heads={kv_heads} and data.seq_len={seq_len}: make data.seq_len a multiple of {2 * sp}"
        )
    return min(feasible)[1]
