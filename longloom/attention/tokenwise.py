"""Token-wise attention recomputation: keep the last tokens' attention outputs, recompute the first ones.

Paper: "MEMO: Fine-grained Tensor Management For Ultra-long Context LLM Training" (Zhao et al., 2024),
token-wise activation recomputation and swapping. With activation checkpointing, backward recomputes
each layer from its input; at long sequence lengths that recomputation is dominated by causal attention
(quadratic in tokens, the rest of the layer is linear). If the attention output and log-sum-exp of a
share of the query tokens were kept (swapped to host memory by offload/activations.py), backward
recomputes attention for the other queries only, then runs the usual attention backward over all of
them.

Which tokens: the *last* ones in the attention's own token order (increasing positions, also for the
zigzag shards of a ring). Under a causal mask query i attends to i + 1 keys, so the last tokens are the
most expensive to recompute; keeping the last `share` of the queries leaves about (1 - share)^2 of the
attention recomputation (share 0.5: a quarter). Where the kept outputs are held (host memory for
offload.activations' share, GPU memory for offload.device_activations' share) is the keeper's business:
it hands them back as pieces in token order, and the kept tokens are the last ones either way.

The attention itself is a `schedule`: `forward(q, k, v, query_rows) -> (out, lse)` of the first
`query_rows` queries, and `backward(dout, q, k, v, out, lse) -> (dq, dk, dv)` over all of them. On the
whole sequence (no SP, or after Ulysses' all-to-all) that is one causal block (`LocalCausalSchedule`);
under TokenRing it is the ring schedule, with the recomputed query prefix travelling round the ring
(parallel/tokenring.py).
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch

from longloom.attention.blocks import (
    block_attention_backward,
    block_attention_forward,
    self_attention_segments,
)
from longloom.attention.document_plans import DocumentPlans


class AttentionOutputs:
    """What one checkpointed layer keeps of its attention outputs; offload/activations.py implements it.

    The layer's first forward *records* (`replaying` False): it hands over the last `kept_tokens(S)`
    query tokens' out [B, q, H, D] and lse [B, H, q]. Its recomputation in backward *replays*: the same
    attention calls, in the same order, get them back, as consecutive pieces of those tokens (kept in
    different places: host and GPU memory) that together are the kept tail.
    """

    replaying: bool = False

    def kept_tokens(self, total_tokens: int) -> int:
        raise NotImplementedError

    def keep(self, out_tail: torch.Tensor, lse_tail: torch.Tensor) -> None:
        raise NotImplementedError

    def restore(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(out pieces, lse pieces) of the kept tokens in token order: cat along tokens is the kept tail."""
        raise NotImplementedError

    def attention_backward_started(self) -> None:
        """Called as the attention backward of the replayed layer begins (a point to start prefetching)."""


class AttentionSchedule(Protocol):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class LocalCausalSchedule:
    """Causal attention over the whole sequence on this rank [B, S, H, D].

    The first r queries attend only to the first r keys, so their recomputation is a smaller causal
    block, top-left aligned like the full one, with no merge. `document_ids` [B, S] (packed documents)
    restrict each query to its own document, in the recomputation too; `document_plans` (the model
    call's cache, attention/document_plans.py) keeps their segment plans for every layer.
    """

    def __init__(
        self,
        softmax_scale: float | None = None,
        document_ids: torch.Tensor | None = None,
        document_plans: DocumentPlans | None = None,
    ):
        self.softmax_scale = softmax_scale
        self.document_ids = document_ids
        self.document_plans = document_plans

    def _documents(self, q: torch.Tensor, rows: slice) -> dict:
        if self.document_ids is None:
            return {}
        ids = self.document_ids[:, rows]
        segments = self_attention_segments(q, self.document_ids, True, rows, self.document_plans)
        return {"q_docs": ids, "k_docs": ids, "segments": segments}

    def forward(self, q, k, v, query_rows):
        rows = slice(0, query_rows)
        return block_attention_forward(
            q[:, rows], k[:, rows], v[:, rows], True, self.softmax_scale, **self._documents(q, rows)
        )

    def backward(self, dout, q, k, v, out, lse):
        return block_attention_backward(
            dout, q, k, v, out, lse, True, self.softmax_scale, **self._documents(q, slice(None))
        )


class _TokenwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, outputs: AttentionOutputs, schedule: AttentionSchedule):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        total = q.size(1)
        recomputed = total - outputs.kept_tokens(total)
        if outputs.replaying:
            out_pieces, lse_pieces = outputs.restore()
            if recomputed > 0:
                out_head, lse_head = schedule.forward(q, k, v, recomputed)
                out_pieces = [out_head.to(q.dtype), *out_pieces]
                lse_pieces = [lse_head.to(lse_pieces[0].dtype), *lse_pieces]
            # One piece (all kept in one place, nothing recomputed) is used as it is: no copy.
            out = out_pieces[0] if len(out_pieces) == 1 else torch.cat(out_pieces, dim=1)
            lse = lse_pieces[0] if len(lse_pieces) == 1 else torch.cat(lse_pieces, dim=2)
        else:
            out, lse = schedule.forward(q, k, v, total)
            # lse at least fp32 (fp64 stays fp64: the exact path used by the tests).
            out, lse = out.to(q.dtype), lse.to(torch.promote_types(lse.dtype, torch.float32))
            outputs.keep(out[:, recomputed:], lse[:, :, recomputed:])
        # The same tensors, of the same shapes, on both passes: checkpointing checks that they match.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.schedule = schedule
        # Weak: ctx lives as long as the graph (the loss tensor may keep it after backward), and the
        # outputs hold host buffers that must go back to the pool when the layer's backward is done.
        ctx.outputs = weakref.ref(outputs)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        outputs = ctx.outputs()
        if outputs is not None:
            outputs.attention_backward_started()
        dq, dk, dv = ctx.schedule.backward(dout, q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def tokenwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    outputs: AttentionOutputs,
    schedule: AttentionSchedule,
) -> torch.Tensor:
    """Causal attention [B, S, H, D] (k/v may have fewer heads) by `schedule` that keeps / reuses
    `outputs`; differentiable in q, k, v."""
    return _TokenwiseAttention.apply(q, k, v, outputs, schedule)
