"""Host offload of checkpointed layer inputs: a reused pinned pool, side streams, prefetch one layer ahead.

Paper: "Efficiently Training 7B LLM with 1 Million Sequence Length on 8 GPUs" (MEMO, Wang et al. 2024).
Idea: with activation checkpointing, the only thing a layer keeps between forward and backward is its
input [B, S, hidden]; at long sequence lengths even that no longer fits for every layer, so copy it to
host memory while the layer computes, and bring it back one layer ahead of backward. PCIe can hide only
so many bytes behind one layer's compute, so `share` picks which share of the tokens is swapped; the
rest of the tokens stay on the device.

Not (yet) MEMO's token-wise scheme, where the input is always swapped and `share` of the tokens' *full*
layer activations are swapped too so that backward recomputes only the other tokens (less recompute for
more PCIe traffic). Here every layer is recomputed in full; that needs a token-sliced layer backward
(attention over all keys for a subset of queries, and Ulysses' head layout) and is the open part of the
offload issue.

How it plugs in: `ActivationOffloader.checkpoint` is a drop-in `checkpoint_fn` for the model. It runs
torch.utils.checkpoint (non-reentrant: recomputation in backward, collectives of SP attention re-run in
the same order on every rank, ZeRO hooks untouched) inside `saved_tensors_hooks`. Non-reentrant
checkpoint saves the layer's inputs as saved tensors *outside* its own hook, so our hook sees exactly
the inputs; it swaps the layer input `hidden` and passes everything else (cos / sin tables shared by
all layers) through. Unpacking happens at the start of the layer's recomputation in backward; that is
when the previous layer's input starts coming back.

Streams (CUDA): device->host copies run on an offload stream that first waits for the compute stream.
The entry keeps the device input alive until the *next* layer's forward has been issued; then the
compute stream waits on the copy's event (long done by then) and the reference is dropped, so the memory
goes back to the allocator at once on the compute stream. (`record_stream` would be correct too, but the
allocator only notices the end of the copy at a later allocation: the memory stays counted, and reused
late, which is what this module exists to avoid.) Host->device copies run on a prefetch stream; the compute stream waits on their event, and
a host buffer goes back to the pool tagged with that event so the next step's device->host copy into
it waits until it has been read. On CPU the same code runs with plain (unpinned) buffers and no streams.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


class HostBuffer:
    """One byte buffer of the pool; `last_read` is the host->device copy that must finish before reuse."""

    def __init__(self, capacity: int, pin: bool):
        self.data = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        self.capacity = capacity
        self.last_read: torch.cuda.Event | None = None

    def view(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.data[:nbytes].view(dtype).view(shape)


class PinnedHostPool:
    """Host buffers handed out per offloaded tensor and returned after use; grown only when none fits.

    Pinning (cudaHostAlloc) costs milliseconds per buffer and pinned memory is a scarce host resource, so
    buffers are kept for the next step: after the first step every request finds a free buffer of its
    size and the pool stops growing. Thread-safe: forward packs on the main thread, backward unpacks on
    autograd's device threads.
    """

    # Rounding sizes up lets slightly different requests (last micro batch, other shares) share buffers.
    GRANULE = 1 << 20

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: list[HostBuffer] = []
        self._lock = threading.Lock()
        self.total_bytes = 0
        self.num_buffers = 0
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0

    def acquire(self, nbytes: int) -> HostBuffer:
        with self._lock:
            fitting = [buffer for buffer in self._free if buffer.capacity >= nbytes]
            if fitting:
                buffer = min(fitting, key=lambda candidate: candidate.capacity)  # best fit
                self._free.remove(buffer)
            else:
                capacity = -(-nbytes // self.GRANULE) * self.GRANULE
                buffer = HostBuffer(capacity, self.pin)
                self.total_bytes += capacity
                self.num_buffers += 1
            self.bytes_in_use += buffer.capacity
            self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
            return buffer

    def release(self, buffer: HostBuffer) -> None:
        with self._lock:
            self.bytes_in_use -= buffer.capacity
            self._free.append(buffer)


class SavedInput:
    """A layer input while it waits for backward: swapped tokens on the host, the others on the device.

    Tokens are dimension 1 of [B, S, hidden]; the first `swap_tokens` of them are swapped. Returned to the
    pool when garbage collected (the autograd graph drops it after the layer's backward, or when a graph
    is abandoned without backward), so the pool never leaks buffers.
    """

    def __init__(self, tensor: torch.Tensor, swap_tokens: int, previous: SavedInput | None):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.token_dim = 1 if tensor.dim() >= 2 else 0
        self.swap_tokens = swap_tokens
        self.kept: torch.Tensor | None = None  # device part: unswapped tokens, or all of them
        self.buffer: HostBuffer | None = None
        self.host: torch.Tensor | None = None
        self.offloaded: torch.cuda.Event | None = None
        self.device_source: torch.Tensor | None = None  # the device input, until its copy is known done
        self.prefetched: torch.Tensor | None = None
        self.prefetched_event: torch.cuda.Event | None = None
        # A weak link: the previous layer's input must not outlive its own backward because of us.
        self.previous = weakref.ref(previous) if previous is not None else None
        self._finalizer: weakref.finalize | None = None

    @property
    def total_tokens(self) -> int:
        return self.shape[self.token_dim]


def _return_buffer(pool: PinnedHostPool, buffer: HostBuffer) -> None:
    pool.release(buffer)


class ActivationOffloader:
    """`checkpoint_fn` for the model that moves each checkpointed layer's input to host memory.

    share: the share of tokens of each saved input that is swapped (1.0 = all); the rest stays on the
    device. The last layer keeps its input on the device: its backward comes first, with nothing to
    hide a host->device copy behind.
    """

    def __init__(self, share: float, device: torch.device):
        if not 0.0 < share <= 1.0:
            raise ValueError(
                f"activation offload share {share} must be in (0, 1]: set offload.activations to true, "
                "false or a share of tokens in (0, 1]"
            )
        self.share = float(share)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = PinnedHostPool(pin=self.cuda)
        self.offload_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.prefetch_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._last_saved: weakref.ref[SavedInput] | None = None
        self._copies_in_flight: list[SavedInput] = []  # entries still holding their device input
        self.swapped_bytes = 0  # bytes sent to the host by the last completed forward (for logs/benchmarks)
        self._forward_bytes = 0

    def swap_tokens(self, total_tokens: int) -> int:
        return min(total_tokens, round(self.share * total_tokens))

    def checkpoint(self, layer: nn.Module | Callable, *inputs: torch.Tensor, is_last_layer: bool = False):
        """Like torch.utils.checkpoint(layer, *inputs), with inputs[0] (the layer input) kept on the host."""
        # Only the identity of the layer input, never a reference: autograd keeps the pack hook alive as
        # long as the saved tensor, and a closure over `hidden` would pin it on the device.
        hidden_id = id(inputs[0])
        previous = self._last_saved() if self._last_saved is not None else None
        saved: list[SavedInput] = []

        def pack(tensor: torch.Tensor):
            if id(tensor) != hidden_id:
                return tensor  # cos / sin: shared by every layer, small, and still alive anyway
            entry = self._save(tensor, keep_on_device=is_last_layer, previous=previous)
            saved.append(entry)
            return entry

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            output = torch_checkpoint(layer, *inputs, use_reentrant=False)
        # This layer's compute is queued behind the earlier copies: let go of their device inputs.
        self._release_copied(keep=saved if not is_last_layer else [])
        # The chain of inputs ends at the last layer: the next forward starts a new one.
        self._last_saved = weakref.ref(saved[0]) if saved and not is_last_layer else None
        if is_last_layer:
            self.swapped_bytes, self._forward_bytes = self._forward_bytes, 0
        return output

    # -- forward: device -> host -------------------------------------------------------------------

    def _save(self, tensor: torch.Tensor, keep_on_device: bool, previous: SavedInput | None) -> SavedInput:
        swap = 0 if keep_on_device else self.swap_tokens(tensor.shape[1 if tensor.dim() >= 2 else 0])
        entry = SavedInput(tensor, swap, previous)
        if swap == 0:
            entry.kept = tensor
            return entry
        dim, total = entry.token_dim, entry.total_tokens
        if swap < total:
            # A copy, not a view: a view would keep the whole input's memory alive on the device.
            entry.kept = tensor.narrow(dim, swap, total - swap).clone()
        swapped = tensor.narrow(dim, 0, swap)
        entry.buffer = self.pool.acquire(swapped.numel() * swapped.element_size())
        entry._finalizer = weakref.finalize(entry, _return_buffer, self.pool, entry.buffer)
        entry.host = entry.buffer.view(swapped.shape, tensor.dtype)
        self._forward_bytes += swapped.numel() * swapped.element_size()
        if self.cuda:
            stream = self.offload_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the input is written on compute
            if entry.buffer.last_read is not None:
                stream.wait_event(entry.buffer.last_read)  # last step's host->device read of this buffer
            with torch.cuda.stream(stream):
                entry.host.copy_(swapped, non_blocking=True)
                entry.offloaded = torch.cuda.Event()
                entry.offloaded.record(stream)
            entry.device_source = tensor
            self._copies_in_flight.append(entry)
        else:
            entry.host.copy_(swapped)
        return entry

    def _release_copied(self, keep: list[SavedInput]) -> None:
        """Drops the device inputs of entries not in `keep`, after the compute stream waits on their copy."""
        still_copying = []
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        for entry in self._copies_in_flight:
            if any(entry is kept for kept in keep):
                still_copying.append(entry)
                continue
            current.wait_event(entry.offloaded)  # frees below are ordered after the copy that reads them
            entry.device_source = None
        self._copies_in_flight = still_copying

    # -- backward: host -> device ------------------------------------------------------------------

    def _prefetch(self, entry: SavedInput) -> None:
        """Starts bringing `entry` back (prefetch stream on CUDA); a no-op when already under way."""
        if entry.host is None or entry.prefetched is not None:
            return
        dim, swap = entry.token_dim, entry.swap_tokens
        if self.cuda:
            stream = self.prefetch_stream
            with torch.cuda.stream(stream):
                stream.wait_event(entry.offloaded)
                restored = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
                restored.narrow(dim, 0, swap).copy_(entry.host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            entry.prefetched_event = event
            entry.buffer.last_read = event
        else:
            restored = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
            restored.narrow(dim, 0, swap).copy_(entry.host)
        entry.prefetched = restored

    def _unpack(self, packed):
        if not isinstance(packed, SavedInput):
            return packed
        entry = packed
        if entry.host is None:
            restored = entry.kept
        else:
            self._prefetch(entry)  # normally done one layer earlier; synchronous fallback otherwise
            restored, entry.prefetched = entry.prefetched, None
            if self.cuda:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(entry.prefetched_event)
                restored.record_stream(current)  # allocated on the prefetch stream, used on compute
            if entry.kept is not None:
                dim, swap = entry.token_dim, entry.swap_tokens
                restored.narrow(dim, swap, entry.total_tokens - swap).copy_(entry.kept)
        # This layer's recomputation starts now: the layer below is next, bring its input back meanwhile.
        previous = entry.previous() if entry.previous is not None else None
        if previous is not None:
            self._prefetch(previous)
        return restored
