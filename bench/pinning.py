"""How fast this machine pins host memory, by method and thread count.

    python bench/pinning.py --gib 16 --buffer-gib 0.75 --threads 1 4 8

The activation pool (offload/activations.py) pins its buffers during the first step: 38.9 GiB in 17.1 s
at 256K tokens on 2 x H200 (BENCHMARKS.md), most of the first step's extra time over the steady ones.
Before moving or changing that work, this measures ways to pin the same bytes, each in a fresh process
(torch reads its allocator settings once, and caches pinned blocks):
- alloc: torch.empty(pin_memory=True) by T threads (torch's caching host allocator, cudaHostAlloc);
- alloc, exact sizes: the same with PYTORCH_CUDA_ALLOC_CONF=pinned_max_round_threshold_mb:1 (torch rounds
  every pinned block up to a power of two unless told otherwise: "held GiB" shows what that costs; torch
  2.11 does not know the setting, BENCHMARKS.md session 10);
- alloc, register threads: the same with PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
  pinned_num_register_threads:T (torch maps the pages with T threads, then cudaHostRegister);
- touch+register: torch.empty (pageable), one write per page by T threads (the kernel zero-fills pages in
  parallel), then cudaHostRegister of each buffer, all by T threads.
Also reported: the bytes torch's allocator pinned for the requests (it may round a block up: a 0.75 GiB
buffer would hold 1 GiB of pinned host memory, which long runs are short of).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table

GIB = 1 << 30
METHODS = ("alloc", "alloc, exact sizes", "alloc, register threads", "touch+register")
# PYTORCH_CUDA_ALLOC_CONF per method (torch reads it once, at CUDA init); T = the thread count.
METHOD_SETTINGS = {
    "alloc, exact sizes": "pinned_max_round_threshold_mb:1",  # no power-of-two rounding above 1 MiB
    "alloc, register threads": "pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}",
}


def _pinned_alloc(buffer_bytes: int, count: int, threads: int) -> list[torch.Tensor]:
    with ThreadPoolExecutor(threads) as pool:
        return list(
            pool.map(lambda _: torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True), range(count))
        )


def _touch_then_register(buffer_bytes: int, count: int, threads: int) -> list[torch.Tensor]:
    cudart = torch.cuda.cudart()

    def one(_: int) -> torch.Tensor:
        buffer = torch.empty(buffer_bytes, dtype=torch.uint8)
        buffer.view(-1, 4096)[:, 0] = 0  # one write per 4 KiB page: the kernel allocates and zero-fills it
        code = cudart.cudaHostRegister(buffer.data_ptr(), buffer_bytes, 0)
        if int(code) != 0:
            raise RuntimeError(f"cudaHostRegister failed with {code}")
        return buffer

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def measure(method: str, threads: int, buffer_bytes: int, count: int) -> dict:
    """One method in this process: seconds to pin `count` buffers, and what torch's allocator holds."""
    torch.cuda.init()
    make = _touch_then_register if method == "touch+register" else _pinned_alloc
    started = time.perf_counter()
    buffers = make(buffer_bytes, count, threads)
    seconds = time.perf_counter() - started
    stats = torch.cuda.host_memory_stats()
    held = stats.get("allocated_bytes.current", 0)  # the blocks torch pinned, at their rounded sizes
    del buffers
    return {"seconds": seconds, "held_bytes": held if method != "touch+register" else buffer_bytes * count}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=16.0, help="requested pinned bytes per measurement")
    parser.add_argument("--buffer-gib", type=float, default=0.75, help="one buffer (not a power of two)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("pinning needs CUDA")
    buffer_bytes = int(args.buffer_gib * GIB) // 4096 * 4096
    count = max(1, round(args.gib / args.buffer_gib))
    if args.one:  # a child: one measurement, as JSON
        print(json.dumps(measure(args.one[0], int(args.one[1]), buffer_bytes, count)))
        return
    requested = buffer_bytes * count / GIB
    rows = []
    for method in METHODS:
        for threads in args.threads:
            env = dict(os.environ)
            if method in METHOD_SETTINGS:
                env["PYTORCH_CUDA_ALLOC_CONF"] = METHOD_SETTINGS[method].format(threads=threads)
            command = [sys.executable, __file__, "--gib", str(args.gib), "--buffer-gib", str(args.buffer_gib)]
            done = subprocess.run(
                [*command, "--one", method, str(threads)],
                check=False,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                # torch 2.11 has no pinned_max_round_threshold_mb: say so in one line, not a traceback.
                unknown = "Unrecognized key" in done.stderr
                why = "this torch does not know the setting" if unknown else f"failed: {done.stderr[-200:]}"
                rows.append([method, threads, f"{requested:.1f}", "-", "-", why])
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            seconds, held = result["seconds"], result["held_bytes"] / GIB
            rows.append(
                [
                    method,
                    threads,
                    f"{requested:.1f}",
                    f"{held:.1f}",
                    f"{seconds:.2f}",
                    f"{requested / seconds:.2f}",
                ]
            )
            print(f"{method}, {threads} threads: {requested:.1f} GiB in {seconds:.2f} s", flush=True)
    print(markdown_table(["method", "threads", "requested GiB", "held GiB", "s", "GiB/s"], rows))


if __name__ == "__main__":
    main()
