"""Ulysses' all-to-all exchangers: NCCL's all_to_all_single, copy-engine reads, or NCCL's zero-CTA ncclAlltoAll.

The head-chunked pipeline (parallel/ulysses_pipeline.py) packs each exchange into a send buffer it gets
from an exchanger and starts the exchange there; `result()` gives the received rows. Three exchangers:

`NcclExchanger`: all_to_all_single through the process group's backend (NCCL on GPUs, gloo on CPU).

`CopyEngineExchanger` (exchange="copy_engine", CUDA, the ranks of one NVLink node):

Why: NCCL runs an all-to-all as kernels that take SMs. Beside attention (head-chunked Ulysses,
parallel/ulysses_pipeline.py) they slow the attention more than the hidden exchange saves: on 2 x H200 at
64K tokens, C=2 chunks over NCCL measured 94.6% of one GPU at equal work against 95.6% unpipelined
(BENCHMARKS.md). On one NVLink node a rank can map its peers' buffers (torch's symmetric memory) and
read them with plain device copies, which the driver runs on the copy engines, not on SMs.

How one exchange runs (`CopyEngineExchanger.start`), all on the exchanger's side stream after the
compute stream's packing copy: a barrier (every rank's send buffer is packed), then each rank copies
row `rank` of every peer's send buffer into its own receive tensor (contiguous rows: one
cudaMemcpyAsync each), then a second barrier (every rank has read: the send buffers may be packed
again), then an event that `result()` makes the compute stream wait for. Send buffers are symmetric
allocations, made once per shape (a collective: every rank asks for them in the same order, as the
pipeline's exchanges are the same on every rank) and reused by later exchanges, layers and steps; a
buffer goes back to its free list only after the compute stream waited for its exchange, so the next
packing into it comes after the peers' reads. Results equal NCCL's bit for bit (the same bytes move).

`ZeroCtaExchanger` (exchange="nccl_zero_cta", CUDA, NCCL >= 2.28, one NVLink node): NCCL's own
copy-engine all-to-all. NCCL runs ncclAlltoAll on the copy engines, with no CTAs, when the communicator
has the zero-CTA policy and both buffers are symmetric windows (NCCL user guide, "Zero-CTA
Optimization"). torch's all_to_all_single does not call ncclAlltoAll with upstream NCCL (grouped
send/receive instead; session 14 measured no copy-engine path through it), so the exchanger calls it
itself (parallel/nccl_alltoall.py) on its side stream. It makes that communicator (a second NCCL group
over the Ulysses group's ranks, created with `cta_policy=NCCL_CTA_POLICY_ZERO`) and keeps, per shape,
pairs of windows (send, receive) from torch's symmetric-memory pool on its NCCL backend, registered once
by `rendezvous` and reused. The pipeline packs into the send window; the received rows are copied out of
the receive window on the same side stream (a contiguous device copy: the copy engines again) so the
window can serve the next exchange while the copy is what the attention keeps. NCCL falls back to its
kernels silently when a condition fails; `NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=TUNING` logs
"AlltoAll [Copy Engine]" when it took the copy engines.
Its group is created lazily at the first exchange, and creating a group is a collective over every rank of
the world: it is supported when the Ulysses group is the whole world (dp = ring = 1; bench/attention.py).
On CPU tensors (gloo, the tests) the same bookkeeping runs with plain buffers, gloo's all_to_all_single
and synchronous copies. Status: experimental, no measured gain. On 2 x H200 at 64K tokens it gave 96.0% of
one GPU at equal work through all_to_all_single and 95.2% (C = 1) / 95.0% (C = 2) with the direct call
(plain NCCL: 95.6-96.7%), exact both times; whether NCCL took the copy engines is not confirmed
(BENCHMARKS.md, "Session 14"). If a trace shows it did, the exchanger has no reason to stay.

Status of `CopyEngineExchanger`: experimental. On 2 x H200 it ran at 16K tokens (C = 2) and passes its checks, but at 64K tokens
(C = 2) the timed loop hung in sessions 11 and 13 (BENCHMARKS.md), cause not found; creating one logs a
warning. NCCL is the default exchange.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.distributed as dist

from longloom.parallel.nccl_alltoall import NcclAlltoAll


class PendingExchange(Protocol):
    def result(self) -> torch.Tensor:
        """The received [P, ...] rows (row p from rank p), once the compute stream may read them."""
        ...


class SendBuffer:
    """Where one exchange's packed rows go: `tensor` [P, ...], row p for rank p."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _NcclExchange:
    """One asynchronous all_to_all_single; `result()` waits for it (on CUDA: the compute stream waits)."""

    def __init__(self, send: torch.Tensor, group: dist.ProcessGroup):
        self.received = torch.empty_like(send)
        self.work = dist.all_to_all_single(self.received, send, group=group, async_op=True)

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.received


