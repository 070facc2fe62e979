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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from longloom.offload.memory import human_bytes
from longloom.runtime.page_locked import device_index


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


def _names_by_handle(streams: Mapping[str, torch.cuda.Stream | None] | None) -> dict[int, str]:
    """name -> stream (None: no such stream here) as cudaStream_t handle -> name, as the allocator reports streams."""
    return {stream.cuda_stream: name for name, stream in (streams or {}).items() if stream is not None}


def gpu_memory_line(
    device: torch.device, streams: Mapping[str, torch.cuda.Stream | None] | None = None
) -> str | None:
    """The line for `device` now; None off CUDA. `streams`: name -> side stream, to name their memory."""
    if device.type != "cuda":
        return None
    segments = [s for s in torch.cuda.memory_snapshot() if s.get("device") == device_index(device)]
    names = _names_by_handle(streams)
    return describe_gpu_memory(
        torch.cuda.memory_stats(device), segments, torch.cuda.current_stream(device).cuda_stream, names
    )


def deepspeed_streams(engine: object) -> dict[str, torch.cuda.Stream | None]:
    """ZeRO-3's own side streams by name, where this DeepSpeed version keeps them (private attributes: a
    version that moved them leaves them unnamed in the line, nothing else)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None)
    streams = {
        "ZeRO-3 gradient reduce": getattr(optimizer, "reduce_and_partition_stream", None),
        "ZeRO-3 parameter gather": getattr(offload, "_DeepSpeedZeRoOffload__allgather_stream", None),
    }
    return {name: stream for name, stream in streams.items() if isinstance(stream, torch.cuda.Stream)}


# -- where side streams' memory came from (debug.gpu_memory_history) ------------------------------------

# Ring buffer of allocator events kept while recording: the first step of the 8B model at long sequences
# makes tens of thousands of allocations; a million entries keep all of them (about 100 B each plus stacks).
HISTORY_ENTRIES = 1_000_000
# Frames from these packages say who asked for the memory; torch's own frames only say how.
_OWNER_PACKAGES = ("/longloom/", "/deepspeed/")


class AllocationSite(NamedTuple):
    where: str  # "package/module.py:line function" of the innermost longloom or DeepSpeed frame
    count: int
    total_bytes: int
    largest_bytes: int


def start_allocation_history(device: torch.device) -> bool:
    """Records the CUDA allocator's events with Python stacks from now on; False (nothing done) off CUDA."""
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=HISTORY_ENTRIES)
    return True


def stop_allocation_history() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def _site_of(frames: Sequence[Mapping[str, Any]]) -> str:
    """The innermost frame of longloom or DeepSpeed (else the innermost frame), as a short location."""
    owned = [f for f in frames if any(package in str(f.get("filename", "")) for package in _OWNER_PACKAGES)]
    frame = (owned or list(frames) or [{"filename": "?", "line": 0, "name": "?"}])[0]
    path = "/".join(str(frame.get("filename", "?")).split("/")[-3:])
    return f"{path}:{frame.get('line', 0)} {frame.get('name', '?')}"


def allocation_sites(
    traces: Iterable[Mapping[str, Any]], streams: Iterable[int], top: int = 3
) -> dict[int, list[AllocationSite]]:
    """For each of `streams`, its `top` allocation sites by bytes among the "alloc" events of `traces`
    (one device's `torch.cuda.memory._snapshot()["device_traces"]` list)."""
    wanted = set(streams)
    by_stream: dict[int, dict[str, list[int]]] = {stream: {} for stream in wanted}
    for event in traces:
        stream = int(event.get("stream", -1))
        if event.get("action") != "alloc" or stream not in wanted:
            continue
        sizes = by_stream[stream].setdefault(_site_of(event.get("frames", [])), [])
        sizes.append(int(event["size"]))
    return {
        stream: sorted(
            (AllocationSite(where, len(sizes), sum(sizes), max(sizes)) for where, sizes in sites.items()),
            key=lambda site: -site.total_bytes,
        )[:top]
        for stream, sites in by_stream.items()
    }


def describe_allocation_sites(
    sites: Mapping[int, Sequence[AllocationSite]], stream_names: Mapping[int, str] | None = None
) -> str:
    """One line: per side stream, where its allocations of the first step came from."""
    names = stream_names or {}
    parts = []
    for stream, stream_sites in sites.items():
        listed = "; ".join(
            f"{human_bytes(site.total_bytes)} in {site.count} (largest {human_bytes(site.largest_bytes)}) at "
            f"{site.where}"
            for site in stream_sites
        )
        parts.append(f"{names.get(stream, f'stream {stream:#x}')}: {listed or 'no allocations recorded'}")
    return "GPU allocations of the first step on side streams, largest sites: " + (
        " | ".join(parts) or "none"
    )


def allocation_history_line(
    device: torch.device, streams: Mapping[str, torch.cuda.Stream | None] | None = None
) -> str | None:
    """The side streams' allocation sites since start_allocation_history (recording stops); None off CUDA."""
    if device.type != "cuda":
        return None
    snapshot = torch.cuda.memory._snapshot()
    stop_allocation_history()
    traces = snapshot["device_traces"][device_index(device)]
    compute = torch.cuda.current_stream(device).cuda_stream
    side = sorted({int(e["stream"]) for e in traces if e.get("action") == "alloc"} - {compute})
    names = _names_by_handle(streams)
    return describe_allocation_sites(allocation_sites(traces, side), names)
