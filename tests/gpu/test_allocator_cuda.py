"""A worker's CUDA memory comes in expandable segments when the user set no allocator settings."""

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
