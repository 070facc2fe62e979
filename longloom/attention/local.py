"""Plain local attention: one device, the whole (local) sequence, no communication.

- `sdpa_attention`: softmax attention through torch SDPA (cuDNN / flash on CUDA, exact math on CPU). The
  attention that runs when there is no sequence parallelism, and inside Ulysses after its all-to-all.
- `attention_scores`: the materialised scaled scores [B, H, Sq, Sk] with the causal or document mask; the
  math ("torch") backend of attention/blocks.py and of the test reference builds on it.
- `check_heads`, `expand_kv_heads`: the shape checks and the GQA head expansion every path shares.

Tensors are [B, S, H, D]. GQA: query head h reads key/value head h // (Hq // Hkv).
attention/reference.py (fp64 ground truth) is for tests only; production code imports from here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longloom.attention.documents import document_mask


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Returns the GQA group size Hq // Hkv after checking shapes."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.size(0) != k.size(0) or q.size(3) != k.size(3):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.size(2) % k.size(2):
        raise ValueError(
            f"query heads {q.size(2)} are not a multiple of key/value heads {k.size(2)}: "
            "model.heads must be divisible by model.kv_heads"
        )
    return q.size(2) // k.size(2)


def expand_kv_heads(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hkv * group_size, D] (each kv head repeated for its query heads)."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=2)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled scores [B, H, Sq, Sk] in the compute dtype, causal mask aligned top-left (Sq == Sk),
    -inf between different documents when `q_docs` / `k_docs` are given."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    k = expand_kv_heads(k, check_heads(q, k, k))
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), k.to(compute_dtype)) * scale
    if causal and q.size(1) != k.size(1):
        raise ValueError(
            f"causal block attention needs equal query/key lengths; got {q.size(1)} and {k.size(1)}"
        )
    if q_docs is not None and k_docs is not None:
        visible = document_mask(q_docs, k_docs, causal)
        return scores.masked_fill(~visible[:, None], float("-inf"))
    if causal:
        mask = torch.ones(q.size(1), k.size(1), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None = None
) -> torch.Tensor:
    """Attention on [B, S, H, D] tensors (k/v may have fewer heads: GQA) through torch SDPA.

    Under autograd on CUDA, aten picks cuDNN or flash attention (bf16/fp16); on CPU it is exact math.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=q.size(2) != k.size(2),
    )
    return out.transpose(1, 2)
