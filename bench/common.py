"""Shared pieces of the benchmarks: timing with CUDA events, provenance, tables, BENCHMARKS.md records.

Every figure that goes to BENCHMARKS.md carries what was measured, the device, the date, the git
commit and the exact command, so a number can always be traced back and re-run.
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def start_bench() -> tuple[int, torch.device]:
    """(world size, this rank's device) after the idempotent process-group init; warns when on CPU."""
    from longloom.launch.env import device_for_rank, init_distributed

    _, world = init_distributed()
    device = device_for_rank()
    if device.type != "cuda":
        print_rank_zero("no CUDA device: running on CPU as a smoke test; the timings mean nothing")
    return world, device


def rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_zero(*args: object) -> None:
    if rank_zero():
        print(*args, flush=True)


def time_ms(
    fn: Callable[[], object],
    warmup: int,
    iters: int,
    group: dist.ProcessGroup | None = None,
    before: Callable[[], None] | None = None,
) -> float:
    """Median over `iters` runs of the slowest rank's time of `fn()`, in milliseconds.

    Ranks are aligned by a barrier before every run (collectives would otherwise time the wait for a
    late peer); `before()` (e.g. dropping .grad) runs outside the timed region. CUDA events on GPU,
    perf_counter after a synchronize on CPU.
    """
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        if cuda:
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier(group=group)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            times.append((start, end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    if cuda:
        torch.cuda.synchronize()
        millis = [start.elapsed_time(end) for start, end in times]
    else:
        millis = [seconds * 1e3 for seconds in times]
    per_run = torch.tensor(millis, dtype=torch.float64, device="cuda" if cuda else "cpu")
    if dist.is_initialized():
        dist.all_reduce(per_run, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(per_run.tolist())


def git_commit() -> str:
    # The GPU machine gets a copy of the working tree without .git: the launcher passes the commit.
    if os.environ.get("LONGLOOM_COMMIT"):
        return os.environ["LONGLOOM_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            check=False,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


def launch_command() -> str:
    """The command line as the user typed it (torchrun launches are reconstructed from its environment)."""
    args = " ".join(shlex.quote(arg) for arg in sys.argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')} {args}"
    return f"python {args}"


def device_description(world_size: int) -> str:
    if torch.cuda.is_available():
        return f"{world_size} x {torch.cuda.get_device_name()}"
    return f"{world_size} x CPU process (no CUDA: timings are not meaningful)"


def software_versions() -> str:
    parts = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
        if torch.backends.cudnn.is_available():
            parts.append(f"cuDNN {torch.backends.cudnn.version()}")
        parts.append(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    try:
        import deepspeed

        parts.append(f"deepspeed {deepspeed.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


# Columns of the attention throughput tables (attention.py, ring.py): one layout, comparable blocks.
ATTENTION_HEADERS = [
    "method",
    "S",
    "P",
    "kernel",
    "fwd ms",
    "fwd TFLOP/s/GPU",
    "fwd+bwd ms",
    "fwd+bwd TFLOP/s/GPU",
    "notes",
]


def check_against_fp64(
    label: str, want: Sequence[torch.Tensor], single: Sequence[torch.Tensor], got: Sequence[torch.Tensor]
) -> str:
    """One report line for (out, dq, dk, dv): the distributed error vs fp64 next to one GPU's.

    Raises when the distributed result is more than 2x further from fp64 than one GPU's own rounding:
    a wrong result is never benchmarked.
    """
    report, ok = [], True
    for name, w, s, g in zip(("out", "dq", "dk", "dv"), want, single, got):
        single_error, error = (s - w).abs().max().item(), (g - w).abs().max().item()
        ok &= error <= 2 * single_error + 1e-6
        report.append(f"{name} {error:.2e} (1 GPU {single_error:.2e})")
    line = f"{label}: max abs error vs fp64: " + ", ".join(report)
    if not ok:
        raise RuntimeError(line + ": above 2x the single-GPU error; not benchmarking a wrong result")
    return line


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths)) + " |"

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *(line(row) for row in cells)])


# Environment settings that change what a benchmark measures; recorded with it when set.
RECORDED_ENVIRONMENT = ("PYTORCH_CUDA_ALLOC_CONF", "NCCL_ALGO", "NCCL_PROTO", "CUDA_DEVICE_MAX_CONNECTIONS")


def settings_lines() -> list[str]:
    return [
        f"- environment: {name}={os.environ[name]}" for name in RECORDED_ENVIRONMENT if name in os.environ
    ]


def append_record(title: str, what: str, table: str, world_size: int, path: Path | None = None) -> Path:
    """Appends one block (what, table, device, date, commit, exact command) to BENCHMARKS.md."""
    path = path or REPO_ROOT / "BENCHMARKS.md"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join(
        [
            f"## {title}",
            "",
            what,
            "",
            f"- device: {device_description(world_size)}",
            f"- software: {software_versions()}",
            f"- date: {now}",
            f"- commit: {git_commit()}",
            f"- command: `{launch_command()}`",
            *settings_lines(),
            "",
            table,
            "",
            "",
        ]
    )
    header = (
        "" if path.exists() else "# Benchmarks\n\nFigures appended by the scripts in bench/ (`--record`).\n\n"
    )
    with path.open("a") as handle:
        handle.write(header + block)
    return path
