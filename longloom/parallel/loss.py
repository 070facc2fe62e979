"""Token-weighted cross entropy when the sequence (and the batch) is split over ranks.

Each rank holds its own tokens. The loss of the step is the mean over every valid token in the group:
sum of per-token losses / count of valid labels, both summed over the group in ONE all-reduce. A rank
whose tokens are all padding (-100) contributes zero, never NaN.

Gradient contract with DeepSpeed: the trainer passes the whole dp x sp group, and DeepSpeed AVERAGES
gradients over it (W ranks). Each rank therefore back-propagates `local_sum / global_count * W`, so
that the averaged gradient, (1/W) * sum_r W * d(local_sum_r) / global_count, is exactly the gradient
of global_sum / global_count, the loss one device would compute on the whole batch.

Two ways to get `local_sum`, one normalisation (`_token_weighted`):
- `sequence_parallel_cross_entropy(logits, ...)`: from logits the caller made. The cross entropy is
  computed in fp32 in chunks of tokens, and its gradient (softmax - one_hot) is rebuilt chunk by chunk
  in the backward from the saved logits and log-sum-exp: no fp32 copy of the [tokens, vocab] logits
  stays alive between forward and backward.
- `sequence_parallel_linear_cross_entropy(hidden, weight, ...)`: the LM head fused in, as in the tiled
  loss of ALST ("Arctic Long Sequence Training: Scalable And Efficient Training For Multi-Million Token
  Sequences", 2025) and Liger's fused linear cross entropy. Logits exist one chunk of tokens at a time:
  the forward keeps only the per-token log-sum-exp, the backward recomputes each chunk's logits to form
  its slice of d_hidden and to accumulate d_weight. At 128K tokens and a 128K vocabulary that is 32 GiB
  of bf16 logits (and as much again for their gradient) never allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100
# Fused head: fp32 logits of one chunk take at most this many elements (2^27 x 4 B = 512 MiB), i.e.
# ~1K tokens at a 128K vocabulary: the matmuls stay large enough to run at full speed on a GPU.
FUSED_CHUNK_ELEMENTS = 1 << 27


class LossStats(NamedTuple):
    """Detached figures for logging, identical on every rank of the group.

    A NamedTuple rather than a dataclass so that DeepSpeed's ZeRO-3 hooks, which walk a module's
    outputs, see through it when the model returns the loss from its forward.
    """

    loss: torch.Tensor  # 0-d fp32: global_sum / global_count (0 when there is no valid token)
    tokens: torch.Tensor  # 0-d int64: number of valid labels over the group


def _chunk_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [n], sum over valid tokens of lse - logit[label]) for one chunk of compute-dtype logits [n, V]."""
    valid = labels != ignore_index
    picked = logits.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    return lse, torch.where(valid, lse - picked, 0.0).sum()


