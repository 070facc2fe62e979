"""Cut a sequence over a sequence-parallel group and put it back together.

Layouts (P ranks in the group):
- "contiguous": rank r holds chunk r of P.
- "zigzag": the sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r, so that under a
  causal mask every rank has the same amount of work (one early and one late chunk).

Tokens, position ids, labels and document ids (packed samples) go through the same `shard_batch` call so
they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


def sequence_parallel_layout(ring: int) -> Layout:
    """The SP layout of a dp x ulysses x ring split: zigzag when a ring runs (it balances causal work
    over the ring; parallel/dims.py), else contiguous. The one place this rule lives."""
    return "zigzag" if ring > 1 else "contiguous"


def chunks_per_rank(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    return 2 if layout == "zigzag" else 1


def local_chunk_ids(layout: str, rank: int, world_size: int) -> list[int]:
    """Which of the `world_size * chunks_per_rank(layout)` equal chunks `rank` holds, in local order."""
    if chunks_per_rank(layout) == 2:
        return [rank, 2 * world_size - 1 - rank]
    return [rank]


def _check_divisible(length: int, chunks: int, layout: str, world_size: int) -> None:
    if length % chunks:
        raise ValueError(
            f"sequence length {length} is not divisible by {chunks} ({layout} layout over {world_size} "
            f"ranks needs {chunks} equal chunks): change data.seq_len to a multiple of {chunks}"
        )


def shard_tensor(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """The part of `x` (the whole sequence along `dim`) that `rank` holds. No communication."""
    per_rank = chunks_per_rank(layout)
    total_chunks = world_size * per_rank
    _check_divisible(x.size(dim), total_chunks, layout, world_size)
    chunks = x.chunk(total_chunks, dim=dim)
    pieces = [chunks[i] for i in local_chunk_ids(layout, rank, world_size)]
    return torch.cat(pieces, dim=dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous()


def unshard_tensors(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's part, in rank order."""
    world_size = len(parts)
    per_rank = chunks_per_rank(layout)
    ordered: list[torch.Tensor | None] = [None] * (world_size * per_rank)
    for rank, part in enumerate(parts):
        for chunk, chunk_id in zip(part.chunk(per_rank, dim=dim), local_chunk_ids(layout, rank, world_size)):
            ordered[chunk_id] = chunk
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


def shard_sequence(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None, layout: str = "contiguous"
) -> torch.Tensor:
    """This rank's share of the full sequence `x` (same on every rank of `group`)."""
    world_size = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    return shard_tensor(x, dim, rank, world_size, layout)


def unshard_sequence(
    x_local: torch.Tensor, dim: int, group: dist.ProcessGroup | None, layout: str = "contiguous"
) -> torch.Tensor:
    """The full sequence from every rank's share (an all-gather; not differentiable)."""
    world_size = dist.get_world_size(group) if group is not None else 1
    if world_size == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return unshard_tensors(parts, dim, layout)


def shard_batch(
    batch: Mapping[str, torch.Tensor], group: dist.ProcessGroup | None, layout: str, dim: int = 1
) -> dict[str, torch.Tensor]:
    """Shards every tensor of a batch (tokens, position ids, labels, document ids) with one layout."""
    return {name: shard_sequence(tensor, dim, group, layout) for name, tensor in batch.items()}
