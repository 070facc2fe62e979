"""The machine a run is planned for: this one as torch sees it, or one given by its numbers."""

import pytest
import torch

from longloom.runtime.machine import GIB, Machine, host_memory_bytes


def test_this_cpu_machine_has_no_gpu_and_its_own_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    here = Machine.here()
    assert not here.has_gpus and here.gpus_per_host == 0 and here.host_bytes == host_memory_bytes() > 0


def test_a_planned_machine_keeps_its_numbers_and_refuses_nonpositive_ones():
    planned = Machine.planned(8, 79.6, 2048)
    assert (planned.gpus_per_host, planned.gpu_bytes, planned.host_bytes) == (8, int(79.6 * GIB), 2048 * GIB)
    assert planned.has_gpus and planned.gpu_name == "the planned GPU"
    with pytest.raises(ValueError, match="--gpus-per-host must be positive; got 0"):
        Machine.planned(0, 80, 512)
    with pytest.raises(ValueError, match="--host-memory-gib must be positive; got -1"):
        Machine.planned(1, 80, -1)
