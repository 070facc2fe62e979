"""Plain-torch softmax and linear attention with log-sum-exp: the ground truth the tests compare against.

For tests only: production code (anything under longloom/) must not import this module
(tests/attention/test_reference_isolation.py checks it); the shared score and head helpers live in
attention/local.py.

Tensors are [B, S, H, D]; lse is [B, H, S] in fp32 (fp64 for fp64 inputs), natural log.
GQA: query head h reads key/value head h // (Hq // Hkv).
Packed documents: `q_docs` [B, Sq] / `k_docs` [B, Sk] (attention/documents.py) restrict each query
to the keys of its own document; a query that sees no key gets out 0 and lse -inf.
"""

from __future__ import annotations

import torch

from longloom.attention.documents import document_mask
from longloom.attention.local import attention_scores, check_heads, expand_kv_heads


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
