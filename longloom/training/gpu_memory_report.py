"""What the CUDA caching allocator holds after the first step, and for which streams: one log line.

Why: the step's "mem" figure is the peak of allocated tensors; what the GPU runs out of is reserved
memory. The two part where the allocator caches memory apart for each stream (a block freed on one
stream is reused only by allocations on that stream, expandable segments included) or fragments it, and
when a request finds no room the allocator frees its whole cache and retries (a device synchronisation
and new cudaMallocs). On 2 x H200 at 256K tokens the 8B model peaked at 113.8 GiB allocated with 136.0 GiB
reserved and DeepSpeed logged one such flush per step (BENCHMARKS.md, session 13). This line says how
much each stream reserves beside what it uses and how many retries there were, so a run can give that
memory back (less offload.device_activations or offload.gpu_share) before it costs time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from longloom.offload.memory import human_bytes


def describe_gpu_memory(
    stats: Mapping[str, int],
    segments: Iterable[Mapping[str, Any]],
    compute_stream: int,
    stream_names: Mapping[int, str] | None = None,
) -> str:
    """The line for `torch.cuda.memory_stats()` and the device's segments of `torch.cuda.memory_snapshot()`.

    `compute_stream`: the handle (cudaStream_t as an integer) of the stream the model runs on; its
    segments are listed first as "compute", the others largest first, by `stream_names` (handle -> name:
    longloom's own side streams) or else by handle (DeepSpeed's, NCCL's).
    """
    names = {**(stream_names or {}), compute_stream: "compute"}
    reserved: dict[int, int] = {}
    in_use: dict[int, int] = {}
    for segment in segments:
        stream = int(segment["stream"])
        reserved[stream] = reserved.get(stream, 0) + int(segment["total_size"])
        in_use[stream] = in_use.get(stream, 0) + int(segment["allocated_size"])
    order = sorted(reserved, key=lambda stream: (stream != compute_stream, -reserved[stream]))
    per_stream = ", ".join(
        f"{names.get(stream, f'stream {stream:#x}')} {human_bytes(reserved[stream])} "
        f"({human_bytes(in_use[stream])} in use)"
        for stream in order
    )
    retries = int(stats.get("num_alloc_retries", 0))
    line = (
        f"GPU memory after the first step: peak allocated {human_bytes(stats.get('allocated_bytes.all.peak', 0))}, "
        f"peak reserved {human_bytes(stats.get('reserved_bytes.all.peak', 0))}; reserved now by stream: "
        f"{per_stream or 'none'}; allocator retries {retries}"
    )
    if retries:
        line += (
            " (each freed the allocator's cache and synchronised the device: the GPU is short of memory; "
            "lower offload.device_activations, or offload.gpu_share with offload.optimizer=interleaved)"
        )
    return line


def gpu_memory_line(
    device: torch.device, streams: Mapping[str, torch.cuda.Stream | None] | None = None
) -> str | None:
    """The line for `device` now; None off CUDA. `streams`: name -> side stream, to name their memory."""
    if device.type != "cuda":
        return None
    segments = [s for s in torch.cuda.memory_snapshot() if s.get("device") == device.index]
    names = {stream.cuda_stream: name for name, stream in (streams or {}).items() if stream is not None}
    return describe_gpu_memory(
        torch.cuda.memory_stats(device), segments, torch.cuda.current_stream(device).cuda_stream, names
    )
