"""Offload on one GPU: activation offload (memory, step time) and optimizer offload (step time).

    python bench/offload.py [--record]                      # ~4-5 minutes on one H100 / H200
    python bench/offload.py --preset tiny                   # CPU smoke run (timings meaningless)

Activations: a Llama-3-8B-width decoder (hidden 4096, 32 heads, 8 KV heads, SwiGLU 14336; --layers 4
by default, vocab 512 so that the LM head does not hide the layers) in bf16, every layer checkpointed,
one sequence of 32K / 64K / 128K tokens (--seqs), forward + backward (no optimizer). Modes: off
(torch checkpoint), on (offload.activations=true: every layer input but the last one's goes to
pinned host memory, with every token's attention output, so backward recomputes no attention), 0.5
(the input and the last half of the tokens' attention outputs: backward recomputes attention for the
first half of the queries, a quarter of the full cost). Columns: median step time and overhead vs
off; peak GPU memory; "saved for backward" = GPU memory held between forward and backward (layer
inputs, cos/sin, the loss's per-token log-sum-exp); "removed" = the part of the checkpointed layer inputs (layers x tokens x
hidden x 2 bytes) no longer on the GPU; the pinned host pool. With L layers at most (L - 1) / L of
the inputs can leave the GPU (the last layer keeps its input: its backward comes first).
Longest sequence that fits: peak memory is linear in the sequence (flash attention, checkpointed
layers), so with two or more measured lengths per mode the table adds the length at which the fitted
line reaches the GPU's memory (predicted, not run: one 8-layer step at 512K already takes minutes).
At long sequences use `--modes off,on --iters 1 --act-warmup 0` (one step each) to keep it affordable.

Optimizer: a 1.1B Llama (hidden 2048, 20 layers, 16 heads, 8 KV heads, SwiGLU 5632, vocab 32000) under
DeepSpeed as the trainer builds it (bf16, ZeRO-1 on one rank), sequence 2048. Modes: Adam states on
the GPU (torch AdamW in DeepSpeed), cpu (ZeRO-Offload, DeepSpeed CPU Adam), interleaved (GPU share from
the measured performance model, capped by the memory estimate), interleaved at a fixed GPU share of
0.5 (what a GPU that holds only half of the moments gets). Columns: median full step and optimizer
step (engine.step), peak GPU memory. Each case runs in a process of its own (an engine leaves GPU
memory allocated after destroy(), which would count in the next case's peak). CPU Adam compiles a C++ op on first use (about a minute, cached).

Targets (issue 6): activations <= 5% step-time overhead while removing >= 80% of the checkpointed
activation memory; interleaved >= 1.5x faster than cpu.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/offload.py` finds longloom

import argparse
import gc
import json
import logging
import statistics
import subprocess
import time
import traceback

import torch

from bench.common import append_record, markdown_table
from longloom.config import load_config
from longloom.launch.env import device_for_rank, init_distributed
from longloom.models.llama import LlamaModel, plain_checkpoint
from longloom.offload.activations import ActivationOffloader
from longloom.offload.optimizer import build_optimizer
from longloom.parallel import ParallelDims
from longloom.training.plan import build_run_plan
from longloom.training.trainer import deepspeed_config, resolve_dtype

GIB = 1 << 30
PRESETS = {
    "full": {
        "activation_model": ["model.vocab_size=512", "model.hidden=4096", "model.heads=32", "model.kv_heads=8",
                             "model.intermediate=14336"],
        "seqs": [32768, 65536, 131072],
        "optimizer_model": ["model.vocab_size=32000", "model.hidden=2048", "model.layers=20", "model.heads=16",
                            "model.kv_heads=8", "model.intermediate=5632", "data.seq_len=2048"],
    },
    "tiny": {
        "activation_model": ["model.vocab_size=64", "model.hidden=64", "model.heads=4", "model.kv_heads=2"],
        "seqs": [256, 512],
        "optimizer_model": ["model.vocab_size=64", "model.hidden=64", "model.layers=2", "model.heads=4",
                            "model.kv_heads=2", "data.seq_len=128"],
    },
}  # fmt: skip
ACTIVATION_MODES = {"off": 0.0, "on": 1.0, "0.5": 0.5}
OPTIMIZER_MODES = {
    "GPU (no offload)": [],
    "cpu": ["offload.optimizer=cpu"],
    "interleaved (auto)": ["offload.optimizer=interleaved"],
    "interleaved (gpu_share 0.5)": ["offload.optimizer=interleaved", "offload.gpu_share=0.5"],
}
OPTIMIZER_MODE_NAMES = dict(zip(["gpu", "cpu", "auto", "half"], OPTIMIZER_MODES, strict=True))


def tokens_label(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def activation_case(args, dims: ParallelDims, device: torch.device, seq: int, mode: str) -> dict | None:
    """One (sequence, mode): median step time, peak memory, memory held between forward and backward."""
    try:
        return _measure_activations(args, dims, device, seq, mode)
    except torch.cuda.OutOfMemoryError as error:
        # Where it ran out and how much was reserved but free (fragmentation) decide what to change.
        frames = traceback.format_exception(error, limit=-8)
        print(f"OOM at {tokens_label(seq)} {mode}:", "".join(frames), file=sys.stderr, flush=True)
        return None
    finally:
        release()  # the model and the pinned pool of this case are gone once the call has returned


def _measure_activations(args, dims: ParallelDims, device: torch.device, seq: int, mode: str) -> dict:
    cfg = load_config(
        None, [*PRESETS[args.preset]["activation_model"], f"model.layers={args.layers}", *args.set]
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    share = ACTIVATION_MODES[mode]
    offloader = ActivationOffloader(share, device) if share > 0 else None
    torch.manual_seed(0)
    model = LlamaModel(cfg.model, dims, offloader.checkpoint if offloader else plain_checkpoint)
    model = model.to(device=device, dtype=dtype).train()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0)
    held: list[int] = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        before = allocated()
        # The training path: the fused LM head + loss (no [tokens, vocab] logits), as the trainer runs it.
        loss, _ = model(tokens[:, :-1], positions, labels=tokens[:, 1:])
        sync()
        held.append(allocated() - before)
        loss.backward()

    for _ in range(args.act_warmup):  # kernels, cuDNN plans, the pinned pool
        step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        sync()
        begin = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - begin)
    return {
        "seconds": statistics.median(times),
        "peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
        "held": held[-1],
        "inputs": cfg.model.layers * seq * cfg.model.hidden * dtype.itemsize,
        "pool": offloader.pool.total_bytes if offloader else 0,
    }


def predicted_longest(peaks: dict[int, int], capacity: int) -> int | None:
    """Sequence length where the least-squares line through (length, peak) reaches `capacity`."""
    if len(peaks) < 2:
        return None
    slope, intercept = statistics.linear_regression(list(peaks), list(peaks.values()))
    return int((capacity - intercept) / slope) if slope > 0 else None


def activation_table(args, dims: ParallelDims, device: torch.device) -> str:
    rows = []
    peaks: dict[str, dict[int, int]] = {mode: {} for mode in args.modes}
    for seq in args.seqs:
        results = {mode: activation_case(args, dims, device, seq, mode) for mode in args.modes}
        off = results.get("off")
        for mode, result in results.items():
            if result is None:
                rows.append([tokens_label(seq), mode, "OOM", "", "", "", "", ""])
                continue
            overhead = f"{100 * (result['seconds'] / off['seconds'] - 1):+.1f}%" if off else ""
            removed = f"{100 * (off['held'] - result['held']) / result['inputs']:.0f}%" if off else ""
            peaks[mode][seq] = result["peak"]
            rows.append([
                tokens_label(seq), mode, f"{result['seconds']:.3f} s", overhead, f"{result['peak'] / GIB:.2f} GiB",
                f"{result['held'] / GIB:.2f} GiB", removed, f"{result['pool'] / GIB:.2f} GiB",
            ])  # fmt: skip
            print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
    if device.type == "cuda":  # host memory on CPU would only swap, never run out
        capacity = torch.cuda.mem_get_info()[1]
        for mode, measured in peaks.items():
            longest = predicted_longest(measured, capacity)
            if longest is not None:
                points = ", ".join(tokens_label(seq) for seq in measured)
                label = f"longest that fits (predicted from the peaks at {points}): {longest / 1024:.0f}K"
                rows.append([label, mode, "", "", f"{capacity / GIB:.1f} GiB", "", "", ""])
    headers = [
        "tokens",
        "offload",
        "step",
        "vs off",
        "peak GPU",
        "saved for backward",
        "removed",
        "pinned pool",
    ]
    return markdown_table(headers, rows)


def optimizer_case(args, dims: ParallelDims, device: torch.device, overrides: list[str]) -> dict:
    import deepspeed

    cfg = load_config(None, [*PRESETS[args.preset]["optimizer_model"], "train.zero_stage=1", *overrides])
    dtype = resolve_dtype(cfg, device)
    torch.manual_seed(0)
    model = LlamaModel(cfg.model, dims)
    plan = build_run_plan(cfg, torch.distributed.get_world_size(), device)  # measures gpu_share=auto
    optimizer = build_optimizer(cfg, model.parameters(), gpu_share=plan.gpu_share)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        optimizer=optimizer,
        config=deepspeed_config(cfg, dtype),
        dist_init_required=False,
    )
    seq = cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0)
    steps, optimizer_steps = [], []
    for index in range(args.warmup + args.iters):
        sync()
        begin = time.perf_counter()
        loss, _ = engine(tokens[:, :-1], positions, labels=tokens[:, 1:])
        engine.backward(loss)
        sync()
        middle = time.perf_counter()
        engine.step()
        sync()
        end = time.perf_counter()
        if index == args.warmup - 1 and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if index >= args.warmup:
            steps.append(end - begin)
            optimizer_steps.append(end - middle)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    result = {
        "params": model.num_parameters(),
        "step": statistics.median(steps),
        "optimizer": statistics.median(optimizer_steps),
        "peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        "gpu_share": getattr(base, "gpu_share", None),
        "kind": type(base).__name__,
    }
    engine.destroy()
    del engine, model, optimizer, base
    release()
    return result


RESULT_PREFIX = "optimizer case result: "


def optimizer_case_in_own_process(args, mode: str) -> dict:
    """Runs one optimizer case (gpu, cpu, auto, half) in a fresh process: on the GPU a case's engine
    left memory allocated after engine.destroy() (10-14 GiB, BENCHMARKS.md), which inflated the next
    case's peak."""
    name = OPTIMIZER_MODE_NAMES[mode]
    command = [
        sys.executable, __file__, "--part", "optimizer", "--optimizer-case", mode, "--preset", args.preset,
        "--warmup", str(args.warmup), "--iters", str(args.iters),
    ]  # fmt: skip
    # A lone process with its own rendezvous: the parent's MASTER_PORT is taken by the parent.
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    print(f"optimizer case {name!r}: running in its own process", flush=True)
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"optimizer case {name!r} (exit {done.returncode}) printed no result; its output ends:\n"
        + "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    )