class NcclExchanger:
    """The all-to-all through the process group's backend (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def send_buffer(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> SendBuffer:
        return SendBuffer(torch.empty(shape, dtype=dtype, device=device))

    def start(self, send: SendBuffer) -> _NcclExchange:
        return _NcclExchange(send.tensor, self.group)


class _SymmetricSendBuffer(SendBuffer):
    """A symmetric allocation on every rank of the group, and views of the peers' copies of it."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, group: dist.ProcessGroup):
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__(symm_mem.empty(*shape, dtype=dtype, device=device))
        self.handle = symm_mem.rendezvous(self.tensor, group.group_name)
        rank = dist.get_rank(group)
        self.rows = [
            self.tensor if peer == rank else self.handle.get_buffer(peer, tuple(shape), dtype)
            for peer in range(dist.get_world_size(group))
        ]


class _SideStreamExchange:
    """An exchange that ends on its exchanger's side stream with the event `done`; `result()` makes the
    compute stream wait for it and gives `buffer` back to the exchanger (the next packing into it, and
    whatever the peers do to it next, is ordered after that wait)."""

    exchanger: CopyEngineExchanger | ZeroCtaExchanger
    buffer: SendBuffer
    received: torch.Tensor
    done: torch.cuda.Event | None

    def result(self) -> torch.Tensor:
        if self.done is not None:
            torch.cuda.current_stream().wait_event(self.done)
            self.done = None
            self.exchanger.release(self.buffer)
        return self.received


class _PulledExchange(_SideStreamExchange):
    def __init__(self, exchanger: CopyEngineExchanger, send: _SymmetricSendBuffer):
        self.exchanger, self.buffer = exchanger, send
        compute = torch.cuda.current_stream()
        self.received = torch.empty_like(send.tensor)
        side = exchanger.stream
        side.wait_stream(compute)  # the packing copy into the send buffer is done
        with torch.cuda.stream(side):
            send.handle.barrier(channel=0)  # every rank has packed its send buffer
            for peer, rows in enumerate(send.rows):
                self.received[peer].copy_(rows[exchanger.rank])  # contiguous row: a copy engine
            send.handle.barrier(channel=1)  # every rank has read: send buffers may be packed again
            self.done = torch.cuda.Event()
            self.done.record(side)
        self.received.record_stream(side)  # made on the compute stream, written on the side stream


def _reuse(free: dict[tuple, list], shape: torch.Size, dtype: torch.dtype, device: torch.device):
    """A free buffer of this shape from `free` (keyed by shape, dtype, device), or None. Every rank pops or
    makes one at the same point (the pipelines run the same exchanges), so collective allocations line up."""
    buffers = free.setdefault((tuple(shape), dtype, device), [])
    return buffers.pop() if buffers else None


def _give_back(free: dict[tuple, list], buffer: SendBuffer) -> None:
    free[(tuple(buffer.tensor.shape), buffer.tensor.dtype, buffer.tensor.device)].append(buffer)


