"""Block-parallel linear attention (Triton, interpreter mode on CPU) vs the fp64 reference: the forward
scan's output and final state, and every gradient including the incoming state's (LASP-2's contract)."""

from __future__ import annotations

import pytest
import torch

from longloom.attention.linear_chunked import log_decay_of

blocks = pytest.importorskip("longloom.attention.triton_linear_blocks")
from tests.attention.test_triton_linear import (
    BATCH,
    DIM_K,
    HEADS,
    _assert_close,
    _inputs,
    _reference_scan,
)


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("seq", [40, 64, 16])  # 40: a partial last block; 16: a single block
def test_forward_matches_reference(seq, with_decay, with_initial):
    q, k, v, _, initial, _ = _inputs(seq)
    decay = torch.tensor([0.9, 1.0]) if with_decay else None
    start = initial if with_initial else torch.zeros_like(initial)
    want_out, want_final = _reference_scan(q, k, v, decay, start, reverse=False)
    out, final = blocks.block_parallel_forward(
        q, k, v, log_decay_of(decay), initial if with_initial else None, block_size=16
    )
    assert out.dtype == q.dtype and final.dtype == torch.float32
    _assert_close(out, want_out, "out")
    _assert_close(final, want_final, "final state")


@pytest.mark.parametrize("with_states", [False, True])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("seq", [48, 40])
def test_backward_matches_autograd(seq, with_decay, with_states):
    q, k, v, grad_out, initial, final_grad = _inputs(seq, seed=1)
    decay = torch.tensor([0.8, 1.0]) if with_decay else None
    if not with_states:
        initial, final_grad = torch.zeros_like(initial), torch.zeros_like(final_grad)
    leaves = [x.double().requires_grad_() for x in (q, k, v, initial)]
    out, final = _reference_scan(*leaves[:3], decay, leaves[3], reverse=False)
    ((out * grad_out.double()).sum() + (final * final_grad.double()).sum()).backward()
    grads = blocks.block_parallel_backward(
        q, k, v, grad_out, log_decay_of(decay),
        initial if with_states else None, final_grad if with_states else None, block_size=16,
    )  # fmt: skip
    for name, got, leaf in zip(("dq", "dk", "dv", "d_initial_state"), grads, leaves):
        _assert_close(got, leaf.grad, name)
    assert [g.dtype for g in grads] == [q.dtype, k.dtype, v.dtype, torch.float32]


def test_wide_values_and_strided_inputs():
    # d_v = 80: two 64-wide value tiles in the state walk and the output; q / k as views of one
    # [B, S, H, 2 d_k] projection (strided), as the model's fused projections give them.
    generator = torch.Generator().manual_seed(4)
    qk = torch.randn(BATCH, 32, HEADS, 2 * DIM_K, generator=generator)
    q, k = qk[..., :DIM_K], qk[..., DIM_K:]
    v, grad_out = (torch.randn(BATCH, 32, HEADS, 80, generator=generator) for _ in range(2))
    initial = torch.randn(BATCH, HEADS, DIM_K, 80, generator=generator)
    decay = torch.tensor([0.9, 1.0])
    want_out, want_final = _reference_scan(q, k, v, decay, initial, False)
    out, final = blocks.block_parallel_forward(
        q.contiguous(), k.contiguous(), v, log_decay_of(decay), initial, 16
    )
    _assert_close(out, want_out, "out")
    _assert_close(final, want_final, "final state")
    leaves = [x.double().requires_grad_() for x in (q, k, v, initial)]
    out, _ = _reference_scan(*leaves[:3], decay, leaves[3], reverse=False)
    (out * grad_out.double()).sum().backward()
    grads = blocks.block_parallel_backward(q, k, v, grad_out, log_decay_of(decay), initial, None, 16)
    for name, got, leaf in zip(("dq", "dk", "dv", "d_initial_state"), grads, leaves):
        _assert_close(got, leaf.grad, name)


def test_state_tiles_split_the_walk_without_changing_results():
    # d_k = 8 -> 16-wide tiles, d_v = 80 -> 16-wide tiles: five value tiles walk side by side.
    generator = torch.Generator().manual_seed(5)
    q, k = (torch.randn(BATCH, 40, HEADS, DIM_K, generator=generator) for _ in range(2))
    v, grad_out = (torch.randn(BATCH, 40, HEADS, 80, generator=generator) for _ in range(2))
    decay = torch.tensor([0.9, 1.0])
    wide, narrow = blocks.BlockLaunch(), blocks.BlockLaunch(state_tile=16)
    for launch in (wide, narrow):
        out, final = blocks.block_parallel_forward(q, k, v, log_decay_of(decay), None, 16, launch)
        want_out, want_final = _reference_scan(q, k, v, decay, torch.zeros(BATCH, HEADS, DIM_K, 80), False)
        _assert_close(out, want_out, f"out, state tile {launch.state_tile}")
        _assert_close(final, want_final, f"final, state tile {launch.state_tile}")
    got = [
        blocks.block_parallel_backward(q, k, v, grad_out, log_decay_of(decay), launch=x)
        for x in (wide, narrow)
    ]
    for name, one, other in zip(("dq", "dk", "dv", "d_initial"), *got):
        _assert_close(other, one.double(), name)


def test_rejects_a_bad_block():
    q, k, v, *_ = _inputs(40)
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16; got 24"):
        blocks.block_parallel_forward(q, k, v, None, block_size=24)
