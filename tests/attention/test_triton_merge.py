import pytest
import torch

from longloom.attention.merge import merge_attention_partials
from longloom.attention.triton_merge import merge_attention_partials_triton_


def _partials(batch, seq, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(batch, seq, heads, dim, generator=g)
    lse = torch.randn(batch, heads, seq, generator=g) * 3
    block_out = torch.randn(batch, seq, heads, dim, generator=g).to(dtype)
    block_lse = torch.randn(batch, heads, seq, generator=g) * 3
    # Rows without keys on one side, and on both sides.
    lse[0, 0, 0] = float("-inf")
    block_lse[0, 1, 1] = float("-inf")
    lse[-1, -1, -1] = block_lse[-1, -1, -1] = float("-inf")
    out[-1, -1, -1] = block_out[-1, -1, -1] = 0
    return out, lse, block_out, block_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, seq, heads, dim", [(2, 5, 3, 8), (1, 7, 2, 6), (2, 70, 4, 16)])
def test_triton_merge_equals_torch_merge(batch, seq, heads, dim, dtype):
    out, lse, block_out, block_lse = _partials(batch, seq, heads, dim, dtype, seed=seq)
    want_out, want_lse = merge_attention_partials(out, lse, block_out, block_lse)
    merge_attention_partials_triton_(out, lse, block_out, block_lse)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    assert lse[-1, -1, -1] == float("-inf") and torch.all(out[-1, -1, -1] == 0)


def test_triton_merge_updates_strided_views_only():
    """The zigzag half of an accumulator is a strided view; the other half must stay untouched."""
    out, lse, _, _ = _partials(2, 8, 3, 8, torch.float32, seed=1)
    _, _, block_out, block_lse = _partials(2, 4, 3, 8, torch.float32, seed=2)
    want_out, want_lse = out.clone(), lse.clone()
    want_out[:, 4:], want_lse[:, :, 4:] = merge_attention_partials(
        out[:, 4:], lse[:, :, 4:], block_out, block_lse
    )
    merge_attention_partials_triton_(
        out[:, 4:], lse[:, :, 4:], block_out.transpose(1, 2).contiguous().transpose(1, 2), block_lse
    )
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)


def test_triton_merge_rejects_mismatched_shapes():
    out, lse, block_out, block_lse = _partials(1, 4, 2, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="do not match"):
        merge_attention_partials_triton_(out, lse, block_out[:, :2], block_lse)
    with pytest.raises(ValueError, match="fp32"):
        merge_attention_partials_triton_(out.double(), lse, block_out, block_lse)
