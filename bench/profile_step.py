"""Where one training step's time goes (issue 18 item 3): the trainer's own step under torch.profiler.

    torchrun --nproc-per-node 2 bench/profile_step.py configs/llama8b-1m.yaml data.seq_len=262144 \
        parallel.ulysses=2 launch.workers=2 --warmup 2 --out /tmp/profile [--record]
    torchrun --nproc-per-node 2 bench/profile_step.py configs/tiny.yaml --warmup 1 --out /tmp/profile  # CPU check

The config is the one `longloom train` takes (dotted overrides after it; checkpoints and evaluation are
switched off here). Every rank prepares its process as a launcher's worker does (CPU threads, DeepSpeed's
ops: launch/worker_setup.py) and builds the Trainer (training/trainer.py) exactly as a run does, trains
--warmup steps, then trains one more under torch.profiler. Rank 0 sorts the device kernels of that step
into categories by name (attention, matmuls, communication, copies: the offload traffic and the
all-to-all packing, other kernels), adds the optimizer step's host span (DeepSpeed's CPU Adam runs on
the host) and prints each category's time against the step's wall time, the idle share of the GPU, the
step's MFU (model FLOPs / peak, as the trainer reports it) and a Chrome trace under --out.

Kernels of different streams overlap (communication and offload copies run beside compute), so the
categories may add up to more than the wall time; "GPU busy" counts each instant once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import append_record, markdown_table
from longloom.config import load_config
from longloom.launch.worker_setup import prepare_worker_process
from longloom.training.metrics import device_peak_tflops
from longloom.training.trainer import Trainer

# First match wins; names of cuDNN / flash / Triton / cuBLAS / NCCL kernels and of aten copies.
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa|_attn|triton_.*(fwd|bwd)", re.IGNORECASE)),
    (
        "communication",
        re.compile(r"nccl|all_?to_?all|all_?gather|reduce_?scatter|allreduce|gloo", re.IGNORECASE),
    ),
    (
        "matmul",
        re.compile(r"gemm|matmul|cutlass|xmma|nvjet|sm90_|sm80_|addmm|\bmm\b|bmm|linear", re.IGNORECASE),
    ),
    ("copies", re.compile(r"memcpy|memset|copy_|to_copy|CatArray|contiguous|clone", re.IGNORECASE)),
]


def categorise(name: str) -> str:
    return next((category for category, pattern in CATEGORIES if pattern.search(name)), "other kernels")


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us) in ms: time at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e3


def step_profile(trainer: Trainer, step: int, out: Path) -> tuple[Path, float]:
    """(Chrome trace of the profiled step, its wall seconds). The trace, not profiler.events(), is what
    is read back: its kernel records (name, ts, dur) keep the same shape across torch releases."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        trainer.train_step(step)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        wall = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"step-{step}-rank{trainer.rank}.json"
    profiler.export_chrome_trace(str(trace))
    return trace, wall


def summarise(trace: Path, wall_s: float) -> tuple[list[list[object]], float | None]:
    """Rows (category, ms, % of the step) and the GPU-busy ms (None without device kernels)."""
    events = [e for e in json.loads(trace.read_text()).get("traceEvents", []) if e.get("ph") == "X"]
    times: dict[str, float] = {}
    intervals = []
    for event in events:
        kind = event.get("cat", "")
        if kind in ("kernel", "gpu_memcpy", "gpu_memset"):
            category = "copies" if kind != "kernel" else categorise(event["name"])
            times[category] = times.get(category, 0.0) + event["dur"] / 1e3
            intervals.append((event["ts"], event["ts"] + event["dur"]))
    # torch.optim.Optimizer.step (DeepSpeed's CPU Adam subclasses it) is annotated "Optimizer.step#...".
    optimizer_spans = {
        (event["ts"], event["dur"])
        for event in events
        if str(event.get("name", "")).startswith("Optimizer.step")
    }
    times["optimizer step (host span)"] = sum(dur for _, dur in optimizer_spans) / 1e3
    wall_ms = wall_s * 1e3
    rows = [[name, f"{ms:,.1f}", f"{100 * ms / wall_ms:.1f}"] for name, ms in sorted(times.items())]
    return rows, (busy_ms(intervals) if intervals else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a longloom config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides a.b=v")
    parser.add_argument("--warmup", type=int, default=2, help="steps trained before the profiled one")
    parser.add_argument("--out", type=Path, required=True, help="folder for the Chrome traces")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    profiled = args.warmup + 1
    overrides = [
        *args.overrides,
        f"train.steps={profiled}",
        "checkpoint.interval=0",
        "train.eval_every=0",
        f"train.output_dir={args.out / 'run'}",
    ]
    cfg = load_config(args.config, overrides)
    # As every launcher's worker does: torchrun starts this process at OMP_NUM_THREADS=1, and without
    # launch.cpu_threads CPU Adam ran on one core (an 8.6 s optimizer span at 256K, BENCHMARKS.md).
    prepare_worker_process(cfg)
    trainer = Trainer(cfg)
    if not trainer.build():
        raise SystemExit(f"nothing to train in {args.out / 'run'}: remove it and run again")
    for step in range(1, profiled):
        trainer.train_step(step)
    trace, wall_s = step_profile(trainer, profiled, args.out)
    if trainer.rank != 0:
        dist.barrier()
        return
    rows, busy = summarise(trace, wall_s)
    cfg = trainer.cfg
    tokens = trainer.dims.dp * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
    tflops = tokens * trainer.flops_per_token / wall_s / trainer.world_size / 1e12
    peak = device_peak_tflops(trainer.device)
    if busy is not None:
        rows.append(["GPU busy (any kernel)", f"{busy:,.1f}", f"{100 * busy / (wall_s * 1e3):.1f}"])
    rows.append(["step (wall)", f"{wall_s * 1e3:,.1f}", "100.0"])
    table = markdown_table(["category", "ms (rank 0)", "% of step"], rows)
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "- (no peak known for this device)"
    summary = f"{tflops:.1f} TFLOP/s/GPU of model FLOPs, MFU {mfu}; {tokens:,} tokens in the step"
    print(table, summary, f"traces: {args.out}", sep="\n", flush=True)
    if args.record:
        what = (
            f"One profiled training step (step {profiled} after {args.warmup} warmup steps) of "
            f"`{args.config}` with {' '.join(args.overrides) or 'no overrides'}: device kernel time by "
            f"category (streams overlap, so categories may sum above the wall time), rank 0. {summary}."
        )
        append_record("Profile of one training step", what, table, trainer.world_size)
    dist.barrier()


if __name__ == "__main__":
    main()
