"""Triton kernel: merge a partial attention result into fp32 (out, lse) accumulators in place.

Same math as attention/merge.py (lse = logaddexp(lse_a, lse_b), out = out_a * exp(lse_a - lse) +
out_b * exp(lse_b - lse)), in one pass over memory instead of the handful of elementwise kernels
torch launches; ring schedules run it once per step. Works on strided views (a zigzag half of an
accumulator), so the caller never copies. Rows with no key on either side stay at lse = -inf, out = 0.

Shapes: out [B, S, H, D] fp32, lse [B, H, S] fp32, block_out [B, S, H, D] any float dtype,
block_lse [B, H, S]. Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    out_ptr,
    lse_ptr,
    block_out_ptr,
    block_lse_ptr,
    rows,
    seq,
    heads,
    dim,
    out_stride_b,
    out_stride_s,
    out_stride_h,
    out_stride_d,
    lse_stride_b,
    lse_stride_h,
    lse_stride_s,
    block_out_stride_b,
    block_out_stride_s,
    block_out_stride_h,
    block_out_stride_d,
    block_lse_stride_b,
    block_lse_stride_h,
    block_lse_stride_s,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One row = one (batch, position, head); heads vary fastest so a contiguous out is read linearly.
    # int64: offsets pass 2^31 elements at a few hundred thousand tokens per rank.
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row < rows
    h = row % heads
    s = (row // heads) % seq
    b = row // (heads * seq)
    lse_a = tl.load(
        lse_ptr + b * lse_stride_b + h * lse_stride_h + s * lse_stride_s, mask=row_mask, other=float("-inf")
    )
    lse_b = tl.load(
        block_lse_ptr + b * block_lse_stride_b + h * block_lse_stride_h + s * block_lse_stride_s,
        mask=row_mask,
        other=float("-inf"),
    ).to(tl.float32)
    # Shift by the larger lse; a row where both are -inf would give -inf - -inf = nan, so shift by 0.
    top = tl.maximum(lse_a, lse_b)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight_a = tl.exp(lse_a - top)
    weight_b = tl.exp(lse_b - top)
    total = weight_a + weight_b
    has_keys = total > 0.0
    safe_total = tl.where(has_keys, total, 1.0)  # keeps log(0) and 1/0 out of the unused branch
    new_lse = tl.where(has_keys, top + tl.log(safe_total), float("-inf"))
    inverse = tl.where(has_keys, 1.0 / safe_total, 0.0)
    weight_a = weight_a * inverse
    weight_b = weight_b * inverse

    d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (d < dim)[None, :]
    out_offsets = (b * out_stride_b + s * out_stride_s + h * out_stride_h)[:, None] + d[
        None, :
    ] * out_stride_d
    block_offsets = (b * block_out_stride_b + s * block_out_stride_s + h * block_out_stride_h)[:, None] + d[
        None, :
    ] * block_out_stride_d
    out_a = tl.load(out_ptr + out_offsets, mask=mask, other=0.0)
    out_b = tl.load(block_out_ptr + block_offsets, mask=mask, other=0.0).to(tl.float32)
    merged = out_a * weight_a[:, None] + out_b * weight_b[:, None]
    tl.store(out_ptr + out_offsets, merged, mask=mask)
    tl.store(lse_ptr + b * lse_stride_b + h * lse_stride_h + s * lse_stride_s, new_lse, mask=row_mask)


def merge_attention_partials_triton_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Updates the fp32 accumulators `out` [B, S, H, D] and `lse` [B, H, S] in place (views allowed)."""
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"accumulators must be fp32; got out {out.dtype}, lse {lse.dtype}")
    if block_out.shape != out.shape or block_lse.shape != lse.shape:
        raise ValueError(
            f"partial shapes {tuple(block_out.shape)}, {tuple(block_lse.shape)} do not match the "
            f"accumulators {tuple(out.shape)}, {tuple(lse.shape)}"
        )
    batch, seq, heads, dim = out.shape
    if lse.shape != (batch, heads, seq):
        raise ValueError(f"lse {tuple(lse.shape)} must be [batch, heads, seq] = {(batch, heads, seq)}")
    rows = batch * seq * heads
    if rows == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_rows = max(1, min(64, 8192 // block_d))  # about 8K elements per program
    grid = (triton.cdiv(rows, block_rows),)
    _merge_kernel[grid](
        out,
        lse,
        block_out,
        block_lse,
        rows,
        seq,
        heads,
        dim,
        *out.stride(),
        *lse.stride(),
        *block_out.stride(),
        *block_lse.stride(),
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
    )
