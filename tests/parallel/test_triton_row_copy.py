"""The row-copy kernel equals torch's copy_ bit for bit on the views Ulysses packs and unpacks.

CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py). Every case checks which path ran (the
kernel or copy_'s fallback), so a layout the kernel was meant for cannot silently fall back.
"""

from __future__ import annotations

import pytest
import torch

from longloom.parallel import triton_row_copy
from longloom.parallel.triton_row_copy import copy_rows_, row_layout
from longloom.parallel.ulysses_pipeline import (
    heads_to_seq_send_shape,
    pack_heads_to_seq,
    pack_seq_to_heads,
    seq_to_heads_send_shape,
    unpack_heads_to_seq,
)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the Triton kernel was launched."""
    calls = []
    kernel = triton_row_copy._row_copy_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_row_copy, "_row_copy_kernel", Counting())
    return calls


def _distinct(shape, dtype):
    # Every element distinct (in bf16 too: small whole numbers, and a sign pattern), so a misplaced row shows.
    values = torch.arange(torch.Size(shape).numel(), dtype=torch.float64) % 251 - 125
    return values.reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 2])
def test_ulysses_packs_equal_copy(kernel_calls, dtype, batch):
    world, seq_local, head_dim = 2, 24, 64
    q = _distinct((batch, seq_local, 8, head_dim), dtype)
    k = _distinct((batch, seq_local, 4, head_dim), dtype) + 0.5
    parts = [t.unflatten(2, (world, t.size(2) // world)) for t in (q, k)]
    send = torch.full(seq_to_heads_send_shape(parts, world), float("nan"), dtype=dtype)
    want = torch.empty_like(send)
    offset = 0
    for part in parts:
        count = part.size(3)
        copy_rows_(send[..., offset : offset + count, :], part.permute(2, 0, 1, 3, 4))
        want[..., offset : offset + count, :].copy_(part.permute(2, 0, 1, 3, 4))
        offset += count
    assert torch.equal(send, want) and torch.equal(send, pack_seq_to_heads(parts, torch.empty_like(send)))
    assert len(kernel_calls) == 2

    # The way back: received [P, B, S/P, h, D] rows into the output's [B, S/P, P, h, D] head slices.
    out = _distinct((batch, world * seq_local, 4, head_dim), dtype)
    sent = pack_heads_to_seq([out], torch.empty(heads_to_seq_send_shape([out], world), dtype=dtype))
    (received,) = unpack_heads_to_seq(sent, [4])
    gathered = torch.empty(batch, seq_local, world, 4, head_dim, dtype=dtype)
    copy_rows_(gathered, received)
    assert torch.equal(gathered, received) and len(kernel_calls) == 3


def test_rows_wider_than_a_block_and_ragged_counts(kernel_calls):
    # 3000-element rows (two column blocks, the second partial), 37 rows: masks on both axes.
    src = _distinct((37, 2, 3000), torch.float32)[:, 1]
    dst = torch.zeros(37, 3000 + 100)[:, 50:3050]
    copy_rows_(dst, src)
    assert torch.equal(dst, src) and len(kernel_calls) == 1


def test_layouts():
    # The trailing contiguous row, then leading dims merged where they step over each other in both.
    assert row_layout(torch.Size((2, 3, 4, 8)), (96, 32, 8, 1), (96, 32, 8, 1)) == (192, [])
    mergeable = row_layout(torch.Size((2, 3, 4, 8)), (8, 64, 16, 1), (96, 32, 8, 1))
    assert mergeable == (8, [(2, 8, 96), (12, 16, 8)])
    strided = row_layout(torch.Size((2, 3, 4, 8)), (8, 80, 16, 1), (96, 32, 8, 1))
    assert strided == (8, [(2, 8, 96), (3, 80, 32), (4, 16, 8)])
    assert row_layout(torch.Size((1, 5, 2, 8)), (999, 16, 8, 1), (80, 16, 8, 1)) == (80, [])
    # No contiguous trailing element, or four strided leading dims: not for the kernel.
    assert row_layout(torch.Size((4, 8)), (16, 2), (8, 1)) is None
    assert row_layout(torch.Size((2, 2, 2, 2, 4)), (64, 16, 256, 1024, 1), (32, 16, 8, 4, 1)) is None


def test_other_layouts_fall_back_to_copy(kernel_calls):
    src = _distinct((6, 40), torch.float32)
    dst = torch.empty(40, 6).t()  # transposed: no contiguous trailing row in dst
    copy_rows_(dst, src)
    narrow = torch.empty(6, 2, 40)[:, 0, :8]
    copy_rows_(narrow, src[:, :8])  # 32-byte rows: below MIN_ROW_BYTES
    assert torch.equal(dst, src) and torch.equal(narrow, src[:, :8]) and kernel_calls == []


def test_one_contiguous_block_and_overwide_rows_go_to_copy(kernel_calls, monkeypatch):
    # A B = 1 attention output [1, S, h, D] packed into [P, 1, S/P, h, D] is one contiguous block in both
    # views (no leading dim): copy_'s memcpy. The kernel once put it on the grid's second axis, which CUDA
    # caps at 65535 blocks ("invalid argument" at 64K tokens, 2 x H200).
    out = _distinct((1, 16, 4, 64), torch.float32)
    send = torch.empty(heads_to_seq_send_shape([out], 2))
    source = out.unflatten(1, (2, 8)).transpose(0, 1)
    copy_rows_(send, source)
    assert torch.equal(send, source) and kernel_calls == []
    # Rows with more column blocks than the grid's second axis holds: copy_ too.
    monkeypatch.setattr(triton_row_copy, "MAX_COLUMN_BLOCKS", 1)
    src = _distinct((37, 2, 3000), torch.float32)[:, 1]
    dst = torch.zeros(37, 3000)
    copy_rows_(dst, src)
    assert torch.equal(dst, src) and kernel_calls == []


def test_mismatched_tensors_name_the_fix():
    with pytest.raises(ValueError, match=r"must match in shape, dtype and device; use Tensor.copy_"):
        copy_rows_(torch.empty(4, 64), torch.empty(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dst \(4, 64\).*src \(4, 32\)"):
        copy_rows_(torch.empty(4, 64), torch.empty(4, 32))
