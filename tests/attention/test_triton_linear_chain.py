"""The Triton chain of piece states (interpreter mode on CPU) gives chain_states' values exactly."""

from __future__ import annotations

import pytest
import torch

from longloom.attention.linear_chunked import chain_states, log_decay_of

triton_linear_chain = pytest.importorskip("longloom.attention.triton_linear_chain")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_chain_kernel_matches_chain_states(dtype, reverse, with_decay, with_initial):
    generator = torch.Generator().manual_seed(0)
    pieces, batch, heads, dim_k, dim_v = 5, 2, 3, 8, 40  # d_v spans two 32-wide tiles, the last masked
    # The scan's piece states come as [B * N, H, d_k, d_v], read as a transposed [N, B, ...] view.
    states = torch.randn(batch, pieces, heads, dim_k, dim_v, generator=generator, dtype=dtype).transpose(0, 1)
    decay = torch.tensor([0.9, 1.0, 0.5]) if with_decay else None
    log_decay = log_decay_of(decay, dtype)
    # The backward passes transposed initial states: a strided view here too.
    initial = None
    if with_initial:
        initial = torch.randn(batch, heads, dim_v, dim_k, generator=generator, dtype=dtype).transpose(-1, -2)
    want_incoming, want_final = chain_states(states, log_decay, 7, initial, reverse)
    incoming, final = triton_linear_chain.triton_chain_states(states, log_decay, 7, initial, reverse)
    assert incoming.dtype == final.dtype == dtype
    assert incoming.stride() == states.stride()  # laid out like the states: the scan reshapes it as a view
    # Same operations in the same order: equal up to the last bit.
    torch.testing.assert_close(incoming, want_incoming, rtol=0, atol=0)
    torch.testing.assert_close(final, want_final, rtol=0, atol=0)
    # A scan without outputs asks for the final state alone.
    none, final = triton_linear_chain.triton_chain_states(states, log_decay, 7, initial, reverse, False)
    assert none is None
    torch.testing.assert_close(final, want_final, rtol=0, atol=0)


def test_chain_kernel_of_one_piece_passes_the_initial_state_on():
    states = torch.randn(1, 1, 2, 16, 16, dtype=torch.float64)
    initial = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    log_decay = log_decay_of(torch.tensor([0.5, 1.0]), torch.float64)
    incoming, final = triton_linear_chain.triton_chain_states(states, log_decay, 3, initial)
    torch.testing.assert_close(incoming[0], initial, rtol=0, atol=0)
    torch.testing.assert_close(
        final, states[0] + initial * torch.tensor([0.125, 1.0]).double().view(-1, 1, 1)
    )


def test_chain_kernel_rejects_states_without_a_piece_axis():
    with pytest.raises(
        ValueError, match=r"states must be \[pieces, batch, heads, d_k, d_v\]; got \(2, 3, 8, 8\)"
    ):
        triton_linear_chain.triton_chain_states(torch.zeros(2, 3, 8, 8), None, 4)
