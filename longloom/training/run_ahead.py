"""How far the host may run ahead of the GPU: at most two decoder layers (forward and recomputation).

Why: ZeRO-3 gathers each layer's weights on its own stream, into memory from that stream's pool of the
caching allocator, and the layer frees them on the compute stream. Such a block goes back to the
gather stream's pool only once the GPU has passed the free (the allocator's record_stream events), and
only that stream can reuse it. At long sequences a layer keeps the GPU busy for seconds while the host
queues it in milliseconds, so the host runs far ahead and every gather takes new memory: on 2 x H200 at
384K-448K tokens the gather stream held 30 GiB with nothing in use after the first step (8 layers as
much as 32; `debug.gpu_memory_history`, BENCHMARKS.md session 15), memory the compute stream cannot use,
and DeepSpeed logged an allocator cache flush every step. PyTorch FSDP bounds the same thing with its
`limit_all_gathers` (two layers in flight); DeepSpeed has no such bound, so the trainer adds one.

How: a forward pre-hook on every decoder layer, first among the layer's hooks (so before ZeRO-3 gathers
for it), records a CUDA event on the compute stream and blocks the host until the event recorded
`MAX_LAYERS_AHEAD` layers earlier has passed. With activation checkpointing the layers' recomputation in
backward runs the same hook, which bounds backward too. When the GPU is the faster side (short
sequences) every event has passed already and nothing waits. The trainer bounds runs under ZeRO-3 only:
without its gathers the lead costs no memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

# Two layers queued on the GPU keep it busy while the host issues the third, as in FSDP.
MAX_LAYERS_AHEAD = 2


class GpuMark(Protocol):
    def synchronize(self) -> None: ...


def _compute_stream_mark(device: torch.device) -> Callable[[], GpuMark]:
    def mark() -> GpuMark:
        event = torch.cuda.Event(blocking=True)  # the host sleeps while it waits instead of spinning a core
        event.record(torch.cuda.current_stream(device))
        return event

    return mark


class RunAheadLimit:
    """Blocks the host at a layer's start until the GPU has reached the start of the layer
    `max_layers_ahead` earlier. `mark` makes a point on the GPU's timeline (a CUDA event on CUDA)."""

    def __init__(self, mark: Callable[[], GpuMark], max_layers_ahead: int = MAX_LAYERS_AHEAD):
        if max_layers_ahead < 1:
            raise ValueError(f"max_layers_ahead must be at least 1 (got {max_layers_ahead})")
        self.max_layers_ahead = max_layers_ahead
        self._mark = mark
        self._marks: deque[GpuMark] = deque()

    def layer_starting(self) -> None:
        self._marks.append(self._mark())
        while len(self._marks) > self.max_layers_ahead:
            self._marks.popleft().synchronize()

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.layer_starting()


def limit_run_ahead(
    layers: Iterable[nn.Module], device: torch.device, max_layers_ahead: int = MAX_LAYERS_AHEAD
) -> RunAheadLimit | None:
    """Bounds the host's lead over the GPU to `max_layers_ahead` of `layers` (the decoder layers; call
    before deepspeed.initialize, whose hooks then come after this one). None off CUDA: nothing to bound."""
    if device.type != "cuda":
        return None
    limit = RunAheadLimit(_compute_stream_mark(device), max_layers_ahead)
    for layer in layers:
        layer.register_forward_pre_hook(limit._hook, prepend=True)
    return limit
