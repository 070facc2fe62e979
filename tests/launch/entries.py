"""A worker entry for the launcher tests of what the trainer has no knob for: a process that dies.

`counting_run_then_crash(cfg)` follows `run_training`'s contract: it initialises torch.distributed
from the launcher's environment, resumes from the newest committed checkpoint in
`<output_dir>/checkpoints`, raises at `debug.fail_at_step` on the last rank of the first attempt and
writes `<output_dir>/metrics.jsonl`. On the second attempt rank 0's process exits one step later
without a Python exception, as after an OOM kill or a segfault. Each step all-reduces
(rank + 1) * step, so the running total after step n is n (n + 1) / 2 * W (W + 1) / 2 only if every
rank took part in every step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from longloom.config import LongloomConfig
from longloom.launch.env import attempt_number, init_distributed


def expected_totals(steps: int, world_size: int) -> list[float]:
    """The running total after each step of an uninterrupted run."""
    ranks = world_size * (world_size + 1) / 2
    return [step * (step + 1) / 2 * ranks for step in range(1, steps + 1)]


def _newest_checkpoint(folder: Path) -> tuple[int, float]:
    committed = sorted(folder.glob("step-*.json"), key=lambda path: int(path.stem.split("-")[1]))
    if not committed:
        return 0, 0.0
    state = json.loads(committed[-1].read_text())
    return state["step"], state["total"]


def _commit(folder: Path, step: int, total: float) -> None:
    # Written aside and renamed: a worker killed mid-write leaves the previous step as the newest.
    partial = folder / f".step-{step}.json.partial"
    partial.write_text(json.dumps({"step": step, "total": total}))
    os.replace(partial, folder / f"step-{step}.json")


def counting_run_then_crash(cfg: LongloomConfig) -> dict:
    rank, world_size = init_distributed(timeout_s=cfg.launch.collective_timeout_s)
    attempt = attempt_number()
    output = Path(cfg.train.output_dir)
    checkpoints = output / "checkpoints"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
    # Rank 0 reads the checkpoint and broadcasts it, so every rank resumes from the same step.
    resume = torch.tensor(_newest_checkpoint(checkpoints) if rank == 0 else (0, 0.0), dtype=torch.float64)
    dist.broadcast(resume, src=0)
    start_step, total = int(resume[0]), float(resume[1])
    for step in range(start_step + 1, cfg.train.steps + 1):
        if cfg.debug.fail_at_step == step and attempt == 0 and rank == world_size - 1:
            raise RuntimeError(f"debug.fail_at_step={step}: injected failure on rank {rank}")
        crash_now = cfg.debug.fail_at_step is not None and step == cfg.debug.fail_at_step + 1
        if crash_now and attempt == 1 and rank == 0:
            os._exit(13)  # a process that dies without a Python exception (OOM kill, segfault)
        contribution = torch.tensor([float((rank + 1) * step)], dtype=torch.float64)
        dist.all_reduce(contribution)
        total += float(contribution)
        if rank == 0:
            print(f"counting step {step} total {total}", flush=True)
            with open(output / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps({"step": step, "loss": total, "attempt": attempt}) + "\n")
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                _commit(checkpoints, step, total)
    environments = [None] * world_size
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LONGLOOM_ATTEMPT")
    dist.all_gather_object(environments, {key: os.environ.get(key) for key in keys})
    dist.destroy_process_group()
    return {"total": total, "start_step": start_step, "attempt": attempt, "environments": environments}


def read_metrics(output_dir: str | Path) -> dict[int, dict]:
    """metrics.jsonl as {step: last record}: a step re-run after a restart replaces the earlier one."""
    records = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def config_mistake_on_last_rank(cfg: LongloomConfig) -> None:
    """A worker-side error that every start hits again (as a model that does not fit its checkpoint)."""
    rank, world_size = init_distributed(timeout_s=cfg.launch.collective_timeout_s)
    with open(Path(cfg.train.output_dir) / f"started-rank{rank}-attempt{attempt_number()}", "w"):
        pass
    if rank == world_size - 1:
        raise ValueError("model.hidden=64 does not match the checkpoint's 128: set model.hidden=128")
    dist.barrier()  # the peers wait here until the driver stops them
