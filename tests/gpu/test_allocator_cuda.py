"""A worker's CUDA memory comes in expandable segments, and its pinned host memory through torch's register
path, when the user set no allocator settings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROBE = """
import torch
from longloom.launch.env import device_for_rank
device = device_for_rank()
x = torch.empty(64 << 20, dtype=torch.uint8, device=device)
print(all(s["is_expandable"] for s in torch.cuda.memory._snapshot()["segments"]))
"""


def _segments_expandable(extra_env: dict[str, str]) -> bool:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, cwd=Path(__file__).parents[2], env=env | extra_env,
        capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1] == "True"


def test_worker_device_uses_expandable_segments_by_default():
    assert _segments_expandable({})


def test_user_allocator_settings_win():
    assert not _segments_expandable({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})


PINNED_PROBE = """
import torch
from longloom.launch.env import device_for_rank
device = device_for_rank()
host = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)  # not a power of two
host.copy_(torch.arange(host.numel()) % 251)
back = host.to(device, non_blocking=True).to("cpu", non_blocking=True)
torch.cuda.synchronize()
print(host.is_pinned(), torch.equal(back, host), sep="|")
"""


def test_pinned_memory_works_under_the_default_settings():
    # torch checks the pinned keys only when CUDA starts: a bad value would fail every worker there.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run(
        [sys.executable, "-c", PINNED_PROBE], check=True, cwd=Path(__file__).parents[2], env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "True|True"
