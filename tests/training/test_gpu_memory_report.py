"""The first step's GPU memory line: reserved and in-use bytes per stream, compute first, and retries."""

import torch

from longloom.training.gpu_memory_report import (
    AllocationSite,
    allocation_sites,
    deepspeed_streams,
    describe_allocation_sites,
    describe_gpu_memory,
    gpu_memory_line,
    start_allocation_history,
)

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


def _alloc(stream: int, mib: int, frames: list[tuple[str, int, str]], action: str = "alloc") -> dict:
    return {
        "action": action,
        "stream": stream,
        "size": mib << 20,
        "frames": [{"filename": f, "line": line, "name": name} for f, line, name in frames],
    }


TORCH_FRAME = ("/site/torch/nn/modules/module.py", 1775, "_call_impl")
DS_FRAME = ("/site/deepspeed/runtime/zero/stage3.py", 1650, "__avg_scatter_grads")
OURS_FRAME = ("/repo/longloom/offload/activations.py", 330, "_keep_on_device")


def test_allocation_sites_sum_each_streams_allocations_by_the_innermost_owned_frame():
    traces = [
        _alloc(SIDE, 256, [TORCH_FRAME, DS_FRAME]),
        _alloc(SIDE, 512, [TORCH_FRAME, DS_FRAME, OURS_FRAME]),  # DeepSpeed's frame is the innermost owned
        _alloc(SIDE, 64, [OURS_FRAME]),
        _alloc(SIDE, 1024, [DS_FRAME], action="free_completed"),  # not an allocation
        _alloc(COMPUTE, 4096, [OURS_FRAME]),  # not an asked-for stream
        _alloc(OFFLOAD, 8, [TORCH_FRAME]),  # only torch's frames: the innermost one
    ]
    sites = allocation_sites(traces, [SIDE, OFFLOAD])
    assert sites[SIDE] == [
        AllocationSite("runtime/zero/stage3.py:1650 __avg_scatter_grads", 2, 768 << 20, 512 << 20),
        AllocationSite("longloom/offload/activations.py:330 _keep_on_device", 1, 64 << 20, 64 << 20),
    ]
    assert sites[OFFLOAD] == [AllocationSite("nn/modules/module.py:1775 _call_impl", 1, 8 << 20, 8 << 20)]


def test_allocation_sites_keep_the_top_sites_and_name_streams_in_the_line():
    traces = [_alloc(SIDE, size, [(f"/repo/longloom/m{size}.py", size, "f")]) for size in (1, 2, 3, 4)]
    sites = allocation_sites(traces, [SIDE, OFFLOAD], top=2)
    assert [site.total_bytes >> 20 for site in sites[SIDE]] == [4, 3]
    line = describe_allocation_sites(sites, {SIDE: "ZeRO-3 gradient reduce"})
    assert line == (
        "GPU allocations of the first step on side streams, largest sites: ZeRO-3 gradient reduce: 4.00 MiB in 1 "
        "(largest 4.00 MiB) at repo/longloom/m4.py:4 f; 3.00 MiB in 1 (largest 3.00 MiB) at repo/longloom/m3.py:3 f"
        " | stream 0x30: no allocations recorded"
    )


def test_deepspeed_streams_are_empty_without_an_engine_that_has_them():
    assert deepspeed_streams(object()) == {}
    assert start_allocation_history(torch.device("cpu")) is False
