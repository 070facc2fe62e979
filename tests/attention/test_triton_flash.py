"""Triton flash attention (interpreter mode on CPU) vs the fp64 reference: out, lse, dq, dk, dv.

Interpreted tiles are 16 x 16 (triton_flash._tiles), so S = 88 ends in a partial tile and S = 64 does
not; GQA is 4 query heads over 2 K/V heads throughout. The ring use is checked through blocks.py:
per-block forwards merged into the final (out, lse), then each block's backward given those.
"""

from __future__ import annotations

import pytest
import torch

from longloom.attention.blocks import block_attention_backward, block_attention_forward
from longloom.attention.merge import merge_attention_partials
from longloom.attention.reference import attention_with_lse

triton_flash = pytest.importorskip("longloom.attention.triton_flash")

# fp32 inputs, exact fp32 dots: the errors seen are ~5e-7 of the output scale; 4x headroom.
TOLERANCE = 2e-6
BATCH, HEADS, KV_HEADS = 2, 4, 2


def _inputs(seq_q: int, seq_k: int, dim: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seq_q, HEADS, dim, generator=generator).to(dtype)
    k, v = (torch.randn(BATCH, seq_k, KV_HEADS, dim, generator=generator).to(dtype) for _ in range(2))
    dout = torch.randn(BATCH, seq_q, HEADS, dim, generator=generator).to(dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, causal):
    """(out, lse, dq, dk, dv) in fp64 by autograd through attention/reference.py."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out, lse = attention_with_lse(*leaves, causal=causal)
    out.backward(dout.double())
    return out.detach(), lse.detach(), *(leaf.grad for leaf in leaves)


def _assert_close(got, want, name, tolerance=TOLERANCE):
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= tolerance * scale, f"{name}: max abs error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize(
    ("causal", "seq_q", "seq_k", "dim"),
    [
        (False, 64, 64, 16),
        (True, 64, 64, 16),
        (False, 88, 88, 32),  # partial last tile
        (True, 88, 88, 32),
        (False, 72, 96, 16),  # Sq != Sk, both ending in partial tiles
    ],
)
def test_forward_backward_match_fp64_reference(causal, seq_q, seq_k, dim):
    q, k, v, dout = _inputs(seq_q, seq_k, dim)
    want = _reference(q, k, v, dout, causal)
    out, lse = triton_flash.flash_attention_forward(q, k, v, causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (BATCH, HEADS, seq_q)
    _assert_close(out, want[0], "out")
    _assert_close(lse, want[1], "lse")
    grads = triton_flash.flash_attention_backward(dout, q, k, v, out, lse, causal)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for name, got, reference in zip(("dq", "dk", "dv"), grads, want[2:]):
        _assert_close(got, reference, name)


def test_half_inputs_accumulate_in_fp32():
    # fp16 stands in for bf16 (same kernel path): the interpreter multiplies bf16 bit patterns in
    # tl.dot (triton-lang/triton#11584), so bf16 is checked on GPU (tests/gpu/test_triton_flash_cuda.py).
    q, k, v, dout = _inputs(48, 48, 32, dtype=torch.float16, seed=1)
    want = _reference(q, k, v, dout, causal=True)
    out, lse = triton_flash.flash_attention_forward(q, k, v, causal=True)
    grads = triton_flash.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    # Half-precision operands (P and dS rounded to fp16 before their dots), fp32 accumulation.
    for name, got, reference in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        _assert_close(got, reference, name, tolerance=4e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_triton_backend_matches_torch_in_the_ring_use(causal):
    """Two key blocks merged into the final (out, lse), then each block's backward with those.

    Causal as a 2-rank contiguous ring does it: queries of the second half see the first key block
    unmasked and the second causally. Inputs are strided views (a half of q, a slice of lse).
    """
    seq, half = 80, 40
    q, k, v, dout = _inputs(seq, seq, 16, seed=2)
    want = _reference(q, k, v, dout, causal)
    rows = slice(half, seq) if causal else slice(0, seq)  # causal: the second half's queries only
    blocks = [(slice(0, half), False), (slice(half, seq), causal)]
    results = {}
    for backend in ("torch", "triton"):
        out = lse = None
        for keys, block_causal in blocks:
            block_out, block_lse = block_attention_forward(
                q[:, rows], k[:, keys], v[:, keys], block_causal, backend=backend
            )
            out, lse = merge_attention_partials(out, lse, block_out, block_lse)
        dq = torch.zeros(q[:, rows].shape, dtype=torch.float64)
        dk, dv = torch.zeros(k.shape, dtype=torch.float64), torch.zeros(v.shape, dtype=torch.float64)
        for keys, block_causal in blocks:
            dq_part, dk_part, dv_part = block_attention_backward(
                dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out, lse, block_causal, backend=backend
            )
            dq += dq_part
            dk[:, keys] += dk_part
            dv[:, keys] += dv_part
        results[backend] = (out, lse, dq, dk, dv)
    for name, got, expected in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["torch"]):
        _assert_close(got, expected.double(), f"triton vs torch {name}")
    if not causal:  # every key in one ring pass: the full attention
        for name, got, reference in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], want):
            _assert_close(got, reference, f"triton vs fp64 {name}")


def test_bad_inputs_raise_with_the_fix():
    q, k, v, _ = _inputs(32, 32, 32)
    with pytest.raises(ValueError, match=r"head_dim in \(16, 32, 64, 128\); got 24"):
        triton_flash.flash_attention_forward(q[..., :24], k[..., :24], v[..., :24], causal=False)
    with pytest.raises(ValueError, match="query heads 3 are not a multiple of key/value heads 2"):
        triton_flash.flash_attention_forward(q[:, :, :3], k, v, causal=False)
    with pytest.raises(ValueError, match="got 32 and 16: pass causal=False"):
        triton_flash.flash_attention_forward(q, k[:, :16], v[:, :16], causal=True)
    with pytest.raises(ValueError, match="backend='torch' for fp64"):
        triton_flash.flash_attention_forward(q.double(), k.double(), v.double(), causal=False)
