"""Triton flash attention forward and backward with log-sum-exp, for one block of keys (attention/blocks.py).

Paper: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
Idea: never materialise the [Sq, Sk] score matrix; each program walks key tiles with a running max and
sum (online softmax) and keeps lse = log sum exp(scores), so the backward recomputes the probabilities
tile by tile as exp(scores - lse) instead of storing them.

Backward, given the FINAL out and lse (ring schedules merge per-block outputs first, then run each
block's backward with the merged ones): delta = rowsum(dout * out) first, then one kernel that owns a
K/V tile and loops over Q tiles (dK, dV) and one that owns a Q tile and loops over K/V tiles (dQ).
A separate dQ kernel instead of fp32 atomics from the dK/dV kernel: it recomputes QK^T and dO V^T
(7 matmuls instead of 5) but is deterministic and writes dQ once, in q's dtype, with no fp32 buffer.
GQA: a dK/dV program loops over the query heads of its K/V head, so the group sum happens in fp32
registers and K/V are never expanded in memory.

Shapes: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], out like q, lse [B, Hq, Sq] fp32 (natural log).
Causal masks are aligned top-left and need Sq == Sk. Dots take the inputs' dtype (bf16/fp16 on GPU)
with fp32 accumulation; fp32 inputs use exact fp32 dots. Any sequence length works (tiles are masked).
On CPU it runs under TRITON_INTERPRET=1 (the tests) with 16-wide tiles.

Packed documents (`q_docs` [B, Sq], `k_docs` [B, Sk], non-decreasing; attention/documents.py): a query
sees only keys of its own document. Work of other documents is skipped, not masked away: before the
launch, one searchsorted per tile finds the key range holding the documents of each query tile (and the
query range of each key tile, for dK/dV), and the kernels walk only that range. A query with no key of
its document gets out 0 and lse -inf (the running max is guarded against -inf - -inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634  # scores are kept in base 2 so the kernels use exp2


@dataclass(frozen=True)
class _Tiles:
    """Tile shapes, (query rows BLOCK_M, key rows BLOCK_N) per kernel, and launch settings."""

    forward: tuple[int, int]
    dkdv: tuple[int, int]
    dq: tuple[int, int]
    warps: int = 4
    stages: int = 1


def _tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> _Tiles:
    if device.type != "cuda":  # the interpreter: small tiles keep the CPU tests fast
        return _Tiles(forward=(16, 16), dkdv=(16, 16), dq=(16, 16))
    if dtype == torch.float32:  # 4-byte tiles: half the rows fit in shared memory
        return _Tiles(forward=(64, 32), dkdv=(32, 64), dq=(64, 32), warps=4, stages=2)
    # The dK/dV kernel keeps two [BLOCK_N, D] fp32 accumulators; the dQ kernel one [BLOCK_M, D].
    return _Tiles(forward=(128, 64), dkdv=(32, 128), dq=(128, 32), warps=8 if head_dim > 64 else 4, stages=3)


@triton.jit
def _forward_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, start, stop, seq_k, scale_log2,
    q_doc, k_doc_base,
    D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in range(start, stop, BLOCK_N):
        cols = (start_n + offs_n).to(tl.int64)
        k = tl.load(
            k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < seq_k, other=0.0
        )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if MASKED:  # only the tiles on the diagonal or past the end pay for the mask
            valid = cols[None, :] < seq_k
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            if HAS_DOCS:
                k_doc = tl.load(k_doc_base + cols, mask=cols < seq_k, other=-1)
                valid = valid & (q_doc[:, None] == k_doc[None, :])
            scores = tl.where(valid, scores, float("-inf"))
        # Without documents every row has seen a valid key by now (its diagonal, or key 0), so m_new is
        # finite; with them a row may have seen none yet: use 0 as its max (its p and alpha are then 0).
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if HAS_DOCS:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < seq_k, other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, seq_q, seq_k, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    Q_DOC, K_DOC, KEY_START, KEY_STOP, stride_qdb, stride_kdb,
    HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, D)
    row_mask = offs_m < seq_q
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DOCS:
        # Only the keys of this tile's documents (precomputed range), every tile masked.
        q_doc = tl.load(Q_DOC + b * stride_qdb + offs_m, mask=row_mask, other=-2)
        k_doc_base = K_DOC + b * stride_kdb
        tile = b * tl.num_programs(0) + tl.program_id(0)
        start = tl.load(KEY_START + tile)
        stop = tl.load(KEY_STOP + tile)
        if CAUSAL:
            stop = tl.minimum(stop, start_m + BLOCK_M)
        acc, m_i, l_i = _forward_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, start, stop, seq_k, scale_log2,
            q_doc, k_doc_base, D, BLOCK_N, CAUSAL, True, PRECISION, True,
        )  # fmt: skip
    else:
        # Key tiles wholly visible to every row of this tile skip the mask; the rest are masked.
        if CAUSAL:
            full_stop = (start_m // BLOCK_N) * BLOCK_N
            stop = tl.minimum(start_m + BLOCK_M, seq_k)
        else:
            full_stop = (seq_k // BLOCK_N) * BLOCK_N
            stop = seq_k
        acc, m_i, l_i = _forward_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, 0, full_stop, seq_k, scale_log2,
            0, K, D, BLOCK_N, CAUSAL, False, PRECISION, False,
        )  # fmt: skip
        acc, m_i, l_i = _forward_tiles(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, full_stop, stop, seq_k, scale_log2,
            0, K, D, BLOCK_N, CAUSAL, True, PRECISION, False,
        )  # fmt: skip
    # seq_k == 0 (or no key of the row's document) leaves l_i = 0: out 0 and lse -inf, as merge.py
    # expects of a block without keys.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    tl.store(LSE + (b * HEADS + h) * seq_q + offs_m, lse, mask=row_mask)


@triton.jit
def _delta_kernel(
    O, DO, DELTA, seq_q, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
    HEADS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term, once per row.
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, D)
    mask = offs_m[:, None] < seq_q
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * HEADS + h) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, seq_q, seq_k, scale, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_lb, stride_lh, stride_ls, stride_gb, stride_gs, stride_gh,
    Q_DOC, K_DOC, RANGE_START, RANGE_STOP, stride_qdb, stride_kdb,
    HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    kv_heads = HEADS // GROUP
    b = (tl.program_id(1) // kv_heads).to(tl.int64)
    kv_h = (tl.program_id(1) % kv_heads).to(tl.int64)
    offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, D)
    col_mask = offs_n[:, None] < seq_k
    k = tl.load(
        K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
        mask=col_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
        mask=col_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    first = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: earlier queries see no key here
    last = seq_q
    k_doc = tl.zeros([BLOCK_N], dtype=tl.int64)
    if HAS_DOCS:  # only the queries of this tile's documents (precomputed range)
        k_doc = tl.load(K_DOC + b * stride_kdb + offs_n, mask=offs_n < seq_k, other=-1).to(tl.int64)
        tile = b * tl.num_programs(0) + tl.program_id(0)
        first = tl.load(RANGE_START + tile)
        if CAUSAL:
            first = tl.maximum(first, start_n)
        last = tl.load(RANGE_STOP + tile)
    for group_index in range(GROUP):
        h = kv_h * GROUP + group_index
        for start_m in range(first, last, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = offs_m < seq_q
            q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
            q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
            do_ptrs = DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :]
            do = tl.load(do_ptrs, mask=row_mask[:, None], other=0.0)
            # lse = +inf past the last query makes those probabilities exactly 0.
            lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_ls
            lse_log2 = tl.load(lse_ptrs, mask=row_mask, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + (b * HEADS + h) * seq_q + offs_m, mask=row_mask, other=0.0)
            # Tiles transposed ([keys, queries]) so that dV = P^T dO and dK = dS^T Q need no transpose.
            scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
            p_t = tl.exp2(scores_t - lse_log2[None, :])
            if HAS_DOCS:
                q_doc = tl.load(Q_DOC + b * stride_qdb + offs_m, mask=row_mask, other=-2).to(tl.int64)
                valid_t = (q_doc[None, :] == k_doc[:, None]) & row_mask[None, :]
                if CAUSAL:
                    valid_t = valid_t & (offs_m[None, :] >= offs_n[:, None])
                p_t = tl.where(valid_t, p_t, 0.0)
            elif CAUSAL:
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    grad_offset = b * stride_gb + kv_h * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :]
    tl.store(DK + grad_offset, (dk * scale).to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + grad_offset, dv.to(DV.dtype.element_ty), mask=col_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, seq_q, seq_k, scale, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_lb, stride_lh, stride_ls, stride_gb, stride_gs, stride_gh,
    Q_DOC, K_DOC, RANGE_START, RANGE_STOP, stride_qdb, stride_kdb,
    HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    b = (tl.program_id(1) // HEADS).to(tl.int64)
    h = (tl.program_id(1) % HEADS).to(tl.int64)
    offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_mask = offs_m < seq_q
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)
    do_ptrs = DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :]
    do = tl.load(do_ptrs, mask=row_mask[:, None], other=0.0)
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_ls
    lse_log2 = tl.load(lse_ptrs, mask=row_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + (b * HEADS + h) * seq_q + offs_m, mask=row_mask, other=0.0)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    stop = tl.minimum(start_m + BLOCK_M, seq_k) if CAUSAL else seq_k
    start = 0
    q_doc = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_DOCS:  # only the keys of this tile's documents (precomputed range)
        q_doc = tl.load(Q_DOC + b * stride_qdb + offs_m, mask=row_mask, other=-2).to(tl.int64)
        tile = b * tl.num_programs(0) + tl.program_id(0)
        start = tl.load(RANGE_START + tile)
        stop = tl.minimum(stop, tl.load(RANGE_STOP + tile))
    for start_n in range(start, stop, BLOCK_N):
        cols = (start_n + offs_n).to(tl.int64)
        col_mask = cols[:, None] < seq_k
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=col_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=col_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        valid = cols[None, :] < seq_k
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if HAS_DOCS:
            k_doc = tl.load(K_DOC + b * stride_kdb + cols, mask=cols < seq_k, other=-1).to(tl.int64)
            valid = valid & (q_doc[:, None] == k_doc[None, :])
        p = tl.where(valid, tl.exp2(scores - lse_log2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=PRECISION)
    dq_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask[:, None])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> int:
    """The GQA group size, after checks whose messages say what to change."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q must be [batch, seq, heads, head_dim] and k, v equal [batch, seq, kv_heads, head_dim]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.size(0) != k.size(0) or q.size(3) != k.size(3):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.size(3) not in HEAD_DIMS:
        raise ValueError(
            f"Triton flash attention supports head_dim in {HEAD_DIMS}; got {q.size(3)}: "
            "change model.hidden / model.heads, or use another attention backend (cudnn, flash, torch)"
        )
    if q.size(2) % k.size(2):
        raise ValueError(
            f"query heads {q.size(2)} are not a multiple of key/value heads {k.size(2)}: "
            "model.heads must be divisible by model.kv_heads"
        )
    if causal and q.size(1) != k.size(1):
        raise ValueError(
            f"causal block attention needs equal query/key lengths; got {q.size(1)} and {k.size(1)}: "
            "pass causal=False for off-diagonal blocks (the causal mask is aligned top-left)"
        )
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise ValueError(
            f"Triton flash attention takes q, k, v of one dtype among fp16, bf16, fp32; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}: cast them, or use backend='torch' for fp64"
        )
    return q.size(2) // k.size(2)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    # Kernels address [B, S, H] by strides (views such as a zigzag half are fine) but head_dim by 1.
    return x if x.stride(-1) == 1 else x.contiguous()


