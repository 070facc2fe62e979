"""The first step's GPU memory line: reserved and in-use bytes per stream, compute first, and retries."""

import torch

from longloom.training.gpu_memory_report import describe_gpu_memory, gpu_memory_line

GIB = 1 << 30
COMPUTE, SIDE, OFFLOAD = 0x10, 0x20, 0x30


def _segment(stream: int, total_gib: float, allocated_gib: float) -> dict:
    return {"stream": stream, "total_size": int(total_gib * GIB), "allocated_size": int(allocated_gib * GIB)}


def test_streams_are_summed_and_listed_compute_first_then_largest():
    segments = [
        _segment(OFFLOAD, 2, 0.5),
        _segment(COMPUTE, 100, 90),
        _segment(SIDE, 6, 1),
        _segment(COMPUTE, 20, 4),
        _segment(OFFLOAD, 1, 0),
    ]
    stats = {"allocated_bytes.all.peak": int(113.8 * GIB), "reserved_bytes.all.peak": 136 * GIB}
    line = describe_gpu_memory(stats, segments, COMPUTE)
    assert line == (
        "GPU memory after the first step: peak allocated 113.80 GiB, peak reserved 136.00 GiB; reserved now by "
        "stream: compute 120.00 GiB (94.00 GiB in use), stream 0x20 6.00 GiB (1.00 GiB in use), "
        "stream 0x30 3.00 GiB (512.00 MiB in use); allocator retries 0"
    )


def test_named_side_streams_are_shown_by_name():
    segments = [_segment(COMPUTE, 10, 9), _segment(SIDE, 30, 0), _segment(OFFLOAD, 1, 0)]
    line = describe_gpu_memory({}, segments, COMPUTE, {SIDE: "activation prefetch", COMPUTE: "ignored"})
    assert (
        "reserved now by stream: compute 10.00 GiB (9.00 GiB in use), activation prefetch 30.00 GiB (0 B in use), "
        "stream 0x30 1.00 GiB (0 B in use)"
    ) in line


def test_retries_name_what_gives_memory_back():
    line = describe_gpu_memory({"num_alloc_retries": 3}, [], COMPUTE)
    assert "reserved now by stream: none; allocator retries 3 (each freed the allocator's cache" in line
    assert "lower offload.device_activations, or offload.gpu_share" in line


def test_no_line_off_cuda():
    assert gpu_memory_line(torch.device("cpu")) is None
