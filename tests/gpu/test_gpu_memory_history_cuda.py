"""debug.gpu_memory_history on a GPU: memory allocated on a side stream is reported for that stream, by
name, with the Python frame that asked for it, and recording stops afterwards."""

import pytest
import torch

from longloom.training.gpu_memory_report import allocation_history_line, start_allocation_history

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MIB = 1 << 20


def allocate_on(stream: torch.cuda.Stream) -> list[torch.Tensor]:
    with torch.cuda.stream(stream):
        return [torch.empty(64 * MIB, dtype=torch.uint8, device="cuda") for _ in range(3)]


def test_side_stream_allocations_are_named_with_their_site():
    device = torch.device("cuda")
    side = torch.cuda.Stream(device)
    assert start_allocation_history(device)
    kept = allocate_on(side)
    torch.empty(MIB, device=device)  # on the compute stream: not reported
    line = allocation_history_line(device, {"test side stream": side})
    assert line is not None and line.startswith("GPU allocations of the first step on side streams")
    assert "test side stream: 192.00 MiB in 3 (largest 64.00 MiB) at " in line, line
    assert "test_gpu_memory_history_cuda.py" in line and "allocate_on" in line, line
    assert "compute" not in line
    before = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    kept += allocate_on(side)
    after = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    assert after == before, "recording stopped: no new events"
