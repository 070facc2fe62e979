"""parallel/nccl_alltoall.py on the CPU machine: what reaches ncclAlltoAll, and the errors without NCCL.

The call itself runs on GPUs only (bench/attention.py --exchange nccl_zero_cta checks it against fp64).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from longloom.parallel.nccl_alltoall import NcclAlltoAll, load_alltoall, nccl_data_type


def test_data_types_are_ncclDataType_t_values():
    # nccl.h: ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9
    assert [nccl_data_type(t) for t in (torch.float16, torch.float32, torch.float64, torch.bfloat16)] == [
        6,
        7,
        8,
        9,
    ]
    with pytest.raises(ValueError, match=r"no data type for torch.complex64; it takes torch.int8"):
        nccl_data_type(torch.complex64)


def test_a_missing_library_or_symbol_names_the_fix():
    with pytest.raises(
        RuntimeError, match=r"libnccl-nowhere.so.2, which could not be loaded .* use exchange='nccl'"
    ):
        load_alltoall("libnccl-nowhere.so.2")
    with pytest.raises(
        RuntimeError, match=r"libc.so.6 has no ncclAlltoAll \(NCCL < 2.28\).* use exchange='nccl'"
    ):
        load_alltoall("libc.so.6")


def _alltoall_recording_its_arguments(world: int):
    calls = []
    alltoall = object.__new__(NcclAlltoAll)  # no communicator here: the call's arguments are the subject
    alltoall.world, alltoall.comm = world, 0xC0FFEE
    alltoall.alltoall = lambda *arguments: calls.append(arguments) or 0
    alltoall.error_string = lambda code: b"unhandled cuda error"
    return alltoall, calls


def test_the_call_passes_rows_per_rank_dtype_communicator_and_stream():
    alltoall, calls = _alltoall_recording_its_arguments(world=2)
    send, receive = torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.empty(2, 3, 4, dtype=torch.bfloat16)
    alltoall(send, receive, SimpleNamespace(cuda_stream=77))
    assert calls == [
        (send.data_ptr(), receive.data_ptr(), 12, 9, 0xC0FFEE, 77)
    ]  # 12 elements go to each rank


def test_the_call_refuses_what_ncclAlltoAll_would_misread():
    alltoall, calls = _alltoall_recording_its_arguments(world=2)
    stream = SimpleNamespace(cuda_stream=77)
    with pytest.raises(ValueError, match=r"one shape \[P=2, \.\.\.\] and dtype; got \(3, 4\) torch.float32"):
        alltoall(torch.zeros(3, 4), torch.zeros(3, 4), stream)
    with pytest.raises(ValueError, match=r"got \(2, 4\) torch.float32 and \(2, 4\) torch.bfloat16"):
        alltoall(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16), stream)
    with pytest.raises(ValueError, match=r"must be contiguous"):
        alltoall(torch.zeros(4, 2).t(), torch.zeros(2, 4), stream)
    assert calls == []


def test_a_failed_call_says_what_nccl_said():
    alltoall, _ = _alltoall_recording_its_arguments(world=2)
    alltoall.alltoall = lambda *arguments: 1
    with pytest.raises(RuntimeError, match=r"ncclAlltoAll failed: unhandled cuda error \(ncclResult 1\)"):
        alltoall(torch.zeros(2, 4), torch.zeros(2, 4), SimpleNamespace(cuda_stream=0))
