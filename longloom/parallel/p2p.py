"""Point-to-point exchanges inside a ring group: neighbours computed once, batched isend/irecv.

Ring schedules (parallel/tokenring.py, parallel/ring_baseline.py) post, at every step, one batch of
sends and receives that every rank of the group posts in the same pattern, so the pattern cannot
deadlock: each send has exactly one matching receive posted in the same step. The batch is started,
the block attention of that step runs, and only then is the batch waited on (comm/compute overlap).

Peers are GLOBAL ranks (`torch.distributed.get_process_group_ranks`), as P2POp expects.

On CUDA the batch is issued from a dedicated communication stream that first waits for the compute
stream (so a partial result is complete before it is sent); `wait()` then makes the compute stream
wait for the transfer, without blocking the host. On CPU (gloo) `wait()` blocks the host.

Hangs: a peer that died or posted a different pattern never completes its half of the batch. Both
backends turn this into an error after the process group's timeout (gloo: the receive times out;
NCCL: the watchdog aborts the communicator). On CPU an explicit, shorter `timeout_s` can be given;
on CUDA a host-side timed wait would stall the launch of the overlapped compute, so the process
group timeout (`launch.collective_timeout_s`) is the limit there.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class PendingExchange:
    """Works of one started batch; `wait()` before reading received or reusing sent tensors."""

    works: list[dist.Work]
    description: str
    timeout: datetime.timedelta | None
    # Keeps every tensor alive until the transfer is done (the caching allocator may otherwise reuse it).
    tensors: list[torch.Tensor] = field(default_factory=list)

    def wait(self) -> None:
        try:
            for work in self.works:
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.description} did not complete: a peer has died, is stuck, or posted a different "
                f"exchange (timeout: {self.timeout or 'the process group timeout'}). Cause: {error}"
            ) from error
        self.tensors.clear()


class RingComm:
    """One rank's view of a ring group: its neighbours and batched exchanges with any member."""

    def __init__(self, group: dist.ProcessGroup, timeout_s: float | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:  # new_group hands non-members a placeholder that has no ranks to name
            raise ValueError(
                f"global rank {dist.get_rank()} is not a member of the ring group it was given: pass this "
                "rank's own group (dims.ring_group; parallel.ring sets its size)"
            )
        self.ranks: list[int] = dist.get_process_group_ranks(group)
        self.size = len(self.ranks)
        self.next_rank = self.global_rank(self.rank + 1)  # where Q (or K/V) blocks go
        self.prev_rank = self.global_rank(self.rank - 1)  # where they come from
        self.timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def global_rank(self, group_rank: int) -> int:
        """Global rank of the member `group_rank` (taken modulo the ring size)."""
        return self.ranks[group_rank % self.size]

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def start(
        self,
        sends: list[tuple[torch.Tensor, int]],
        recvs: list[tuple[torch.Tensor, int]],
        description: str = "ring exchange",
    ) -> PendingExchange:
        """Posts every (tensor, global peer) send and receive as one batch; returns without waiting.

        Several messages between the same pair in the same direction are matched in list order, so
        both sides must list them in the same order (the schedules build both lists from one plan).
        """
        ops = [dist.P2POp(dist.isend, tensor, peer, self.group) for tensor, peer in sends]
        ops += [dist.P2POp(dist.irecv, tensor, peer, self.group) for tensor, peer in recvs]
        tensors = [tensor for tensor, _ in sends + recvs]
        if not ops:
            return PendingExchange([], description, self.timeout)
        description = f"{description} (rank {dist.get_rank()} of ring {self.ranks})"
        device = ops[0].tensor.device
        if device.type == "cuda":
            stream = self._stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                works = dist.batch_isend_irecv(ops)
            return PendingExchange(works, description, None, tensors)
        return PendingExchange(dist.batch_isend_irecv(ops), description, self.timeout, tensors)
