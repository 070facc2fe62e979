"""Training metrics on rank 0: a console line, a progress bar on a terminal, TensorBoard, metrics.jsonl.

A run resumed at step N continues the same metrics.jsonl and TensorBoard folder: lines of steps after
N (logged by the run that wrote a newer checkpoint, or none, before it stopped) are dropped from
metrics.jsonl, and TensorBoard is told to purge them (SummaryWriter's purge_step), so every step appears
once.

Throughput: tokens/s counts the global batch (dp x micro x seq_len) per step; TFLOP/s per GPU uses the
model's training FLOPs per token; MFU divides by the device's dense bf16 peak where it is known.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longloom.runtime.page_locked import page_locked_bytes

logger = logging.getLogger("longloom")

# Dense bf16 peak TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def drop_steps_after(path: Path, step: int) -> None:
    """Removes the lines of `path` (metrics.jsonl) whose step is after `step`; atomic (tmp + rename)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            logged = json.loads(line).get("step")
        except (ValueError, AttributeError):
            logged = None  # a torn last line of a killed run: drop it too
        if isinstance(logged, int) and logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    logger.info(
        "metrics.jsonl: dropped %d lines after step %d (the run continues from there)",
        len(lines) - len(kept),
        step,
    )


class MetricsLogger:
    def __init__(
        self, output_dir: Path, enabled: bool, total_steps: int, start_step: int, device: torch.device
    ):
        self.enabled = enabled
        self.device = device
        self.peak = device_peak_tflops(device)
        self.jsonl = None
        self.writer = None
        self.progress = None
        self.last_time = time.perf_counter()
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        drop_steps_after(output_dir / "metrics.jsonl", start_step)
        self.jsonl = (output_dir / "metrics.jsonl").open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tb"), purge_step=start_step + 1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step_started(self) -> None:
        self.last_time = time.perf_counter()

    def log(
        self,
        step: int,
        values: dict[str, Any],
        tokens: int,
        flops_per_token: float,
        world_size: int,
        write: bool,
        excluded_s: float = 0.0,
    ) -> None:
        """Records one finished step; `tokens` is the global batch's token count. `excluded_s` (time spent
        on evaluation inside the step) is left out of the step time, so tokens/s stays training's."""
        elapsed = time.perf_counter() - self.last_time - excluded_s
        if not self.enabled:
            return
        tokens_per_s = tokens / max(elapsed, 1e-9)
        record: dict[str, Any] = {
            "step": step,
            **values,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
        }
        tflops = tokens_per_s * flops_per_token / world_size / 1e12
        record["tflops_per_gpu"] = tflops
        if self.peak:
            record["mfu"] = tflops / self.peak
        if self.device.type == "cuda":
            record["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            record["reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            # Pinned host memory: torch's caching host allocator (CPU Adam's buffers; torch >= 2.7) plus
            # the activation pool's own page-locked buffers (a figure, never a reason to stop training).
            try:
                host = torch.cuda.host_memory_stats()
            except (AttributeError, RuntimeError):
                host = {}
            torch_pinned = host.get("allocated_bytes.peak", 0)
            record["pinned_host_gb"] = (torch_pinned + page_locked_bytes()[1]) / 2**30
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if not write:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar("eval/loss" if key == "eval_loss" else f"train/{key}", value, step)
        line = f"step {step:>6} | loss {values['loss']:.4f} | grad_norm {values.get('grad_norm', float('nan')):.3f}"
        if "eval_loss" in values:
            line += f" | eval_loss {values['eval_loss']:.4f}"
        line += f" | lr {values.get('lr', 0):.2e} | {tokens_per_s:,.0f} tok/s | {tflops:.2f} TFLOP/s/GPU"
        if "mfu" in record:
            line += f" | MFU {record['mfu']:.1%}"
        if "memory_gb" in record:
            line += f" | mem {record['memory_gb']:.1f} GiB"
        if self.progress is not None:
            self.progress.write(line)
        else:
            logger.info(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
