"""The linear-attention scan, Triton (interpreter mode on CPU) and chunked torch, vs the fp64 reference.

Both implement the same scan (attention/linear_chunked.py docstring): forward and reverse, with an
incoming state and the outgoing state, and states-only mode; the backward is three scans.
"""

from __future__ import annotations

import functools

import pytest
import torch

from longloom.attention.linear_chunked import (
    chunked_linear_attention,
    chunked_linear_scan,
    linear_attention_backward,
    log_decay_of,
)
from longloom.attention.reference import reference_linear_attention

triton_linear = pytest.importorskip("longloom.attention.triton_linear")

TOLERANCE = 2e-5  # max abs error relative to the largest reference value (fp32 inputs)
BATCH, HEADS, DIM_K, DIM_V = 2, 2, 8, 12  # d_k != d_v, both below the 16-wide Triton tiles


SCANS = {
    "torch-block64": chunked_linear_scan,
    "torch-block16": functools.partial(chunked_linear_scan, block_size=16),
    "torch-block7": functools.partial(chunked_linear_scan, block_size=7),
    "triton": functools.partial(triton_linear.triton_linear_scan, block_size=16, segments=1),
    "triton-2-segments": functools.partial(triton_linear.triton_linear_scan, block_size=16, segments=2),
    # One piece per block (S=64: 4, S=48: 3; S=40 has no such cut: 1): the chain kernel's limit.
    "triton-fine": functools.partial(triton_linear.triton_linear_scan, block_size=16, segments="fine"),
}


def _inputs(seq: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(BATCH, seq, HEADS, DIM_K, generator=generator) for _ in range(2))
    v, grad_out = (torch.randn(BATCH, seq, HEADS, DIM_V, generator=generator) for _ in range(2))
    initial, final_grad = (torch.randn(BATCH, HEADS, DIM_K, DIM_V, generator=generator) for _ in range(2))
    return q, k, v, grad_out, initial, final_grad


def _reference_scan(q, k, v, decay, initial, reverse):
    """(out, final) of the scan's formula in fp64, by the quadratic reference plus explicit state terms."""
    q, k, v, initial = (x.double() for x in (q, k, v, initial))
    decay = torch.ones(q.size(2), dtype=torch.float64) if decay is None else decay.double()
    flip = (lambda x: x.flip(1)) if reverse else (lambda x: x)
    seq = q.size(1)
    t = torch.arange(seq, dtype=torch.float64)
    # Reversed, the state enters after the last token: query weight lam^(S-1-t), key weight lam^(t+1).
    query_exponent = seq - 1 - t if reverse else t + 1
    key_exponent = t + 1 if reverse else seq - 1 - t
    query_weight = decay[None, :] ** query_exponent[:, None]  # [S, H]
    key_weight = decay[None, :] ** key_exponent[:, None]
    out = flip(reference_linear_attention(flip(q), flip(k), flip(v), decay))
    out = out + torch.einsum("bshk,bhkv->bshv", q * query_weight[..., None], initial)
    final = initial * (decay**seq)[:, None, None] + torch.einsum(
        "bshk,bshv->bhkv", k * key_weight[..., None], v
    )
    return out, final


def _assert_close(got, want, name):
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= TOLERANCE * scale, f"{name}: max abs error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("seq", [40, 64])  # 40: a partial last block
@pytest.mark.parametrize("scan_name", list(SCANS))
def test_scan_matches_reference(scan_name, seq, with_decay, reverse):
    q, k, v, _, initial, _ = _inputs(seq)
    decay = torch.tensor([0.9, 1.0]) if with_decay else None
    log_decay = log_decay_of(decay)
    want_out, want_final = _reference_scan(q, k, v, decay, initial, reverse)
    out, final = SCANS[scan_name](q, k, v, log_decay, initial, reverse=reverse)
    _assert_close(out, want_out, "out")
    _assert_close(final, want_final, "final state")
    # Without outputs the scan only accumulates states (LASP-2's M and dM), from a zero state too.
    none, final = SCANS[scan_name](None, k, v, log_decay, initial, reverse=reverse)
    assert none is None
    _assert_close(final, want_final, "states-only final state")
    _, zero_state_final = _reference_scan(q, k, v, decay, torch.zeros_like(initial), reverse)
    _assert_close(SCANS[scan_name](None, k, v, log_decay, reverse=reverse)[1], zero_state_final, "M")


@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("scan_name", ["torch-block16", "triton", "triton-2-segments", "triton-fine"])
def test_backward_scans_match_autograd(scan_name, with_decay):
    seq = 48
    q, k, v, grad_out, initial, final_grad = _inputs(seq, seed=1)
    decay = torch.tensor([0.8, 1.0]) if with_decay else None
    leaves = [x.double().requires_grad_() for x in (q, k, v, initial)]
    out, final = _reference_scan(*leaves[:3], decay, leaves[3], reverse=False)
    ((out * grad_out.double()).sum() + (final * final_grad.double()).sum()).backward()
    grads = linear_attention_backward(
        SCANS[scan_name], q, k, v, grad_out, log_decay_of(decay), initial, final_grad
    )
    for name, got, leaf in zip(("dq", "dk", "dv", "d_initial_state"), grads, leaves):
        _assert_close(got, leaf.grad, name)


