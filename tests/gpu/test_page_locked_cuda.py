"""Page-locked host buffers at their exact size: pinned for CUDA, bit-exact copies, and freed (unregistered
and unmapped) with their last view."""

import mmap

import pytest
import torch

from longloom.offload.host_pool import PinnedHostPool, pool_block_bytes
from longloom.runtime.page_locked import page_locked_bytes, page_locked_empty

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_exact_size_pinned_and_copies_both_ways():
    nbytes = (3 << 20) + 5  # not a whole page: the tail past the last page is mapped too
    host = page_locked_empty(nbytes)
    assert host.numel() == nbytes and host.is_pinned() and not host.any()
    values = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        host.copy_(values, non_blocking=True)
        back = host.to("cuda", non_blocking=True)
    stream.synchronize()
    assert torch.equal(back, values) and torch.equal(host, values.cpu())


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def test_freed_with_the_last_view():
    # 8 rounds of 4 GiB: without the unmap on the last view's release the process would hold 32 GiB.
    before = _resident_bytes()
    locked_before = page_locked_bytes()[0]
    for _ in range(8):
        host = page_locked_empty(4 << 30)
        view = host[1 << 30 :]
        del host
        assert view.is_pinned()  # the mapping lives while a view does
        assert page_locked_bytes()[0] == locked_before + (4 << 30)  # counted for the step metrics
        del view
    assert page_locked_bytes()[0] == locked_before
    assert _resident_bytes() - before < 6 << 30


def test_pool_holds_exact_granules_not_powers_of_two():
    pool = PinnedHostPool(pin=True, device=torch.device("cuda", torch.cuda.current_device()))
    buffer = pool.acquire(3 << 29)  # 1.5 GiB, the 8B model's layer input at 196608 tokens on one GPU
    assert buffer.capacity == pool_block_bytes(3 << 29) == 3 << 29 and buffer.data.is_pinned()


def test_buffers_page_locked_on_the_pool_thread_take_asynchronous_copies():
    device = torch.device("cuda", torch.cuda.current_device())
    pool = PinnedHostPool(pin=True, device=device)
    pool.expect([64 << 20, 64 << 20])
    pool._maker.join(timeout=60)
    assert pool.num_buffers == 2
    buffer = pool.acquire(64 << 20)
    assert pool.num_buffers == 2 and buffer.data.is_pinned()  # made ahead, not again
    source = torch.arange(16 << 20, dtype=torch.float32, device=device)
    host = buffer.view(source.shape, source.dtype)
    host.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host, source.cpu())
