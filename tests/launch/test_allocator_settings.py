"""Workers get expandable segments and threaded pinning unless the user chose allocator settings.

At 512K tokens on one H200 the default allocator failed with 20 GiB reserved but free, while
expandable segments ran (BENCHMARKS.md, issue 6); torch's register path pinned host memory at 6.9 GiB/s
where the first step's cudaHostAlloc had pinned 1.3 GiB/s (session 10): a worker must not depend on the
user knowing that.
"""

from __future__ import annotations

import subprocess
import sys

from longloom.launch.env import DEFAULT_ALLOCATOR_SETTINGS, default_allocator_settings
from tests.launch.conftest import REPO, subprocess_env


def test_default_only_when_the_user_chose_nothing():
    assert default_allocator_settings({}) == (
        "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
    )
    assert default_allocator_settings({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) is None
    assert default_allocator_settings({"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"}) is None


APPLY = """
import os, torch
from longloom.launch.env import use_default_allocator_settings
torch._C._accelerator_getAllocatorSettings()  # the allocator has parsed its settings already
use_default_allocator_settings()
print(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), torch._C._accelerator_getAllocatorSettings(), sep="|")
"""


def _applied(env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", APPLY], check=True, cwd=REPO, env=env, capture_output=True, text=True
    )
    return done.stdout.strip().splitlines()[-1].split("|")


def test_applied_to_the_running_allocator_and_to_child_processes():
    env = {
        k: v
        for k, v in subprocess_env().items()
        if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    }
    assert _applied(env) == [DEFAULT_ALLOCATOR_SETTINGS, DEFAULT_ALLOCATOR_SETTINGS]


def test_the_users_settings_are_kept():
    env = subprocess_env() | {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"}
    assert _applied(env) == ["max_split_size_mb:256", "max_split_size_mb:256"]
