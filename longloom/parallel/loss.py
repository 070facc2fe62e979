"""Token-weighted cross entropy when the sequence (and the batch) is split over ranks.

Each rank holds the logits of its own tokens. The loss of the step is the mean over every valid
token in the group: sum of per-token losses / count of valid labels, both summed over the group in
ONE all-reduce. A rank whose tokens are all padding (-100) contributes zero, never NaN.

Gradient contract with DeepSpeed: the trainer passes the whole dp x sp group, and DeepSpeed AVERAGES
gradients over it (W ranks). Each rank therefore back-propagates `local_sum / global_count * W`, so
that the averaged gradient, (1/W) * sum_r W * d(local_sum_r) / global_count, is exactly the gradient
of global_sum / global_count, the loss one device would compute on the whole batch.

The cross entropy is computed in fp32 in chunks of tokens, and its gradient (softmax - one_hot) is
rebuilt chunk by chunk in the backward from the saved logits and log-sum-exp: no fp32 copy of the
[tokens, vocab] logits stays alive between forward and backward, which matters at a million tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossStats:
    """Detached figures for logging, identical on every rank of the group."""

    loss: torch.Tensor  # 0-d fp32: global_sum / global_count (0 when there is no valid token)
    tokens: torch.Tensor  # 0-d int64: number of valid labels over the group


class _SummedCrossEntropy(torch.autograd.Function):
    """Sum over valid tokens of -log softmax(logits)[label], computed in (at least) fp32, chunk by chunk.

    Saves the logits (in their own dtype) and the per-token log-sum-exp, and rebuilds
    softmax - one_hot chunk by chunk in the backward, scaled in fp32 and rounded once to the logits'
    dtype: autograd through `logits.float()` would keep an fp32 copy of all logits instead.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_tokens: int):
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        lse = torch.empty(logits.size(0), dtype=compute_dtype, device=logits.device)
        total = torch.zeros((), dtype=compute_dtype, device=logits.device)
        for start in range(0, logits.size(0), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk = logits[rows].to(compute_dtype)
            valid = labels[rows] != ignore_index
            picked = chunk.gather(1, torch.where(valid, labels[rows], 0).unsqueeze(1)).squeeze(1)
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            total += torch.where(valid, lse[rows] - picked, 0.0).sum()
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
            valid = labels[rows] != ctx.ignore_index
            # d(lse - picked)/dlogits = softmax - one_hot; padding tokens get zero.
            chunk_grad = torch.exp(logits[rows].to(lse.dtype) - lse[rows].unsqueeze(1))
            chunk_grad.scatter_add_(
                1, torch.where(valid, labels[rows], 0).unsqueeze(1), torch.full_like(chunk_grad[:, :1], -1.0)
            )
            grad[rows] = (chunk_grad * (valid.unsqueeze(1) * scale)).to(grad.dtype)
        return grad, None, None, None


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
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_labels = labels.reshape(-1)
    local_sum = _SummedCrossEntropy.apply(flat_logits, flat_labels, ignore_index, chunk_tokens)
    local_count = (flat_labels != ignore_index).sum()
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
