"""Attention over one block of keys, returning (out, lse), and its backward given the final lse.

Ring-style SP computes attention as a sum over key blocks: the forward keeps each block's output
and log-sum-exp and merges them (attention/merge.py); the backward of a block only needs the
*final* output and lse, so it is the standard flash-attention backward with those plugged in.

Backends, chosen per call by `select_backend`:
- "cudnn" / "flash": aten's fused kernels (`_scaled_dot_product_{cudnn,flash}_attention` and their
  backwards), the fastest on Hopper; they take [B, H, S, D] and K/V with the full head count.
- "triton": attention/triton_flash.py, our FlashAttention-2 kernels (GQA without expanding K/V, fp32
  dK/dV group sums), imported on use (Triton is Linux-only). Without ids only on request: cuDNN
  measures faster on Hopper. With ids, the fallback of "varlen" (below).
- "varlen": packed documents through aten's ragged fused kernels (attention/varlen.py), below.
- "torch": the plain math path (attention/local.py `attention_scores`), used on CPU (and for fp64).

Shapes: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; out like q; lse [B, Hq, Sq] fp32.
Causal masks are aligned top-left and need Sq == Sk (ring schedules only use diagonal blocks causally).

Packed documents (`q_docs` [B, Sq], `k_docs` [B, Sk], attention/documents.py): a query sees only the
keys of its own document; one that sees none gets out 0 and lse -inf. aten's dense kernels take no
such mask, so with ids on CUDA `select_backend` picks, in this order:
- "varlen": attention/varlen.py. Documents are contiguous, so a block is ragged attention over one
  segment per document (a causal square on the diagonal, one query run x one key run off it) through
  aten's flash varlen kernel, with the masked work never launched. Measured on H200 (torch 2.11, fwd+bwd,
  causal, 32/8 heads, D 128): 316 / 263 TFLOP/s in 8K / 2K documents, against 190 / 129 for our Triton
  kernel with ids. A block that is one rectangle (one document, or one shared document off the
  diagonal) runs the dense kernel (cuDNN, about 520) on the slices. The ragged kernel is used only after
  a one-time probe against a plain-torch emulation of the same plumbing (aten's ragged entry points are
  private and change between releases); cuDNN's ragged kernel is not used (attention/varlen.py: why).
  Rows with no partner are set to out 0 / lse -inf / zero grads here, not left to the kernels.
- "triton": attention/triton_flash.py, where no ragged kernel passed its probe, for fp32, and for a
  causal block whose documents sit at different rows on its two sides (the ragged kernels align a
  segment's causal mask bottom-right; only diagonal blocks are causal in our schedules). It SKIPS the
  key tiles of other documents (per query tile it walks the key range of its own documents).
Why not `flex_attention`: it has no backward that takes the final (merged) out and lse, which ring
schedules need for every block. The CPU path is the plain math with the mask.
"""

from __future__ import annotations

import math

import torch

from longloom.attention.document_plans import DocumentPlans, cached
from longloom.attention.local import attention_scores, check_heads, expand_kv_heads
from longloom.attention.varlen import ragged_backward, ragged_forward, ragged_kernel
from longloom.attention.varlen_plan import SegmentPlan, dense_grid_floor, plan_segments

_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def select_backend(q: torch.Tensor, documents: bool = False) -> str:
    """The backend for q's device and dtype; with packed documents on CUDA the ragged fused kernels
    where one passed its probe (attention/varlen.py), else the Triton kernel."""
    if q.is_cuda and q.dtype in _CUDA_DTYPES + ((torch.float32,) if documents else ()):
        if documents:
            return "varlen" if _ragged_fits(q) and ragged_kernel() is not None else "triton"
        return "cudnn" if torch.backends.cudnn.is_available() and _cudnn_works() else "flash"
    return "torch"


def _ragged_fits(q: torch.Tensor) -> bool:
    # What aten's flash / cuDNN kernels take: half precision, head dims a multiple of 8 up to 256.
    return q.dtype in _CUDA_DTYPES and q.size(-1) % 8 == 0 and q.size(-1) <= 256


def _check_document_backend(backend: str, q_docs: torch.Tensor | None, k_docs: torch.Tensor | None) -> None:
    if (q_docs is None) != (k_docs is None):
        raise ValueError("block attention needs both q_docs and k_docs, or neither")
    if q_docs is not None and backend not in ("varlen", "triton", "torch"):
        raise ValueError(
            f"attention backend {backend!r} cannot mask packed documents: use backend='triton' or 'varlen' "
            "(GPU) or 'torch', or leave the backend unset"
        )


