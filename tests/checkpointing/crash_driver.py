"""Crash-consistency driver: train with a checkpoint every step and SIGKILL at random moments.

Run as `python -m tests.checkpointing.crash_driver ROOT TRIALS SEED REPORT`. The driver imports
torch and DeepSpeed once, then forks one training child per trial (a fork skips the seconds of
imports); once the child has committed a new step, it is killed with SIGKILL after a random
delay (odd trials) or the moment a checkpoint is caught mid-flush (even trials). Every child first resumes from the newest committed checkpoint and checks that what it
loaded is exactly what was saved: the saving child stored a fingerprint of its full training
state (float64, position-weighted sums of fp32 masters and both Adam moments) in the extra of the
same checkpoint. A child that finds a mismatch or cannot load exits non-zero. Successive trials
use ZeRO stages 0-3 in turn, so every resume also changes the layout.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

VERIFY_FAILED = 3
_MODULES_USED_BY_INITIALIZE = (
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.bf16_optimizer",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # imports torch.compile machinery: seconds
    "longloom.checkpointing.lazy_async",
    "tests.checkpointing.toy",
)


def _fingerprint(engine) -> list[float]:
    import torch

    from longloom.checkpointing.engine_state import EngineState

    sums = {key: 0.0 for key in ("fp32", "exp_avg", "exp_avg_sq")}
    with torch.no_grad():
        held = EngineState(engine).held()
    for flat_range, views in held:
        weights = torch.arange(flat_range.start, flat_range.start + flat_range.numel, dtype=torch.float64) + 1
        offset = sum(ord(c) for c in flat_range.name)
        for key, view in views.items():
            sums[key] += float((view.detach().double() * (weights + offset)).sum())
    return [sums["fp32"], sums["exp_avg"], sums["exp_avg_sq"]]


def _child(root: Path, trial: int, ready_fd: int, report: Path) -> None:
    import torch
    import torch.distributed as dist

    from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer, find_latest_committed
    from tests.checkpointing.toy import batch

    torch.set_num_threads(1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    # A file store, not a TCP port: no port race with the other tests running on this machine.
    store = root.parent / f".store-{trial}-{os.getpid()}"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    engine = _big_engine(stage=trial % 4)
    checkpointer = LazyAsyncCheckpointer(root, keep=2, asynchronous=True)
    latest = find_latest_committed(root)
    start = 0
    outcome = {"trial": trial, "resumed_from": None}
    if latest is not None:
        extra = checkpointer.load(latest, engine)
        start = extra["step"]
        outcome.update(resumed_from=start, verified=_fingerprint(engine) == extra["fingerprint"])
        if not outcome["verified"]:
            outcome["expected"], outcome["got"] = extra["fingerprint"], _fingerprint(engine)
    with open(report, "a") as handle:
        handle.write(json.dumps(outcome) + "\n")
    if latest is not None and not outcome["verified"]:
        os._exit(VERIFY_FAILED)
    os.write(ready_fd, b"r")
    step = start
    while True:  # until killed
        step += 1
        loss = engine(batch(step))
        engine.backward(loss)
        checkpointer.wait_for_snapshot()
        engine.step()
        checkpointer.save(step=step, engine=engine, extra={"step": step, "fingerprint": _fingerprint(engine)})


def _big_engine(stage: int):
    """The toy model with a wider layer (~0.4M parameters): checkpoints take long enough to be hit."""
    import torch

    from tests.checkpointing import toy

    original = toy.ToyModel

    class WideToy(original):
        def __init__(self):
            super().__init__()
            self.wide = torch.nn.Linear(12, 30000, bias=False)

        def forward(self, tokens):
            hidden = self.embed(tokens)
            return super().forward(tokens) + self.wide(hidden).pow(2).mean() * 1e-3

    toy.ToyModel = WideToy
    try:
        return toy.build_engine(stage)
    finally:
        toy.ToyModel = original


def _wait_for_flush_in_progress(root: Path, since: float, timeout_s: float) -> bool:
    """True once a step folder holds a data file written after `since` but no commit marker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for step in root.glob("step-*"):
            try:
                fresh = any(f.stat().st_mtime >= since for f in step.glob("*.safetensors"))
            except FileNotFoundError:  # pruned while we looked
                continue
            if fresh and not (step / "commit.json").is_file():
                return True
        time.sleep(0.0005)
    return False


def _wait_for_new_commit(root: Path, previous: int | None, timeout_s: float) -> None:
    """Waits until the child has committed a step after the one it resumed from (progress per trial)."""
    from longloom.checkpointing.commit import find_latest_committed

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = find_latest_committed(root)
        if latest is not None and (previous is None or int(latest.name.split("-")[1]) > previous):
            return
        time.sleep(0.02)
    raise TimeoutError(f"no new committed checkpoint within {timeout_s} s")


def main(root: str, trials: int, seed: int, report: str) -> int:
    from deepspeed.accelerator import get_accelerator

    # Imported and JIT-loaded once here (seconds), so every forked child starts warm. (The toy engine
    # steps with torch's AdamW: no FusedAdam op to load.)
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()
    for module in _MODULES_USED_BY_INITIALIZE:
        importlib.import_module(module)
    from longloom.checkpointing.commit import find_latest_committed

    rng = random.Random(seed)
    root_path, report_path = Path(root), Path(report)
    kills = []
    for trial in range(trials + 1):
        latest = find_latest_committed(root_path)
        previous = int(latest.name.split("-")[1]) if latest is not None else None
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                _child(root_path, trial, write_fd, report_path)
            except BaseException:  # noqa: BLE001 - any failure to resume is a failed trial
                import traceback

                traceback.print_exc()
                os._exit(2)
            os._exit(0)
        os.close(write_fd)
        ready = os.read(read_fd, 1)
        os.close(read_fd)
        if not ready:  # the child died before training: it could not resume
            _, status = os.waitpid(pid, 0)
            print(
                f"trial {trial}: child exited with status {os.waitstatus_to_exitcode(status)}",
                file=sys.stderr,
            )
            return 1
        if trial == trials:  # the last child only verifies the final resume
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        _wait_for_new_commit(root_path, previous, timeout_s=120.0)
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        # Odd trials: kill at a random moment. Even trials: wait for a checkpoint caught in the
        # middle of its flush (a fresh data file exists, the marker does not) and kill right then.
        mid_write = trial % 2 == 0 and _wait_for_flush_in_progress(root_path, time.time() - 0.05, 10.0)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        partial = sorted(p.name for p in root_path.glob("step-*") if not (p / "commit.json").is_file())
        kills.append(
            {"trial": trial, "delay_s": round(delay, 3), "mid_write": mid_write, "uncommitted_dirs": partial}
        )
        if find_latest_committed(root_path) is None and trial > 0:
            print(f"trial {trial}: no committed checkpoint left after the kill", file=sys.stderr)
            return 1
    with open(report_path, "a") as handle:
        handle.write(json.dumps({"kills": kills}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