class CopyEngineExchanger:
    """The all-to-all as copy-engine reads of symmetric send buffers; one per (group, device)."""

    def __init__(self, group: dist.ProcessGroup):
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before rendezvous in older torch
            symm_mem.enable_symm_mem_for_group(group.group_name)
        self.group = group
        self.rank = dist.get_rank(group)
        self.stream = torch.cuda.Stream()
        self._free: dict[tuple, list[_SymmetricSendBuffer]] = {}

    def send_buffer(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> SendBuffer:
        if (buffer := _reuse(self._free, shape, dtype, device)) is not None:
            return buffer
        # A new symmetric buffer is a rendezvous (the host waits for every peer's host) and its mapping
        # may synchronize the device. Our side stream's barriers wait for work the peers have issued by
        # now; once they are done, no device wait of ours depends on a peer's host that might be waiting
        # for us in the rendezvous. (At 64K tokens, C = 2, the pipeline hung after its first exchanges.)
        self.stream.synchronize()
        return _SymmetricSendBuffer(shape, dtype, device, self.group)

    def start(self, send: SendBuffer) -> _PulledExchange:
        assert isinstance(send, _SymmetricSendBuffer), "a send buffer from this exchanger's send_buffer()"
        return _PulledExchange(self, send)

    def release(self, send: _SymmetricSendBuffer) -> None:
        _give_back(self._free, send)


class _WindowPair(SendBuffer):
    """A send window (the pipeline packs into `tensor`) and the receive window of one exchange shape."""

    def __init__(self, send: torch.Tensor, receive: torch.Tensor):
        super().__init__(send)
        self.receive = receive


class _ZeroCtaExchange(_SideStreamExchange):
    """Both windows are free once `done`: the all-to-all finished before the copy out."""

    def __init__(self, exchanger: ZeroCtaExchanger, pair: _WindowPair):
        self.exchanger, self.buffer = exchanger, pair
        self.received = torch.empty_like(pair.receive)  # on the compute stream: cached for it
        side = exchanger.stream
        if side is None:  # CPU: gloo's all-to-all, then a plain copy
            dist.all_to_all_single(pair.receive, pair.tensor, group=exchanger.group)
            self.received.copy_(pair.receive)
            self.done = None
            exchanger.release(pair)
            return
        side.wait_stream(torch.cuda.current_stream())  # the packing into the send window is done
        with torch.cuda.stream(side):
            exchanger.alltoall(pair.tensor, pair.receive, side)  # ncclAlltoAll on the zero-CTA communicator
            self.received.copy_(pair.receive)  # contiguous device copy: cudaMemcpyAsync, a copy engine
            self.done = torch.cuda.Event()
            self.done.record(side)
        self.received.record_stream(side)  # made on the compute stream, written on the side stream


def _symmetric_window_pair(shape: torch.Size, dtype: torch.dtype, device: torch.device, group) -> _WindowPair:
    """Two windows from torch's symmetric-memory pool on its NCCL backend, registered on `group` (collective)."""
    import torch.distributed._symmetric_memory as symm_mem

    if symm_mem.get_backend(device) != "NCCL":
        symm_mem.set_backend("NCCL")  # once per process, before the first symmetric allocation
    with torch.cuda.use_mem_pool(symm_mem.get_mem_pool(device)):
        send, receive = (
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device),
        )
    for window in (send, receive):
        symm_mem.rendezvous(window, group.group_name)
    return _WindowPair(send, receive)


def _plain_pair(shape: torch.Size, dtype: torch.dtype, device: torch.device, group) -> _WindowPair:
    return _WindowPair(
        torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)
    )


ZERO_CTA_MIN_NCCL = (2, 28)  # ncclAlltoAll and its copy-engine path (NCCL 2.28 release notes)


def zero_cta_missing(nccl_version: tuple[int, ...] | None, process_group_nccl: object | None) -> list[str]:
    """What this torch / NCCL lacks for exchange="nccl_zero_cta" (empty: nothing), each as a short phrase.

    nccl_version: torch.cuda.nccl.version(); process_group_nccl: dist.ProcessGroupNCCL (None without it).
    """
    missing = []
    if nccl_version is None or tuple(nccl_version[:2]) < ZERO_CTA_MIN_NCCL:
        found = "none" if nccl_version is None else ".".join(map(str, nccl_version))
        missing.append(f"NCCL >= {'.'.join(map(str, ZERO_CTA_MIN_NCCL))} (found {found})")
    if process_group_nccl is None or not hasattr(process_group_nccl, "NCCL_CTA_POLICY_ZERO"):
        missing.append("torch's ProcessGroupNCCL.NCCL_CTA_POLICY_ZERO (a newer torch)")
    return missing