def _segments_or_none(
    segments: SegmentPlan | None, q_docs: torch.Tensor, k_docs: torch.Tensor, causal: bool, device
) -> SegmentPlan | None:
    """The block's ragged segments: given by the caller (ring plans, from host ids), else from the ids
    (one copy to the host); None where ragged kernels cannot express the block (Triton runs it)."""
    if ragged_kernel() is None:
        return None
    if segments is None:
        segments = plan_segments(q_docs, k_docs, causal)
    return None if segments is None else segments.to(device)


def _dense(q: torch.Tensor, k: torch.Tensor) -> tuple:
    """Dense forward and backward closures for a packed-document block (q, k) of the ragged path: its
    documents' dense work on the fused backend, except where cuDNN would meet a shape drawn by the data
    off the length grid. torch builds a cuDNN graph per new shape (76-115 ms on H200, and host memory
    kept for good: BENCHMARKS.md session 16). Causal documents are padded onto the grid
    (varlen_plan.dense_run_length) and a rectangle's keys are split onto it (varlen.py), so what is
    left off the grid is a non-causal remnant (a rectangle's last keys, a batch of equal documents off
    the diagonal): flash runs it, its compiled kernels take any shape. The whole block keeps cuDNN: its
    shape is the schedule's, not the data's."""
    backend = select_backend(q)
    block = (q.size(1), k.size(1))

    def backend_for(q_part: torch.Tensor, k_part: torch.Tensor, causal: bool) -> str:
        shape = (q_part.size(1), k_part.size(1))
        on_grid = all(dense_grid_floor(length) == length for length in shape)
        drawn_by_data = not causal and shape != block and not on_grid
        return "flash" if backend == "cudnn" and drawn_by_data else backend

    def forward(q, k, v, causal, scale):
        return block_attention_forward(q, k, v, causal, scale, backend_for(q, k, causal))

    def backward(dout, q, k, v, out, lse, causal, scale):
        return block_attention_backward(dout, q, k, v, out, lse, causal, scale, backend_for(q, k, causal))

    return forward, backward


_cudnn_state: dict[str, bool] = {}


def _cudnn_works() -> bool:
    """cuDNN SDPA is only in some builds and GPUs; probe once rather than fail mid-training."""
    if "ok" not in _cudnn_state:
        try:
            x = torch.zeros(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16)
            torch.ops.aten._scaled_dot_product_cudnn_attention(
                x, x, x, None, True, 0.0, True, False, scale=0.125
            )
            _cudnn_state["ok"] = True
        except (RuntimeError, AttributeError):
            _cudnn_state["ok"] = False
    return _cudnn_state["ok"]


def _cudnn_takes_grouped_kv() -> bool:
    """Whether cuDNN attention takes K/V with fewer heads than Q (GQA without copies), probed once.

    aten's cuDNN attention accepts head counts that divide Q's in some builds (pytorch/pytorch#139586);
    where it does, K/V are not expanded: at 512K tokens, 32 / 8 heads, that saves 6 GiB of copies in
    the forward and as much of expanded dK/dV in the backward. Trusted only if a small GQA forward and
    backward equal the expanded-K/V results here; otherwise (or on any error) K/V are expanded.
    """
    if "grouped_kv" not in _cudnn_state:
        try:
            _cudnn_state["grouped_kv"] = _grouped_kv_matches_expanded()
        except (RuntimeError, AttributeError, TypeError):
            _cudnn_state["grouped_kv"] = False
    return _cudnn_state["grouped_kv"]


def _kv_expansion(backend: str, group_size: int) -> int:
    """How many times the fused kernels need each K/V head repeated: 1 where cuDNN takes them grouped."""
    return 1 if backend == "cudnn" and _cudnn_takes_grouped_kv() else group_size


