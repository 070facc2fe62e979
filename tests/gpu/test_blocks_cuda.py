"""Fused aten block attention (cuDNN, flash) on CUDA vs an fp64 reference: forward, lse and backward."""

import pytest
import torch

from longloom.attention.blocks import block_attention_backward, block_attention_forward, select_backend
from longloom.attention.reference import attention_with_lse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_fused_block_matches_reference(backend, causal, kv_heads):
    torch.manual_seed(0)
    shape_q, shape_kv = (2, 512, 8, 128), (2, 512, kv_heads, 128)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attention_with_lse(q64, k64, v64, causal)
    dout = torch.randn_like(q)
    out64.backward(dout.double())
    out, lse = block_attention_forward(q, k, v, causal, backend=backend)
    assert lse.shape == (2, 8, 512) and lse.dtype == torch.float32
    assert _rel(out, out64) < 1e-2
    assert (lse.double() - lse64).abs().max().item() < 2e-2
    dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, causal, backend=backend)
    assert dk.shape == k.shape and dv.shape == v.shape
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert _rel(got, want) < 2e-2


def test_default_backend_on_cuda_is_fused():
    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert select_backend(q) in ("cudnn", "flash")


def test_cudnn_grouped_kv_probe_is_consistent():
    """Where the probe lets cuDNN take K/V unexpanded, the results equal the expanded path's."""
    from longloom.attention import blocks

    if not blocks._cudnn_works():
        pytest.skip("no cuDNN attention in this build")
    torch.manual_seed(1)
    q = torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1024, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    grouped = blocks._cudnn_takes_grouped_kv()
    print(f"cuDNN takes grouped K/V: {grouped}")
    out, lse = block_attention_forward(q, k, v, True, backend="cudnn")
    dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, True, backend="cudnn")
    blocks._cudnn_state["grouped_kv"] = False  # the expanded path, for comparison
    try:
        out_x, lse_x = block_attention_forward(q, k, v, True, backend="cudnn")
        dq_x, dk_x, dv_x = block_attention_backward(dout, q, k, v, out_x, lse_x, True, backend="cudnn")
    finally:
        blocks._cudnn_state["grouped_kv"] = grouped
    for got, want in ((out, out_x), (lse, lse_x), (dq, dq_x), (dk, dk_x), (dv, dv_x)):
        assert _rel(got, want.double()) < 1e-2
