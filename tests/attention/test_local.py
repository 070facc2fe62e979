import pytest
import torch

from longloom.attention.local import check_heads, expand_kv_heads, sdpa_attention
from longloom.attention.reference import attention_with_lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_attention_matches_the_fp64_reference(causal, kv_heads):
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(2, 16, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv"
    )
    dout = torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64)
    want = attention_with_lse(q, k, v, causal, softmax_scale=0.3)[0]
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    got = sdpa_attention(q, k, v, causal, softmax_scale=0.3)
    got_grads = torch.autograd.grad(got, (q, k, v), dout)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


def test_kv_heads_expand_to_their_query_heads_and_bad_shapes_name_the_key():
    kv = torch.arange(3.0).view(1, 1, 3, 1)
    assert expand_kv_heads(kv, 2).flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    q = torch.zeros(1, 4, 6, 8)
    assert check_heads(q, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8)) == 2
    with pytest.raises(ValueError, match=r"query heads 6 .* key/value heads 4: model\.heads"):
        check_heads(q, torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 8))
