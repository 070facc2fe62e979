"""Plain-torch softmax attention with log-sum-exp: the ground truth for tests and the CPU path.

Tensors are [B, S, H, D]; lse is [B, H, S] in fp32 (fp64 for fp64 inputs), natural log.
GQA: query head h reads key/value head h // (Hq // Hkv).
Packed documents: `q_docs` [B, Sq] / `k_docs` [B, Sk] (attention/documents.py) restrict each query
to the keys of its own document; a query that sees no key gets out 0 and lse -inf.
"""

from __future__ import annotations

import math

import torch

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


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] in fp32/fp64). Differentiable."""
    group_size = check_heads(q, k, v)
    scores = attention_scores(q, k, causal, softmax_scale, q_docs, k_docs)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    if q_docs is not None:  # a query with no key in its document: lse -inf, probabilities 0 (not NaN)
        probs = probs.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
    v = expand_kv_heads(v, group_size).to(scores.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.to(q.dtype), lse


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention over one whole sequence; `document_ids` [B, S] masks across documents."""
    return attention_with_lse(q, k, v, causal, softmax_scale, document_ids, document_ids)[0]


def reference_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quadratic causal linear attention: o_t = sum_{s<=t} decay[h]^(t-s) (q_t . k_s) v_s. [B, S, H, D].

    With `document_ids` [B, S] only keys s of t's own document count (state and decay restart there).
    """
    seq = q.size(1)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), k.to(compute_dtype))
    t = torch.arange(seq, device=q.device)
    distance = (t[:, None] - t[None, :]).to(compute_dtype)  # [S, S], t - s
    causal = distance >= 0
    if decay is None:
        weights = causal.to(compute_dtype).expand(q.size(2), seq, seq)
    else:
        log_decay = torch.log(decay.to(compute_dtype))[:, None, None]  # [H, 1, 1]
        weights = torch.where(
            causal, torch.exp(log_decay * distance.clamp(min=0)), torch.zeros((), dtype=compute_dtype)
        )
    if document_ids is not None:
        same = document_mask(document_ids, document_ids, causal=False)  # [B, S, S]
        weights = weights * same[:, None].to(compute_dtype)  # [B, H, S, S]
    out = torch.einsum("bhqk,bkhd->bqhd", scores * weights, v.to(compute_dtype))
    return out.to(q.dtype)
