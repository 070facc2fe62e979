"""Merge partial attention results computed over disjoint key blocks, in fp32.

Given (out_a, lse_a) over keys A and (out_b, lse_b) over keys B, attention over A u B is
lse = logaddexp(lse_a, lse_b) and out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).
Shapes: out [B, S, H, D] (fp32 accumulator), lse [B, H, S] fp32. A block that saw no key has
lse = -inf and contributes nothing (guarded against inf - inf).
"""

from __future__ import annotations

import torch


def _weight(lse_part: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """exp(lse_part - lse_total) as [B, S, H, 1], zero where both are -inf."""
    weight = torch.exp(lse_part - lse_total)
    weight = torch.nan_to_num(weight, nan=0.0)
    return weight.transpose(1, 2).unsqueeze(-1)


def merge_attention_partials(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
    accumulation: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the merged (out, lse) in `accumulation` (fp32; fp64 for fp64 references); `out=None`
    starts a new accumulation."""
    block_lse = block_lse.to(accumulation)
    if out is None or lse is None:
        return block_out.to(accumulation), block_lse
    new_lse = torch.logaddexp(lse.to(accumulation), block_lse)
    merged = out.to(accumulation) * _weight(lse, new_lse) + block_out.to(accumulation) * _weight(
        block_lse, new_lse
    )
    return merged, new_lse


def merge_attention_partials_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """In-place variant for preallocated fp32 accumulators (`out`, `lse` are updated)."""
    merged, new_lse = merge_attention_partials(out, lse, block_out, block_lse)
    out.copy_(merged)
    lse.copy_(new_lse)