def _grouped_kv_matches_expanded() -> bool:
    generator = torch.Generator(device="cuda").manual_seed(0)

    def random(heads: int) -> torch.Tensor:
        return torch.randn(1, heads, 256, 64, device="cuda", dtype=torch.bfloat16, generator=generator)

    q, k, v, dout = random(4), random(2), random(2), random(4)
    results = []
    for key, value in ((k, v), (k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, key, value, None, True, 0.0, True, False, scale=0.125
        )[:2]
        zero = torch.zeros((), dtype=torch.int64, device="cuda")
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, key, value, out, lse.reshape(1, 4, 256, 1).contiguous(), zero, zero, None, None, None,
            256, 256, 0.0, True, scale=0.125,
        )  # fmt: skip
        results.append((out, *grads))
    (out, dq, dk, dv), (out_x, dq_x, dk_x, dv_x) = results
    if dk.shape != k.shape or dv.shape != v.shape:
        return False
    dk_x, dv_x = (grad.reshape(1, 2, 2, 256, 64).sum(2) for grad in (dk_x, dv_x))
    pairs = ((out, out_x), (dq, dq_x), (dk, dk_x), (dv, dv_x))
    return all(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2) for got, want in pairs)


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))


def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _lse_bhs(lse: torch.Tensor, q_len: int) -> torch.Tensor:
    # cuDNN returns [B, H, S, 1] on some versions; flash [B, H, S]. Keep [B, H, S] fp32.
    return lse.reshape(lse.size(0), lse.size(1), q_len).float()


def block_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str | None = None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] fp32). Not differentiable by autograd.

    `segments`: the block's ragged plan where the caller has it (attention/varlen_plan.plan_segments).
    """
    group_size = check_heads(q, k, v)
    scale = _scale(q, softmax_scale)
    backend = backend or select_backend(q, q_docs is not None)
    _check_document_backend(backend, q_docs, k_docs)
    if backend == "varlen":
        segments = _segments_or_none(segments, q_docs, k_docs, causal, q.device)
        if segments is not None:
            dense_forward, _ = _dense(q, k)
            return ragged_forward(q, k, v, segments, scale, ragged_kernel(), dense_forward)
        backend = "triton"
    if backend == "triton":
        from longloom.attention.triton_flash import flash_attention_forward

        if q_docs is not None:
            return flash_attention_forward(q, k, v, causal, scale, q_docs, k_docs)
        return flash_attention_forward(q, k, v, causal, scale)
    if backend == "torch":
        with torch.no_grad():
            scores = attention_scores(q, k, causal, scale, q_docs, k_docs)
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse.unsqueeze(-1))
            if q_docs is not None:  # rows with no key of their document: 0, not NaN
                probs = probs.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
            out = torch.einsum("bhqk,bkhd->bqhd", probs, expand_kv_heads(v, group_size).to(probs.dtype))
        return out.to(q.dtype), lse if q.dtype == torch.float64 else lse.float()
    expand = _kv_expansion(backend, group_size)
    qh, kh, vh = _to_bhsd(q), _to_bhsd(expand_kv_heads(k, expand)), _to_bhsd(expand_kv_heads(v, expand))
    if backend == "cudnn":
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qh, kh, vh, None, True, 0.0, causal, False, scale=scale
        )
    elif backend == "flash":
        result = torch.ops.aten._scaled_dot_product_flash_attention(
            qh, kh, vh, 0.0, causal, False, scale=scale
        )
    else:
        raise ValueError(f"unknown attention backend {backend!r}: use cudnn, flash, triton or torch")
    out, lse = result[0], result[1]
    return out.transpose(1, 2), _lse_bhs(lse, q.size(1))


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str | None = None,
    q_docs: torch.Tensor | None = None,
    k_docs: torch.Tensor | None = None,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of this block's share, given the *final* out and lse over all blocks.

    dq is [B, Sq, Hq, D]; dk/dv are [B, Sk, Hkv, D] (summed over each kv head's query heads),
    all in fp32 on the torch path and in q's dtype on the fused and Triton ones.
    """
    group_size = check_heads(q, k, v)
    scale = _scale(q, softmax_scale)
    backend = backend or select_backend(q, q_docs is not None)
    _check_document_backend(backend, q_docs, k_docs)
    if backend == "varlen":
        segments = _segments_or_none(segments, q_docs, k_docs, causal, q.device)
        if segments is not None:
            _, dense_backward = _dense(q, k)
            return ragged_backward(dout, q, k, v, out, lse, segments, scale, ragged_kernel(), dense_backward)
        backend = "triton"
    if backend == "triton":
        from longloom.attention.triton_flash import flash_attention_backward

        if q_docs is not None:
            return flash_attention_backward(dout, q, k, v, out, lse, causal, scale, q_docs, k_docs)
        return flash_attention_backward(dout, q, k, v, out, lse, causal, scale)
    if backend == "torch":
        with torch.no_grad():
            scores = attention_scores(q, k, causal, scale, q_docs, k_docs)
            compute = scores.dtype
            probs = torch.exp(scores - lse.to(compute).unsqueeze(-1))  # [B, H, Sq, Sk]
            if q_docs is not None:  # masked scores are 0 even where lse is -inf
                probs = probs.masked_fill(torch.isinf(scores), 0.0)
            dout_c, out_c = dout.to(compute), out.to(compute)
            v_full = expand_kv_heads(v, group_size).to(compute)
            k_full = expand_kv_heads(k, group_size).to(compute)
            dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout_c)
            dprobs = torch.einsum("bqhd,bkhd->bhqk", dout_c, v_full)
            delta = (dout_c * out_c).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, Sq, 1]
            dscores = probs * (dprobs - delta) * scale
            dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_full)
            dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.to(compute))
        return dq, _sum_groups(dk, group_size), _sum_groups(dv, group_size)
    expand = _kv_expansion(backend, group_size)
    qh, kh, vh = _to_bhsd(q), _to_bhsd(expand_kv_heads(k, expand)), _to_bhsd(expand_kv_heads(v, expand))
    oh, doh = _to_bhsd(out.to(q.dtype)), _to_bhsd(dout.to(q.dtype))
    seq_q, seq_k = q.size(1), k.size(1)
    # No dropout: the philox state is an unused placeholder. Cumulative lengths must be undefined
    # (None), not empty: a defined one switches the kernels to their variable-length path.
    undefined = None
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    if backend == "cudnn":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            doh,
            qh,
            kh,
            vh,
            oh,
            lse.unsqueeze(-1).contiguous(),
            zero,
            zero,
            None,
            undefined,
            undefined,
            seq_q,
            seq_k,
            0.0,
            causal,
            scale=scale,
        )
    elif backend == "flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            doh,
            qh,
            kh,
            vh,
            oh,
            lse.contiguous(),
            undefined,
            undefined,
            seq_q,
            seq_k,
            0.0,
            causal,
            zero,
            zero,
            scale=scale,
        )
    else:
        raise ValueError(f"unknown attention backend {backend!r}: use cudnn, flash, triton or torch")
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return dq, _sum_groups(dk, expand), _sum_groups(dv, expand)


