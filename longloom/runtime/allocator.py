"""The CUDA allocators' settings for a worker, unless the user chose: expandable segments, fast pinning.

Long sequences allocate a few very large tensors whose sizes change from layer to layer; the default
fixed segments fragment (issue 6, BENCHMARKS.md). torch's pinned host memory (CPU Adam's buffers) is
pinned by torch's own register path with threads instead of cudaHostAlloc (issue 18 item 7).
Applied by `runtime.process.device_for_rank`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from longloom.runtime.ranks import local_rank

logger = logging.getLogger(__name__)

# PyTorch reads either name when CUDA is first initialised; the second is the newer, device-neutral one.
ALLOCATOR_SETTINGS_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# Long sequences allocate a few very large tensors whose sizes change from layer to layer (MLP
# intermediates, recomputed attention). With fixed segments the freed blocks do not fit the next
# request: on one H200 at 512K tokens a run asked for 14 GiB with 20 GiB reserved but free and failed,
# while with expandable segments it peaked at 124 of 140 GiB (BENCHMARKS.md, issue 6).
EXPANDABLE_SEGMENTS = "expandable_segments:True"
# torch's pinned allocations (DeepSpeed's pinned optimizer buffers, checkpoint staging) default to
# cudaHostAlloc, which pinned 1.3 GiB/s on an H200 host (the activation pool's 31.2 GiB in 24 s of the
# first step at 128K on 2 x H200, when the pool still used it); torch's register path (pages faulted in
# by 8 threads, then cudaHostRegister) pinned 6.9 GiB/s there (BENCHMARKS.md, session 10,
# bench/pinning.py). Both round a block up to a power of two. The activation pool now page-locks its
# own buffers at their exact sizes (runtime/page_locked.py). torch wants a power of two threads; 8 was
# the measured count.
FAST_PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
DEFAULT_ALLOCATOR_SETTINGS = f"{EXPANDABLE_SEGMENTS},{FAST_PINNING}"


def default_allocator_settings(environ: Mapping[str, str]) -> str | None:
    """The CUDA allocator settings to set for a worker: ours unless the user chose any (then None)."""
    if any(name in environ for name in ALLOCATOR_SETTINGS_ENV):
        return None
    return DEFAULT_ALLOCATOR_SETTINGS


def use_default_allocator_settings() -> None:
    """Our settings for this process's CUDA allocators unless the user set the variable."""
    settings = default_allocator_settings(os.environ)
    if settings is None:
        return
    os.environ[ALLOCATOR_SETTINGS_ENV[0]] = settings  # for processes this one starts
    # The allocator parses the variable once, on first use, which may have happened already (an
    # import that touched CUDA); this re-parses it. Private in torch 2.9-2.13, hence the guard.
    apply_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if apply_settings is not None:
        apply_settings(settings)
    if local_rank() == 0:
        logger.info(
            "PYTORCH_CUDA_ALLOC_CONF was unset: using %s (less fragmentation at long sequences, "
            "threaded pinning of host memory); "
            "set the variable yourself to choose otherwise",
            settings,
        )