def test_chunked_linear_attention_is_the_reference_at_several_block_sizes():
    q, k, v, *_ = _inputs(150, seed=2)
    decay = torch.tensor([0.95, 1.0])
    want = reference_linear_attention(q.double(), k.double(), v.double(), decay.double())
    for block_size in (1, 16, 64, 150, 256):
        out, _ = chunked_linear_attention(q, k, v, decay, block_size=block_size)
        assert out.dtype == q.dtype
        _assert_close(out, want, f"block_size={block_size}")


def test_triton_half_inputs_keep_fp32_state():
    # fp16 stands in for bf16 (same kernel path: dots in the input dtype, fp32 state): the interpreter
    # multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584), so bf16 is checked on GPU only.
    q, k, v, *_ = _inputs(32, seed=3)
    q, k, v = (x.half() for x in (q, k, v))
    decay = torch.tensor([0.9, 1.0])
    out, final = triton_linear.triton_linear_scan(q, k, v, log_decay_of(decay), block_size=16, segments=1)
    assert out.dtype == torch.float16 and final.dtype == torch.float32
    zero = torch.zeros(BATCH, HEADS, DIM_K, DIM_V)
    want_out, want_final = _reference_scan(q, k, v, decay, zero, False)
    # Half-precision products, fp32 accumulation: within a few fp16 ulps of the output scale.
    assert (out.double() - want_out).abs().max() <= 2e-3 * want_out.abs().max()
    assert (final.double() - want_final).abs().max() <= 2e-3 * want_final.abs().max()


@pytest.mark.parametrize("reverse", [False, True])
def test_pieces_shorter_than_a_block_match_reference(reverse):
    # 5 pieces of 8 tokens, each one partial 16-token block, chained from an initial state with decay.
    q, k, v, _, initial, _ = _inputs(40)
    decay = torch.tensor([0.9, 1.0])
    want_out, want_final = _reference_scan(q, k, v, decay, initial, reverse)
    scan = functools.partial(triton_linear.triton_linear_scan, block_size=16, segments=5, reverse=reverse)
    out, final = scan(q, k, v, log_decay_of(decay), initial)
    _assert_close(out, want_out, "out")
    _assert_close(final, want_final, "final state")


def test_several_value_tiles_in_one_flat_grid_match_reference():
    # d_v = 80: two 64-wide value tiles (the last one masked) per (piece, head) on the flat grid axis.
    generator = torch.Generator().manual_seed(4)
    q, k = (torch.randn(BATCH, 32, HEADS, DIM_K, generator=generator) for _ in range(2))
    v = torch.randn(BATCH, 32, HEADS, 80, generator=generator)
    initial = torch.randn(BATCH, HEADS, DIM_K, 80, generator=generator)
    decay = torch.tensor([0.9, 1.0])
    want_out, want_final = _reference_scan(q, k, v, decay, initial, False)
    out, final = triton_linear.triton_linear_scan(
        q, k, v, log_decay_of(decay), initial, block_size=16, segments="fine"
    )
    _assert_close(out, want_out, "out")
    _assert_close(final, want_final, "final state")


def test_fine_segments_is_one_piece_per_block_within_the_state_memory_rule():
    fine = triton_linear.fine_segments
    # The test sizes: fp32 d_k=8, d_v=12 states are far smaller than a block's K and V.
    assert [fine(seq, DIM_K, DIM_V, 4, 16) for seq in (64, 48, 40)] == [4, 3, 1]
    # 64K tokens, d=128: bf16 needs 128-token pieces (states no larger than K and V), fp32 fits 64.
    assert fine(65536, 128, 128, 2, 64) == 512
    assert fine(65536, 128, 128, 4, 64) == 1024
    assert fine(65536, 64, 64, 2, 64) == 1024
    # The smallest piece that fits must also divide the sequence: 3 x 64 tokens at S = 576.
    assert fine(576, 128, 128, 2, 64) == 3


def test_triton_rejects_bad_block_and_segments():
    q, k, v, *_ = _inputs(40)
    with pytest.raises(ValueError, match="block_size"):
        triton_linear.triton_linear_scan(q, k, v, None, block_size=24)
    with pytest.raises(ValueError, match="segments 3 must divide the sequence length 40"):
        triton_linear.triton_linear_scan(q, k, v, None, block_size=16, segments=3)
    with pytest.raises(ValueError, match="segments must be a positive int, None or 'fine'; got 'finest'"):
        triton_linear.triton_linear_scan(q, k, v, None, block_size=16, segments="finest")