def _softmax_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))


def _precision(q: torch.Tensor) -> str | None:
    return "ieee" if q.dtype == torch.float32 else None


def _document_ranges(
    tile_docs: torch.Tensor, other_docs: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each tile of `tile` rows of `tile_docs` [B, S]: the range [start, stop) of `other_docs` [B, S']
    holding the same documents, as two contiguous int32 [B, tiles] tensors (no host sync)."""
    seq = tile_docs.size(1)
    firsts = tile_docs[:, ::tile]
    lasts = tile_docs[
        :, torch.arange(tile - 1, seq + tile - 1, tile, device=tile_docs.device).clamp(max=seq - 1)
    ]
    start = torch.searchsorted(other_docs, firsts.contiguous())
    stop = torch.searchsorted(other_docs, lasts.contiguous(), right=True)
    return start.to(torch.int32).contiguous(), stop.to(torch.int32).contiguous()


def _document_args(
    q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, tile: int, by_keys: bool, dummy: torch.Tensor
) -> tuple:
    """(Q_DOC, K_DOC, RANGE_START, RANGE_STOP, stride_qdb, stride_kdb) kernel arguments."""
    if q_docs is None or k_docs is None:
        return dummy, dummy, dummy, dummy, 0, 0
    q_docs, k_docs = q_docs.to(torch.int64).contiguous(), k_docs.to(torch.int64).contiguous()
    start, stop = (
        _document_ranges(k_docs, q_docs, tile) if by_keys else _document_ranges(q_docs, k_docs, tile)
    )
    return q_docs, k_docs, start, stop, q_docs.stride(0), k_docs.stride(0)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] fp32). Not differentiable by autograd.

    `q_docs` [B, Sq] / `k_docs` [B, Sk]: non-decreasing document ids; keys of other documents are
    skipped (module docstring)."""
    group = _check(q, k, v, causal)
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    batch, seq_q, heads, dim = q.shape
    tiles = _tiles(dim, q.dtype, q.device)
    scale = _softmax_scale(q, softmax_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(seq_q, tiles.forward[0]), batch * heads)
    documents = _document_args(q_docs, k_docs, tiles.forward[0], False, lse)
    _forward_kernel[grid](
        q, k, v, out, lse, seq_q, k.size(1), scale * _LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *documents,
        HEADS=heads, GROUP=group, D=dim, BLOCK_M=tiles.forward[0], BLOCK_N=tiles.forward[1],
        CAUSAL=causal, PRECISION=_precision(q), HAS_DOCS=q_docs is not None,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out, lse


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D]) in q's dtype, given the FINAL out and lse [B, Hq, Sq].

    `out` may be fp32 (a ring schedule's merged accumulator); it is only read for delta, in fp32.
    """
    group = _check(q, k, v, causal)
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (q.size(0), q.size(2), q.size(1)):
        raise ValueError(
            f"out {tuple(out.shape)} and dout {tuple(dout.shape)} must be shaped like q {tuple(q.shape)} "
            f"and lse {tuple(lse.shape)} like [batch, heads, seq] = {(q.size(0), q.size(2), q.size(1))}"
        )
    q, k, v, out = (_unit_stride(x) for x in (q, k, v, out))
    dout = _unit_stride(dout.to(q.dtype))  # it meets v in a dot, so it takes the inputs' dtype
    lse = lse.float()
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.size(1), k.size(2)
    tiles = _tiles(dim, q.dtype, q.device)
    scale = _softmax_scale(q, softmax_scale)
    delta = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(seq_q, tiles.dq[0]), batch * heads)](
        out, dout, delta, seq_q, *out.stride()[:3], *dout.stride()[:3],
        HEADS=heads, D=dim, BLOCK_M=tiles.dq[0],
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    shared = (
        seq_q, seq_k, scale, scale * _LOG2E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *dout.stride()[:3], *lse.stride(),
    )  # fmt: skip
    launch = {
        "HEADS": heads, "GROUP": group, "D": dim, "CAUSAL": causal, "PRECISION": _precision(q),
        "HAS_DOCS": q_docs is not None, "num_warps": tiles.warps, "num_stages": tiles.stages,
    }  # fmt: skip
    _dkdv_kernel[(triton.cdiv(seq_k, tiles.dkdv[1]), batch * kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, *shared, *dk.stride()[:3],
        *_document_args(q_docs, k_docs, tiles.dkdv[1], True, delta),
        BLOCK_M=tiles.dkdv[0], BLOCK_N=tiles.dkdv[1], **launch,
    )  # fmt: skip
    _dq_kernel[(triton.cdiv(seq_q, tiles.dq[0]), batch * heads)](
        q, k, v, dout, lse, delta, dq, *shared, *dq.stride()[:3],
        *_document_args(q_docs, k_docs, tiles.dq[0], False, delta),
        BLOCK_M=tiles.dq[0], BLOCK_N=tiles.dq[1], **launch,
    )  # fmt: skip
    return dq, dk, dv