def optimizer_table(args, dims: ParallelDims, device: torch.device) -> str:
    rows, results = [], {}
    for mode in args.optimizer_modes:
        name = OPTIMIZER_MODE_NAMES[mode]
        results[name] = result = optimizer_case_in_own_process(args, mode)
        share = "" if result["gpu_share"] is None else f"{result['gpu_share']:.3f}"
        rows.append([
            name, result["kind"], share, f"{result['step']:.3f} s", f"{result['optimizer']:.3f} s",
            f"{results['cpu']['step'] / result['step']:.2f}x" if "cpu" in results else "",
            f"{result['peak'] / GIB:.2f} GiB",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    if "cpu" in results:
        for row, result in zip(rows, results.values()):  # speed-up vs cpu, now that cpu is known
            row[5] = f"{results['cpu']['step'] / result['step']:.2f}x"
    print(f"model: {next(iter(results.values()))['params'] / 1e9:.2f}B parameters", flush=True)
    headers = [
        "optimizer states",
        "optimizer",
        "GPU share",
        "step",
        "engine.step",
        "speed-up vs cpu",
        "peak GPU",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--part", choices=["both", "activations", "optimizer"], default="both")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the activation model")
    parser.add_argument("--seqs", type=lambda text: [int(v) for v in text.split(",")], default=None)
    parser.add_argument("--iters", type=int, default=2, help="timed steps per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer part: untimed steps first")
    parser.add_argument(
        "--modes", type=lambda text: text.split(","), default=list(ACTIVATION_MODES), help="e.g. off,on"
    )
    parser.add_argument(
        "--optimizer-modes",
        type=lambda text: text.split(","),
        default=list(OPTIMIZER_MODE_NAMES),
        help="optimizer cases in this order, from gpu,cpu,auto,half; each runs in a process of its own",
    )
    parser.add_argument("--optimizer-case", choices=sorted(OPTIMIZER_MODE_NAMES), help=argparse.SUPPRESS)
    parser.add_argument("--act-warmup", type=int, default=1, help="activation part: untimed steps first")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="activation model overrides, e.g. model.vocab_size=128256",
    )
    parser.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    args = parser.parse_args()
    args.seqs = args.seqs or PRESETS[args.preset]["seqs"]
    unknown_optimizer = sorted(set(args.optimizer_modes) - set(OPTIMIZER_MODE_NAMES))
    if unknown_optimizer:
        parser.error(f"--optimizer-modes {','.join(unknown_optimizer)}: choose from gpu,cpu,auto,half")
    unknown = sorted(set(args.modes) - set(ACTIVATION_MODES))
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: not a mode; choose from {','.join(ACTIVATION_MODES)}")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    init_distributed()
    device = device_for_rank()
    dims = ParallelDims.build(dp=1, ulysses=1, ring=1)
    if args.optimizer_case:  # a child of optimizer_table: one case, the result as one line of JSON
        name = OPTIMIZER_MODE_NAMES[args.optimizer_case]
        result = optimizer_case(args, dims, device, OPTIMIZER_MODES[name])
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    started = time.perf_counter()

    def report(title: str, what: str, table: str) -> None:
        """Print, and record at once: a later part running out of time must not lose this one."""
        print(table, flush=True)
        if args.record:
            print(f"appended to {append_record(title, what, table, world_size=1)}", flush=True)

    if args.part in ("both", "activations"):
        report(
            "Activation offload, one GPU",
            (
                f"Llama-3-8B width ({args.layers} layers, hidden 4096, 32 heads, 8 KV heads, SwiGLU 14336), "
                f"bf16, one sequence, forward + backward with every layer checkpointed{' (' + ' '.join(args.set) + ')' if args.set else ''}; offload {', '.join(args.modes)} "
                f"(0.5 = the attention outputs of the last half of the tokens are swapped, the first half recomputed); {args.act_warmup} untimed + median of {args.iters} timed steps. "
                "'removed' = share of the checkpointed layer inputs no longer held on the GPU between forward "
                "and backward; at most (layers - 1) / layers, the last layer keeps its input."
            ),
            activation_table(args, dims, device),
        )
    if args.part in ("both", "optimizer"):
        report(
            "Optimizer offload, one GPU",
            (
                "1.1B Llama (hidden 2048, 20 layers), bf16, ZeRO-1 on one rank, sequence 2048: Adam states "
                "on the GPU, ZeRO-Offload (cpu), interleaved with the measured GPU share and at 0.5."
            ),
            optimizer_table(args, dims, device),
        )
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
