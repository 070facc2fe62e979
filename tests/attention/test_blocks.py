import pytest
import torch

from longloom.attention.blocks import block_attention_backward, block_attention_forward
from longloom.attention.merge import merge_attention_partials
from longloom.attention.reference import attention_with_lse


def _qkv(heads=4, kv_heads=2, seq=16, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(2, seq, kv_heads, dim, generator=g, dtype=dtype)
    v = torch.randn(2, seq, kv_heads, dim, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_block_forward_backward_match_autograd(causal, kv_heads):
    q, k, v = (t.requires_grad_() for t in _qkv(kv_heads=kv_heads))
    out, lse = attention_with_lse(q, k, v, causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    block_out, block_lse = block_attention_forward(q.detach(), k.detach(), v.detach(), causal)
    torch.testing.assert_close(block_out, out.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(block_lse, lse.detach(), rtol=0, atol=1e-12)
    dq, dk, dv = block_attention_backward(
        dout, q.detach(), k.detach(), v.detach(), block_out, block_lse, causal
    )
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_merging_key_blocks_equals_attention_over_all_keys():
    q, k, v = _qkv(seq=12)
    want_out, want_lse = attention_with_lse(q, k, v)
    out = lse = None
    for k_block, v_block in zip(k.split(4, dim=1), v.split(4, dim=1)):
        block_out, block_lse = block_attention_forward(q, k_block, v_block, causal=False)
        out, lse = merge_attention_partials(out, lse, block_out, block_lse)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-6)


def test_merge_ignores_blocks_without_keys():
    out = torch.ones(1, 2, 1, 3)
    lse = torch.zeros(1, 1, 2)
    merged, merged_lse = merge_attention_partials(
        out, lse, torch.zeros(1, 2, 1, 3), torch.full((1, 1, 2), float("-inf"))
    )
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    empty_out, _empty_lse = merge_attention_partials(
        torch.zeros(1, 2, 1, 3),
        torch.full((1, 1, 2), float("-inf")),
        torch.zeros(1, 2, 1, 3),
        torch.full((1, 1, 2), float("-inf")),
    )
    assert not torch.isnan(empty_out).any()


def test_bad_heads_raise():
    q, k, v = _qkv(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="model.kv_heads"):
        block_attention_forward(q, k, v, causal=False)
