"""Token-wise attention recomputation: keep the last tokens' attention outputs, recompute the first ones.

Paper: "MEMO: Fine-grained Tensor Management For Ultra-long Context LLM Training" (Zhao et al., 2024),
token-wise activation recomputation and swapping. With activation checkpointing, backward recomputes
each layer from its input; at long sequence lengths that recomputation is dominated by causal attention
(quadratic in tokens, the rest of the layer is linear). If the attention output and log-sum-exp of a
share of the query tokens were kept (swapped to host memory by offload/activations.py), backward
recomputes attention for the other queries only, then runs the usual flash-attention backward over all
of them.

Which tokens: the *last* ones. Under a causal mask query i attends to i + 1 keys, so the last tokens are
the most expensive to recompute; keeping the last `share` of the queries leaves (1 - share)^2 of the
attention recomputation (share 0.5: a quarter). The first r queries attend only to the first r keys, so
their recomputation is a smaller causal attention, top-left aligned like the full one, with no merge.

This runs where attention sees the whole sequence: without SP, and after Ulysses' all-to-all (all
tokens, this rank's heads), passed as `ulysses_attention(..., local_attention=...)`. TokenRing's ring
schedule is recomputed in full.
"""

from __future__ import annotations

import weakref

import torch

from longloom.attention.blocks import block_attention_backward, block_attention_forward


class AttentionOutputs:
    """What one checkpointed layer keeps of its attention outputs; offload/activations.py implements it.

    The layer's first forward *records* (`replaying` False): it hands over the last `kept_tokens(S)`
    query tokens' out [B, q, H, D] and lse [B, H, q]. Its recomputation in backward *replays*: the same
    attention calls, in the same order, get them back.
    """

    replaying: bool = False

    def kept_tokens(self, total_tokens: int) -> int:
        raise NotImplementedError

    def keep(self, out_tail: torch.Tensor, lse_tail: torch.Tensor) -> None:
        raise NotImplementedError

    def restore(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attention_backward_started(self) -> None:
        """Called as the attention backward of the replayed layer begins (a point to start prefetching)."""


class _TokenwiseCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, outputs: AttentionOutputs, softmax_scale: float | None):
        total = q.size(1)
        recomputed = total - outputs.kept_tokens(total)
        if outputs.replaying:
            out_tail, lse_tail = outputs.restore()
            if recomputed > 0:
                out_head, lse_head = block_attention_forward(
                    q[:, :recomputed], k[:, :recomputed], v[:, :recomputed], True, softmax_scale
                )
                out, lse = torch.cat([out_head, out_tail], dim=1), torch.cat([lse_head, lse_tail], dim=2)
            else:
                out, lse = out_tail, lse_tail
        else:
            out, lse = block_attention_forward(q, k, v, True, softmax_scale)
            outputs.keep(out[:, recomputed:], lse[:, :, recomputed:])
        # The same tensors, of the same shapes, on both passes: checkpointing checks that they match.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale = softmax_scale
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
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, True, ctx.softmax_scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def tokenwise_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    outputs: AttentionOutputs,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention over [B, S, H, D] (k/v may have fewer heads) that keeps / reuses `outputs`."""
    return _TokenwiseCausalAttention.apply(q, k, v, outputs, softmax_scale)
