"""ParallelDims: the dp x ring x ulysses rank grid and its process groups, built once and passed in.

Ranks are laid out as `arange(world).view(dp, ring, ulysses)`: Ulysses groups are neighbouring ranks
(they stay inside a node, where all-to-all is fast), ring groups stride over them, and one
sequence-parallel (SP) group is the ring x ulysses block of one data-parallel index.

SP layout: contiguous when ring == 1; otherwise zigzag over the whole SP group (2 * SP chunks), so
the TokenRing half of 2D SP sees a zigzag layout of "super-chunks" after the Ulysses all-to-all
(see parallel/two_d.py) and every rank does the same causal work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longloom.parallel import sharding
from longloom.parallel.document_balance import balance_documents, ulysses_rank_work


def _grid(dp: int, ring: int, ulysses: int) -> torch.Tensor:
    return torch.arange(dp * ring * ulysses).view(dp, ring, ulysses)


@dataclass
class ParallelDims:
    dp: int
    ulysses: int
    ring: int
    rank: int
    world_size: int
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    sp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ulysses_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ring_group: dist.ProcessGroup | None = field(default=None, repr=False)
    ring_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's ring, in ring order

    @staticmethod
    def build(dp: int, ulysses: int = 1, ring: int = 1) -> ParallelDims:
        """Creates every group (a collective call: every rank must call it with the same sizes)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed initialised (longloom.launch.env)")
        world_size = dist.get_world_size()
        if min(dp, ulysses, ring) < 1 or dp * ulysses * ring != world_size:
            raise ValueError(
                f"parallel.dp * parallel.ulysses * parallel.ring = {dp} * {ulysses} * {ring} must equal "
                f"the world size {world_size}: change parallel.* or launch.workers"
            )
        rank = dist.get_rank()
        grid = _grid(dp, ring, ulysses)
        dims = ParallelDims(dp=dp, ulysses=ulysses, ring=ring, rank=rank, world_size=world_size)
        # new_group is collective over the whole world: every rank creates every group in the same order.
        for members, attribute in (
            (grid.permute(1, 2, 0).reshape(-1, dp), "dp_group"),
            (grid.reshape(dp, ring * ulysses), "sp_group"),
            (grid.reshape(-1, ulysses), "ulysses_group"),
            (grid.permute(0, 2, 1).reshape(-1, ring), "ring_group"),
        ):
            for ranks in members.tolist():
                group = dist.new_group(ranks)
                if rank in ranks:
                    setattr(dims, attribute, group)
                    if attribute == "ring_group":
                        dims.ring_ranks = ranks
        return dims

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses

    @property
    def layout(self) -> str:
        return sharding.sequence_parallel_layout(self.ring)

    def shard_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return sharding.shard_sequence(x, dim, self.sp_group, self.layout)

    def unshard_sequence(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return sharding.unshard_sequence(x_local, dim, self.sp_group, self.layout)

    def shard_batch(self, batch: dict[str, torch.Tensor], dim: int = 1) -> dict[str, torch.Tensor]:
        return sharding.shard_batch(batch, self.sp_group, self.layout, dim)

    def balance_documents(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A [B, S] batch of packed documents reordered so that this split's zigzag layout gives every SP
        rank the same attention work (parallel/document_balance.py); per-token losses do not depend on the
        order of independent documents. Unchanged without document ids. Ulysses alone (contiguous) is
        balanced for its document-local split (parallel/ulysses_documents.py)."""
        if self.layout == "zigzag":
            return balance_documents(batch, self.sp)
        if self.ulysses > 1:
            return balance_documents(batch, self.sp, ulysses_rank_work)
        return batch