def _sum_groups(grad: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, S, Hkv * g, D] -> [B, S, Hkv, D], summing each kv head's query-head copies."""
    if group_size == 1:
        return grad
    b, s, h, d = grad.shape
    return grad.view(b, s, h // group_size, group_size, d).sum(3)


def self_attention_segments(
    q: torch.Tensor,
    document_ids: torch.Tensor,
    causal: bool,
    rows: slice = slice(None),
    plans: DocumentPlans | None = None,
) -> SegmentPlan | None:
    """The ragged plan (on q's device) of self-attention over `rows` of `document_ids` [B, S] (the same
    rows for queries and keys) where q runs on the "varlen" backend; None elsewhere (no plan needed).

    With `plans`, built once per ids tensor, rows and mask for the whole model call (every layer, its
    recomputation and its backward); without, on every call (a device->host copy of the ids).
    """
    if select_backend(q, documents=True) != "varlen":
        return None

    def build() -> SegmentPlan | None:
        ids = document_ids[:, rows]
        segments = plan_segments(ids, ids, causal)
        return None if segments is None else segments.to(q.device)

    start, stop, _ = rows.indices(document_ids.size(1))  # slice(None) and slice(0, S) are one plan
    return cached(plans, document_ids, "segments", (start, stop, causal, q.device), build)


class _DocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, document_ids, causal, softmax_scale, plans):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        segments = self_attention_segments(q, document_ids, causal, plans=plans)  # forward and backward
        out, lse = block_attention_forward(
            q, k, v, causal, softmax_scale, q_docs=document_ids, k_docs=document_ids, segments=segments
        )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, document_ids)
        ctx.causal, ctx.softmax_scale, ctx.segments = causal, softmax_scale, segments
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, document_ids = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(
            dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, q_docs=document_ids, k_docs=document_ids,
            segments=ctx.segments,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    document_plans: DocumentPlans | None = None,
) -> torch.Tensor:
    """Self-attention over a whole packed sequence [B, S, H, D] (k/v may have fewer heads), each token
    within its own document (`document_ids` [B, S]); differentiable in q, k, v.
    `document_plans`: the model call's plan cache (attention/document_plans.py), None to plan here."""
    return _DocumentAttention.apply(q, k, v, document_ids, causal, softmax_scale, document_plans)