def _chunk_logits_grad(
    logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: torch.Tensor
) -> torch.Tensor:
    """scale * (softmax - one_hot) for one chunk of compute-dtype logits [n, V]; padding tokens get zero."""
    valid = labels != ignore_index
    grad = torch.exp(logits - lse.unsqueeze(1))
    grad.scatter_add_(1, torch.where(valid, labels, 0).unsqueeze(1), torch.full_like(grad[:, :1], -1.0))
    return grad * (valid.unsqueeze(1) * scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


class _SummedCrossEntropy(torch.autograd.Function):
    """Sum over valid tokens of -log softmax(logits)[label], computed in (at least) fp32, chunk by chunk.

    Saves the logits (in their own dtype) and the per-token log-sum-exp, and rebuilds
    softmax - one_hot chunk by chunk in the backward, scaled in fp32 and rounded once to the logits'
    dtype: autograd through `logits.float()` would keep an fp32 copy of all logits instead.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_tokens: int):
        compute_dtype = _compute_dtype(logits.dtype)
        lse = torch.empty(logits.size(0), dtype=compute_dtype, device=logits.device)
        total = torch.zeros((), dtype=compute_dtype, device=logits.device)
        for start in range(0, logits.size(0), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            lse[rows], chunk_sum = _chunk_loss(logits[rows].to(compute_dtype), labels[rows], ignore_index)
            total += chunk_sum
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.chunk_tokens = ignore_index, chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_total.to(lse.dtype)
        for start in range(0, logits.size(0), ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            chunk = logits[rows].to(lse.dtype)
            grad[rows] = _chunk_logits_grad(chunk, lse[rows], labels[rows], ctx.ignore_index, scale).to(
                grad.dtype
            )
        return grad, None, None, None


class _SummedLinearCrossEntropy(torch.autograd.Function):
    """The same sum for logits = hidden @ weight.T, never holding more than one chunk of logits.

    Each chunk's logits are made by the same F.linear in the same dtype as the unfused head, then
    reduced in fp32 exactly like `_SummedCrossEntropy`; the backward rounds (softmax - one_hot) once to
    the model dtype, as autograd through the unfused head would, before the two matmuls. d_weight is
    accumulated over chunks in fp32 (a bf16 running sum would round once per chunk).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_tokens: int):
        compute_dtype = _compute_dtype(hidden.dtype)
        lse = torch.empty(hidden.size(0), dtype=compute_dtype, device=hidden.device)
        total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(hidden[rows], weight).to(compute_dtype)
            lse[rows], chunk_sum = _chunk_loss(logits, labels[rows], ignore_index)
            total += chunk_sum
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_tokens = ignore_index, chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        scale = grad_total.to(lse.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)
        for start in range(0, hidden.size(0), ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            logits = F.linear(hidden[rows], weight).to(lse.dtype)
            grad_logits = _chunk_logits_grad(logits, lse[rows], labels[rows], ctx.ignore_index, scale)
            grad_logits = grad_logits.to(hidden.dtype)  # [n, V], the only vocab-wide tensor alive
            del logits
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ hidden[rows]).to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _token_weighted(
    local_sum: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None, ignore_index: int
) -> tuple[torch.Tensor, LossStats]:
    """(local_sum / global_count * W, stats): the normalisation both entry points share."""
    local_count = (labels != ignore_index).sum()
    # One all-reduce for both numbers; fp64 keeps token counts and loss sums exact at millions of tokens.
    totals = torch.stack([local_sum.detach().double(), local_count.double()])
    world_size = 1
    if group is not None:
        world_size = dist.get_world_size(group)
        dist.all_reduce(totals, group=group)
    global_sum, global_count = totals[0], totals[1]
    denominator = global_count.clamp(min=1.0)  # no valid token anywhere: every local_sum is 0, loss 0
    loss_for_backward = local_sum * (world_size / denominator).to(local_sum.dtype)
    stats = LossStats(loss=(global_sum / denominator).float(), tokens=global_count.round().long())
    return loss_for_backward, stats


def sequence_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 8192,
) -> tuple[torch.Tensor, LossStats]:
    """(loss_for_backward, stats) for this rank's logits [..., V] and pre-shifted labels [...].

    loss_for_backward = local_sum / global_count * W (W = size of `group`, 0 when no token is valid):
    call `.backward()` on it and let DeepSpeed average gradients over the same W ranks.
    `stats.loss` is the global mean loss, `stats.tokens` the global count of valid labels.
    `group=None` means a single rank (W = 1, no communication).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: logits must be "
            "[..., vocab] over the same tokens as labels"
        )
    flat_labels = labels.reshape(-1)
    flat_logits = logits.reshape(-1, logits.size(-1))
    local_sum = _SummedCrossEntropy.apply(flat_logits, flat_labels, ignore_index, chunk_tokens)
    return _token_weighted(local_sum, flat_labels, group, ignore_index)


def sequence_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """`sequence_parallel_cross_entropy(F.linear(hidden, weight), labels, group)` without the logits.

    hidden: [..., E] (the final normed hidden states), weight: [V, E] (the LM head's, nn.Linear layout),
    labels: [...]. Same loss, same statistics and the same gradient contract; gradients for hidden and
    weight. chunk_tokens: tokens whose logits exist at once; None = FUSED_CHUNK_ELEMENTS / V.
    """
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} "
            "disagree: hidden must be [..., hidden] over the same tokens as labels, weight [vocab, hidden]"
        )
    if chunk_tokens is None:
        chunk_tokens = max(1, FUSED_CHUNK_ELEMENTS // weight.size(0))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be at least 1")
    flat_labels = labels.reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    local_sum = _SummedLinearCrossEntropy.apply(flat_hidden, weight, flat_labels, ignore_index, chunk_tokens)
    return _token_weighted(local_sum, flat_labels, group, ignore_index)