class ZeroCtaExchanger:
    """The all-to-all as NCCL's zero-CTA (copy-engine) ncclAlltoAll between reused windows."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        ranks = dist.get_process_group_ranks(group)
        if device.type == "cuda":
            if len(ranks) != dist.get_world_size():
                raise ValueError(
                    f"exchange='nccl_zero_cta' creates its own NCCL group, a collective over every rank; the "
                    f"Ulysses group has {len(ranks)} of the {dist.get_world_size()} ranks (dp or ring > 1): use "
                    "exchange='nccl'"
                )
            missing = zero_cta_missing(torch.cuda.nccl.version(), getattr(dist, "ProcessGroupNCCL", None))
            if missing:
                raise RuntimeError(
                    f"exchange='nccl_zero_cta' needs {' and '.join(missing)}: use exchange='nccl'"
                )
            options = dist.ProcessGroupNCCL.Options()
            options.config.cta_policy = dist.ProcessGroupNCCL.NCCL_CTA_POLICY_ZERO
            self.group = dist.new_group(ranks, backend="nccl", pg_options=options)
            self.alltoall = NcclAlltoAll(self.group, device)
            self.stream: torch.cuda.Stream | None = torch.cuda.Stream(device)
            self._make_pair = _symmetric_window_pair
        else:  # gloo: the same bookkeeping on plain buffers (no windows, no copy engines)
            self.group, self.stream, self._make_pair = group, None, _plain_pair
        self._free: dict[tuple, list[_WindowPair]] = {}

    def send_buffer(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> SendBuffer:
        reused = _reuse(self._free, shape, dtype, device)
        return reused if reused is not None else self._make_pair(shape, dtype, device, self.group)

    def start(self, send: SendBuffer) -> _ZeroCtaExchange:
        assert isinstance(send, _WindowPair), "a send buffer from this exchanger's send_buffer()"
        return _ZeroCtaExchange(self, send)

    def release(self, pair: _WindowPair) -> None:
        _give_back(self._free, pair)


logger = logging.getLogger(__name__)

_copy_engine_exchangers: dict[tuple[str, int], CopyEngineExchanger] = {}

EXCHANGES = ("nccl", "copy_engine", "nccl_zero_cta")
_zero_cta_exchangers: dict[tuple[str, str], ZeroCtaExchanger] = {}


def exchanger_for(
    exchange: str, group: dist.ProcessGroup, device: torch.device
) -> NcclExchanger | CopyEngineExchanger | ZeroCtaExchanger:
    """The exchanger of `exchange` (one of EXCHANGES) for `group` on `device`."""
    if exchange == "nccl":
        return NcclExchanger(group)
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")
    if exchange == "nccl_zero_cta":
        key = (group.group_name, str(device))
        if key not in _zero_cta_exchangers:  # its group and windows persist: made once, reused every layer
            _zero_cta_exchangers[key] = ZeroCtaExchanger(group, device)
        return _zero_cta_exchangers[key]
    if device.type != "cuda":
        raise ValueError(
            f"exchange='copy_engine' reads the peers' GPU memory (CUDA symmetric memory) but the tensors are "
            f"on {device}: use exchange='nccl'"
        )
    key = (group.group_name, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _copy_engine_exchangers:  # its send buffers persist: made once, reused every layer
        logger.warning(
            "exchange='copy_engine' is experimental: on 2 x H200 its head-chunked pipeline hung at 64K tokens "
            "(cause not found, BENCHMARKS.md); use exchange='nccl' (the default) for training"
        )
        _copy_engine_exchangers[key] = CopyEngineExchanger(group)
    return _copy_engine_exchangers[key]
