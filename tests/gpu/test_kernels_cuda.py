"""Our Triton kernels compiled for the GPU (not the interpreter): linear-attention scan, its block-parallel
form, and the (out, lse) merge."""

import pytest
import torch

from longloom.attention.linear_chunked import log_decay_of
from longloom.attention.merge import merge_attention_partials
from longloom.attention.reference import reference_linear_attention
from longloom.attention.triton_linear_blocks import block_parallel_backward, block_parallel_forward
from longloom.parallel.lasp2 import lasp2_linear_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("backend", ["triton", "triton-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_decay", [False, True])
def test_triton_linear_attention_forward_backward(dtype, with_decay, backend):
    torch.manual_seed(0)
    b, s, h, d = 2, 1024, 4, 64
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) * 0.3 for _ in range(3))
    decay = torch.tensor([0.9, 0.99, 0.999, 1.0], device="cuda") if with_decay else None
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference_linear_attention(q64, k64, v64, None if decay is None else decay.double())
    dout = torch.randn_like(q)
    want.backward(dout.double())
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    got = lasp2_linear_attention(qt, kt, vt, group=None, decay=decay, backend=backend)
    got.backward(dout)
    bound = 2e-3 if dtype == torch.float32 else 2e-2  # tf32 dots / bf16 operands
    assert _rel(got, want) < bound
    for g, w in ((qt.grad, q64.grad), (kt.grad, k64.grad), (vt.grad, v64.grad)):
        assert _rel(g, w) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_parallel_linear_attention_matches_reference(dtype):
    # d = 128 as in the models (the backward kernel's full [128, 128] state tiles), a partial last block.
    torch.manual_seed(1)
    b, s, h, d = 1, 1000, 4, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) * 0.3 for _ in range(3))
    decay = torch.tensor([0.9, 0.99, 0.999, 1.0], device="cuda")
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference_linear_attention(q64, k64, v64, decay.double())
    dout = torch.randn_like(q)
    want.backward(dout.double())
    out, _ = block_parallel_forward(q, k, v, log_decay_of(decay))
    dq, dk, dv, _ = block_parallel_backward(q, k, v, dout, log_decay_of(decay))
    bound = 2e-3 if dtype == torch.float32 else 2e-2  # tf32 dots / bf16 operands
    for got, expected in ((out, want), (dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert _rel(got, expected) < bound


def test_block_parallel_backward_reuses_its_memory_call_after_call():
    # The backward's forward walk runs on a side stream; its 16 MiB block states (S = 8192, H = 4,
    # d = 128, bf16) must come back to the compute stream's cache. Were they allocated on a stream taken
    # from torch's pool per call, each call would leave one more cached copy (reserved memory growing).
    torch.manual_seed(2)
    q, k, v, dout = (torch.randn(1, 8192, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    log_decay = log_decay_of(torch.tensor([0.9, 0.99, 0.999, 1.0], device="cuda"))
    reserved = []
    for _ in range(6):
        block_parallel_backward(q, k, v, dout, log_decay)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] == reserved[1], f"reserved memory after each call: {reserved}"


def test_triton_merge_matches_torch_merge():
    from longloom.attention.triton_merge import merge_attention_partials_triton_

    torch.manual_seed(0)
    out = torch.randn(2, 256, 8, 128, device="cuda")
    lse = torch.randn(2, 8, 256, device="cuda")
    block_out = torch.randn(2, 256, 8, 128, device="cuda", dtype=torch.bfloat16)
    block_lse = torch.randn(2, 8, 256, device="cuda")
    want_out, want_lse = merge_attention_partials(out.clone(), lse.clone(), block_out, block_lse)
    merge_attention_partials_triton_(out, lse, block_out, block_lse)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
