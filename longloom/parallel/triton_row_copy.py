"""Triton kernel: copy between two same-shape views whose trailing dims are one contiguous row in both.

Ulysses packs every all-to-all into a send buffer and unpacks what it receives (parallel/ulysses_pipeline.py):
[B, S/P, P, h, D] head slices into [P, B, S/P, sum h, D] rows, and back. In both views the trailing
(h, D) block is contiguous (4 KiB rows for 16 query heads of 128 bf16), only the leading dims are
strided. torch's copy_ takes its generic strided path for such views (per-element offsets, no vector
accesses), and a fwd+bwd of Ulysses makes six such copies of the layer's q/k/v or output bytes, on the
compute stream where nothing hides them. This kernel moves whole rows with wide vector accesses
instead; bench/ulysses_exchange.py times both on the real pack.

`copy_rows_(dst, src)`: dst[...] = src[...] for views of the same shape and dtype. The trailing dims
that are contiguous in both merge into one row of `width` elements; the leading dims (after merging
those that are contiguous into each other in both views, e.g. B = 1) must be at most three, each with
its own source and destination stride. Views that do not fit that shape go through torch's copy_, and
so do views with no leading dim left (one contiguous block in both: copy_ is a memcpy there; the pack
of a B = 1 attention output in [B, S, h, D] order is one) and rows of more than MAX_COLUMN_BLOCKS blocks.
The copy moves the same bits either way (no arithmetic), so results are bit-identical to copy_.
Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Leading dims the kernel indexes (rows = d0 x d1 x d2).
MAX_LEADING_DIMS = 3
# Rows narrower than this gain nothing from the kernel over copy_'s strided path.
MIN_ROW_BYTES = 256
# CUDA's limit on a grid's second axis, which counts the column blocks of a row.
MAX_COLUMN_BLOCKS = 65535


@triton.jit
def _row_copy_kernel(
    src_ptr,
    dst_ptr,
    rows,
    width,
    dim1,
    dim2,
    src_stride0,
    src_stride1,
    src_stride2,
    dst_stride0,
    dst_stride1,
    dst_stride2,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    column = tl.program_id(1).to(tl.int64) * BLOCK_WIDTH + tl.arange(0, BLOCK_WIDTH).to(tl.int64)
    index2 = row % dim2
    index1 = (row // dim2) % dim1
    index0 = row // (dim2 * dim1)
    src_row = index0 * src_stride0 + index1 * src_stride1 + index2 * src_stride2
    dst_row = index0 * dst_stride0 + index1 * dst_stride1 + index2 * dst_stride2
    mask = (row < rows)[:, None] & (column < width)[None, :]
    values = tl.load(src_ptr + src_row[:, None] + column[None, :], mask=mask)
    tl.store(dst_ptr + dst_row[:, None] + column[None, :], values, mask=mask)


def row_layout(
    shape: torch.Size, src_strides: tuple[int, ...], dst_strides: tuple[int, ...]
) -> tuple[int, list[tuple[int, int, int]]] | None:
    """(row width, [(size, src stride, dst stride)] of the leading dims), or None when the views do not
    have one contiguous trailing row and at most MAX_LEADING_DIMS leading dims after merging."""
    dims = [(size, s, d) for size, s, d in zip(shape, src_strides, dst_strides) if size != 1]
    width = 1
    while dims and dims[-1][1] == width and dims[-1][2] == width:  # contiguous in both views
        width *= dims.pop()[0]
    merged: list[tuple[int, int, int]] = []
    for size, src_stride, dst_stride in dims:
        if merged and merged[-1][1] == size * src_stride and merged[-1][2] == size * dst_stride:
            outer = merged.pop()  # the outer dim steps exactly over this one in both views: one dim
            size = outer[0] * size
        merged.append((size, src_stride, dst_stride))
    if width == 1 or len(merged) > MAX_LEADING_DIMS:
        return None
    return width, merged


def copy_rows_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for same-shape, same-dtype views, with the row kernel where the layout allows."""
    if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
        raise ValueError(
            f"copy_rows_: dst {tuple(dst.shape)} {dst.dtype} on {dst.device} and src {tuple(src.shape)} "
            f"{src.dtype} on {src.device} must match in shape, dtype and device; use Tensor.copy_ to convert"
        )
    layout = row_layout(dst.shape, src.stride(), dst.stride())
    if layout is None or not layout[1] or layout[0] * dst.element_size() < MIN_ROW_BYTES or dst.numel() == 0:
        return dst.copy_(src)
    width, leading = layout
    # 16-byte accesses along a row; enough rows per program that one moves ~32 KiB.
    block_width = min(triton.next_power_of_2(width), 4096 // dst.element_size())
    if triton.cdiv(width, block_width) > MAX_COLUMN_BLOCKS:
        return dst.copy_(src)
    leading = [(1, 0, 0)] * (MAX_LEADING_DIMS - len(leading)) + leading
    rows = dst.numel() // width
    block_rows = max(1, min(64, (32768 // dst.element_size()) // block_width))
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(width, block_width))
    try:
        _launch(grid, src, dst, rows, width, leading, block_rows, block_width)
    except RuntimeError as error:
        raise RuntimeError(
            f"copy_rows_: the row kernel failed for shape {tuple(dst.shape)} {dst.dtype}, src strides "
            f"{src.stride()}, dst strides {dst.stride()} (width {width}, leading dims {leading}, grid {grid}, "
            f"blocks {block_rows} x {block_width}): {error}. Tensor.copy_ does the same copy without it"
        ) from error
    return dst


def _launch(grid, src, dst, rows, width, leading, block_rows, block_width) -> None:
    (_, src0, dst0), (dim1, src1, dst1), (dim2, src2, dst2) = leading
    _row_copy_kernel[grid](
        src,
        dst,
        rows,
        width,
        dim1,
        dim2,
        src0,
        src1,
        src2,
        dst0,
        dst1,
        dst2,
        BLOCK_ROWS=block_rows,
        BLOCK_WIDTH=block_width,
        num_warps=8,
    )
