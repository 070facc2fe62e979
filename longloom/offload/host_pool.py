"""The activation offload's host buffers: a pool of page-locked buffers, reused every step, made ahead.

Page-locking is slow (touching and registering the pages: 58 GiB took 32.8 s in the first step at 384K
tokens on 2 x H200, BENCHMARKS.md session 14) and pinned memory is a scarce host resource, so buffers
are kept for the next step: after the first step every request finds a free buffer of its size and the
pool stops growing. In the first step the offloader asks for the next layer's buffers while the current
layer computes (`expect`): a background thread page-locks them, so the forward's main thread, which
queues the GPU's work, does not stop for it. It asks for what the last layer of the same kind stored,
which the next layer then requests, so reading ahead costs no host memory; a request whose buffer is not
started yet makes it itself, one whose buffer is being made waits for it (no buffer is made twice).
Thread-safe: forward packs on the main thread, backward unpacks on autograd's threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import torch

from longloom.runtime.page_locked import page_locked_empty

logger = logging.getLogger(__name__)


def pool_block_bytes(nbytes: float) -> int:
    """Host bytes the pool holds for one request of `nbytes`: whole granules (PinnedHostPool.GRANULE)."""
    return -(-math.ceil(nbytes) // PinnedHostPool.GRANULE) * PinnedHostPool.GRANULE if nbytes > 0 else 0


class HostBuffer:
    """One byte buffer of the pool; `last_read` is the host->device copy that must finish before reuse.

    Pinned buffers are page-locked at their exact size (runtime/page_locked.py), not by torch's pinned
    allocator, which would round each up to a power of two: up to 2x the host memory at lengths that
    are not powers of two, and host memory is what bounds the longest sequence on one GPU.
    """

    def __init__(self, capacity: int, pin: bool, device: torch.device | None = None):
        if pin:
            self.data = page_locked_empty(capacity, device)
        else:
            self.data = torch.empty(capacity, dtype=torch.uint8)
        self.capacity = capacity
        self.last_read: torch.cuda.Event | None = None
        self.handed_out = 0  # times acquired: 1 on its first use, in the step that made it

    def view(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.data[:nbytes].view(dtype).view(shape)


class PinnedHostPool:
    """Host buffers handed out per offloaded tensor and returned after use; grown only when none fits."""

    # Rounding sizes up lets slightly different requests (last micro batch, other shares) share buffers.
    GRANULE = 1 << 20

    def __init__(self, pin: bool, device: torch.device | None = None):
        self.pin, self.device = pin, device
        self._free: list[HostBuffer] = []
        self._expected: list[int] = []  # capacities to make ahead, not started
        self._being_made: list[int] = []  # capacities the background thread is making now
        self._changed = threading.Condition(threading.Lock())
        self._maker: threading.Thread | None = None
        self._maker_running = False  # set and cleared under the lock: a thread about to exit is not running
        self.total_bytes = 0
        self.num_buffers = 0
        self.bytes_in_use = 0
        self.peak_bytes_in_use = 0
        # Seconds spent making buffers (page-locking them on GPU), all in the first step, and the part of
        # them the requesting thread waited for; the offload report shows both (issue 18, time to step 1).
        self.allocation_seconds = 0.0
        self.waited_seconds = 0.0

    def expect(self, sizes: list[int]) -> None:
        """Requests of these byte sizes will come: make their buffers now, on a background thread."""
        with self._changed:
            self._expected.extend(pool_block_bytes(n) for n in sizes if n > 0)
            if self._expected and not self._maker_running:
                self._maker_running = True
                self._maker = threading.Thread(
                    target=self._make_expected, name="longloom-host-pool", daemon=True
                )
                self._maker.start()

    def acquire(self, nbytes: int) -> HostBuffer:
        started = time.perf_counter()
        with self._changed:
            while True:
                buffer = _take_best_fit(self._free, nbytes, key=lambda candidate: candidate.capacity)
                if buffer is not None:
                    break
                capacity = _take_best_fit(self._expected, nbytes, key=lambda candidate: candidate)
                if capacity is None and not any(made >= nbytes for made in self._being_made):
                    capacity = pool_block_bytes(nbytes)
                if capacity is not None:  # not made by anyone: make it here, with the lock released
                    self._changed.release()
                    try:
                        buffer, seconds = self._make(capacity)
                    finally:
                        self._changed.acquire()
                    self._count(buffer, seconds)
                    break
                self._changed.wait()  # the background thread is making one that fits
            buffer.handed_out += 1
            self.bytes_in_use += buffer.capacity
            self.peak_bytes_in_use = max(self.peak_bytes_in_use, self.bytes_in_use)
            self.waited_seconds += (time.perf_counter() - started) if buffer.handed_out == 1 else 0.0
            return buffer

    def release(self, buffer: HostBuffer) -> None:
        with self._changed:
            self.bytes_in_use -= buffer.capacity
            self._free.append(buffer)
            self._changed.notify_all()

    def _make(self, capacity: int) -> tuple[HostBuffer, float]:
        """A new buffer of `capacity` bytes and the seconds it took; RuntimeError with the fix if the host
        is full. Called without the pool's lock (page-locking takes long); `_count` then, with it."""
        started = time.perf_counter()
        try:
            buffer = HostBuffer(capacity, self.pin, self.device)
        except RuntimeError as error:  # mapping or page-locking refused: the host is out of memory
            raise RuntimeError(
                f"activation offload could not {'pin' if self.pin else 'allocate'} "
                f"{capacity / 2**30:.2f} GiB of host memory with {self.total_bytes / 2**30:.2f} GiB "
                f"already in its pool ({error}): lower offload.activations (less of the attention "
                "output is kept; offload.device_activations can keep it in GPU memory instead), "
                "shorten data.seq_len, or use more workers; `longloom check` estimates it"
            ) from error
        return buffer, time.perf_counter() - started

    def _count(self, buffer: HostBuffer, seconds: float) -> None:
        self.allocation_seconds += seconds
        self.total_bytes += buffer.capacity
        self.num_buffers += 1

    def _make_expected(self) -> None:
        """The background thread: makes the expected buffers one by one and frees them for requests."""
        while True:
            with self._changed:
                if not self._expected:
                    self._maker_running = False
                    return
                capacity = self._expected.pop(0)
                self._being_made.append(capacity)
            try:
                buffer, seconds = self._make(capacity)
            except RuntimeError as error:
                # Requests now make their buffers themselves, and one that fails raises this with the fix.
                logger.debug("making an expected host buffer failed: %s", error)
                buffer = None
            with self._changed:
                self._being_made.remove(capacity)
                if buffer is None:
                    self._expected.clear()
                else:
                    self._count(buffer, seconds)
                    self._free.append(buffer)
                self._changed.notify_all()
                if buffer is None:
                    self._maker_running = False
                    return


def _take_best_fit(items: list, nbytes: int, key):
    """Removes and returns the smallest item of `items` whose key(item) >= nbytes; None if none fits."""
    fitting = [item for item in items if key(item) >= nbytes]
    if not fitting:
        return None
    best = min(fitting, key=key)
    items.remove(best)
    return best
