"""offload/host_pool.py: buffers made ahead on the pool's thread, each made once, and handed out.

HostBuffer is replaced by a recorder that says which thread made each buffer and can hold the making
back (a gate), so a request can be caught while its buffer is being made.
"""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import pytest

from longloom.offload import host_pool
from longloom.offload.host_pool import PinnedHostPool

MIB = 1 << 20
POOL_THREAD = "longloom-host-pool"


class RecordedBuffer(host_pool.HostBuffer):
    made_on: ClassVar[list[str]] = []
    gate = threading.Event()
    fail_on_pool_thread = False

    def __init__(self, capacity, pin, device=None):
        RecordedBuffer.gate.wait()
        thread = threading.current_thread().name
        if RecordedBuffer.fail_on_pool_thread and thread == POOL_THREAD:
            raise RuntimeError("cannot allocate memory")
        RecordedBuffer.made_on.append(thread)
        super().__init__(capacity, pin, device)


@pytest.fixture(autouse=True)
def recorded(monkeypatch):
    RecordedBuffer.made_on, RecordedBuffer.fail_on_pool_thread = [], False
    RecordedBuffer.gate.set()
    monkeypatch.setattr(host_pool, "HostBuffer", RecordedBuffer)
    return RecordedBuffer


def _settle(pool: PinnedHostPool) -> None:
    if pool._maker is not None:
        pool._maker.join(timeout=10)


def test_expected_buffers_are_made_on_the_pool_thread_and_then_handed_out():
    pool = PinnedHostPool(pin=False)
    pool.expect([2 * MIB, MIB + 1])
    _settle(pool)
    assert RecordedBuffer.made_on == [POOL_THREAD, POOL_THREAD]
    first, second = pool.acquire(MIB + 1), pool.acquire(2 * MIB)
    assert (first.capacity, second.capacity) == (2 * MIB, 2 * MIB)  # granule-rounded, best fit
    assert len(RecordedBuffer.made_on) == 2 and pool.num_buffers == 2 and pool.total_bytes == 4 * MIB
    assert first.handed_out == second.handed_out == 1  # first use: the pool grew for them


def test_a_request_takes_an_expected_buffer_not_started_and_makes_it_itself():
    RecordedBuffer.gate.clear()  # the pool thread is stuck making the first expected buffer
    pool = PinnedHostPool(pin=False)
    pool.expect([MIB, 3 * MIB])
    while not pool._being_made:
        time.sleep(0.001)
    made = []
    requester = threading.Thread(target=lambda: made.append(pool.acquire(3 * MIB)), name="requester")
    requester.start()
    time.sleep(0.05)
    RecordedBuffer.gate.set()
    requester.join(timeout=10)
    _settle(pool)
    # 3 MiB was expected but not started: the request made it (no second 3 MiB buffer from the thread).
    assert sorted(RecordedBuffer.made_on) == sorted([POOL_THREAD, "requester"])
    assert made[0].capacity == 3 * MIB and pool.num_buffers == 2 and pool.total_bytes == 4 * MIB


def test_a_request_waits_for_the_buffer_being_made_rather_than_making_another():
    RecordedBuffer.gate.clear()
    pool = PinnedHostPool(pin=False)
    pool.expect([MIB])
    while not pool._being_made:
        time.sleep(0.001)
    made = []
    requester = threading.Thread(target=lambda: made.append(pool.acquire(MIB)), name="requester")
    requester.start()
    time.sleep(0.05)
    assert requester.is_alive() and not made, "the request waits for the pool thread's buffer"
    RecordedBuffer.gate.set()
    requester.join(timeout=10)
    assert RecordedBuffer.made_on == [POOL_THREAD] and pool.num_buffers == 1 and made[0].capacity == MIB
    assert pool.waited_seconds >= 0.04  # the wait is counted as time the request was held up


def test_a_failure_on_the_pool_thread_leaves_each_request_to_make_its_own():
    RecordedBuffer.fail_on_pool_thread = True
    pool = PinnedHostPool(pin=False)
    pool.expect([MIB, MIB])
    _settle(pool)
    assert pool.num_buffers == 0 and not pool._expected  # the rest of the expectation is dropped
    pool.acquire(MIB), pool.acquire(MIB)
    assert RecordedBuffer.made_on == ["MainThread", "MainThread"] and pool.num_buffers == 2


def test_a_failed_request_names_the_fix(monkeypatch):
    class Refused(host_pool.HostBuffer):
        def __init__(self, capacity, pin, device=None):
            raise RuntimeError("cudaHostRegister failed (2)")

    monkeypatch.setattr(host_pool, "HostBuffer", Refused)
    pool = PinnedHostPool(pin=True)
    with pytest.raises(RuntimeError, match=r"could not pin 0.00 GiB .* lower offload.activations"):
        pool.acquire(MIB)


def test_expecting_again_after_the_thread_ended_starts_it_again():
    pool = PinnedHostPool(pin=False)
    for round_ in range(20):  # one thread per round: each ends once nothing is expected
        pool.expect([MIB])
        _settle(pool)
        assert pool.num_buffers == round_ + 1 and not pool._expected
    assert RecordedBuffer.made_on == [POOL_THREAD] * 20
