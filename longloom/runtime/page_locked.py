"""Host memory page-locked at its exact size: an anonymous mapping, its pages touched, then cudaHostRegister.

torch's pinned allocator (cudaHostAlloc, or its register path) rounds every block up to a power of two,
and torch 2.11 has no setting that stops it (`pinned_max_round_threshold_mb` is refused). The activation
pool asks for one block per swapped tensor, sized by the sequence: at 196608 tokens on one H200 each
1.5 GiB layer input held 2 GiB, 16 GiB of the 111 GiB pinned (BENCHMARKS.md, session 11), and the host's
pinnable memory is what limits the longest sequence there. A mapping of the exact size registered with
CUDA holds what it is asked for. bench/pinning.py measured this way ("touch+register") at 9.57 GiB/s
with 8 threads on an H200 host, against 6.93 GiB/s for torch's register path.

The returned tensor views the mapping; the mapping is unregistered and unmapped when the last tensor
viewing it is freed (the mapping object's lifetime is the tensor storage's, through the buffer protocol).
Copies from or to it must have finished by then: the owner frees it only after its last copy's event
(the activation pool keeps its buffers until the offloader goes); as a guard the release synchronizes
the device first.
"""

from __future__ import annotations

import logging
import mmap
import threading

import torch

logger = logging.getLogger(__name__)


class _Counter:
    """Bytes page-locked by this module in this process, now and at most (for the step metrics: torch's
    host_memory_stats does not see memory it did not pin)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.current += nbytes
            self.peak = max(self.peak, self.current)


_locked = _Counter()


def page_locked_bytes() -> tuple[int, int]:
    """(bytes page-locked now, the most at once) by `page_locked_empty` in this process."""
    with _locked.lock:
        return _locked.current, _locked.peak


# One write per page makes the kernel allocate (and zero) it; the pages are then resident, and
# registering only locks them. torch's fill of the strided per-page view runs on the intra-op threads.
PAGE_BYTES = mmap.PAGESIZE


class _RegisteredMapping(mmap.mmap):
    """An anonymous mapping registered with CUDA; unregistered when garbage collected."""

    address: int = 0
    device: int | None = None
    locked_bytes: int = 0

    def __del__(self) -> None:
        if self.device is None:
            return
        _locked.add(-self.locked_bytes)
        # At interpreter shutdown CUDA or torch's modules may be gone already: the process frees it all.
        try:
            torch.cuda.synchronize(self.device)  # no copy may still read or write these pages
            torch.cuda.cudart().cudaHostUnregister(self.address)
        except (RuntimeError, AttributeError, TypeError) as error:
            logger.debug("cudaHostUnregister of a page-locked mapping failed: %s", error)


def device_index(device: torch.device | int | None) -> int:
    """The CUDA device index of `device` (an index, a torch.device, or None: the current device)."""
    if isinstance(device, int):
        return device
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


def page_locked_empty(nbytes: int, device: torch.device | int | None = None) -> torch.Tensor:
    """A uint8 host tensor of exactly `nbytes` (zeroed), page-locked for asynchronous copies to `device`.

    Raises RuntimeError (naming the bytes and the fix) when the host cannot map or lock that much.
    """
    if nbytes <= 0:
        raise ValueError(f"page_locked_empty: nbytes must be positive, got {nbytes}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "page_locked_empty: page-locking registers host memory with CUDA, and CUDA is not available"
        )
    index = device_index(device)
    try:
        mapping = _RegisteredMapping(-1, nbytes)
    except OSError as error:
        raise RuntimeError(f"could not map {nbytes / 2**30:.2f} GiB of host memory: {error}") from error
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    whole_pages = nbytes // PAGE_BYTES * PAGE_BYTES
    if whole_pages:
        tensor[:whole_pages].view(-1, PAGE_BYTES)[:, 0].zero_()
    with torch.cuda.device(index):
        code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(code) != 0:
        raise RuntimeError(
            f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed ({code}): the host cannot "
            "lock that much more (see `ulimit -l` and the memory other processes pin)"
        )
    mapping.address, mapping.device, mapping.locked_bytes = tensor.data_ptr(), index, nbytes
    _locked.add(nbytes)
    return tensor
