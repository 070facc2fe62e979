"""`longloom ckpt inspect`: what a checkpoint holds, and whether it is committed, intact and verified.

Reads our checkpoints (a step-N folder, a universal folder, or a checkpoints/ root whose every
committed step is verified), and DeepSpeed ZeRO checkpoints. Every recorded tensor checksum is
checked (checksums.py); `report["ok"]` is False when anything is not committed, damaged or fails a
checksum, naming the tensor and file, and the CLI then exits 2.
"""

from __future__ import annotations

import math
from pathlib import Path

from longloom.checkpointing.commit import (
    COMMIT_FILE,
    CheckpointError,
    checksums_recorded,
    describe_problems,
    read_commit,
    step_directories,
    verify_checkpoint,
)
from longloom.checkpointing.deepspeed_format import DeepSpeedCheckpointReader, is_deepspeed_checkpoint
from longloom.checkpointing.tensor_file import dtype_name


def shape_differences(
    saved: dict[str, tuple[int, ...]], ours: dict[str, tuple[int, ...]], ours_as: str
) -> list[str]:
    """Tensors whose shape differs between a checkpoint (`saved`) and a model (`ours`, called `ours_as`
    in the messages: "now", "in the architecture"), then those on one side only; for refusals that
    name what does not fit."""
    differences = [
        f"{name}: {list(saved[name])} in the checkpoint, {list(ours[name])} {ours_as}"
        for name in ours
        if name in saved and saved[name] != ours[name]
    ]
    differences += [f"{name}: not in the checkpoint" for name in ours if name not in saved]
    differences += [f"{name}: only in the checkpoint, not {ours_as}" for name in saved if name not in ours]
    return differences


def _inspect_root(path: Path) -> dict:
    steps = []
    for step, step_path in step_directories(path):
        entry = {"step": step, "path": str(step_path), "committed": (step_path / COMMIT_FILE).is_file()}
        if entry["committed"]:
            try:
                meta, problems = verify_checkpoint(step_path)
                entry["verified"] = not problems and checksums_recorded(meta)
                entry["error"] = describe_problems(step_path, problems) if problems else None
            except CheckpointError as error:
                entry.update(verified=False, error=str(error))
        steps.append(entry)
    usable = [s for s in steps if s["committed"] and not s.get("error")]
    damaged = [s for s in steps if s["committed"] and s.get("error")]
    return {
        "path": str(path),
        "format": "longloom-checkpoints-root",
        "steps": steps,
        "latest_committed": usable[0]["path"] if usable else None,
        "ok": bool(usable) and not damaged,
        "error": "; ".join(s["error"] for s in damaged) or (None if usable else "no committed checkpoint"),
    }


def inspect_checkpoint(path: str | Path) -> dict:
    """Step, layout, tensors, sizes, whether the checkpoint is committed, and its checksums verified.

    `report["ok"]` is False when the checkpoint (or, for a checkpoints/ root, any committed step)
    is not committed, damaged, or fails a checksum; `ckpt inspect` then exits 2. A folder that is
    no checkpoint at all raises CheckpointError.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file; a checkpoint is a folder (step-N/ or a DeepSpeed tag folder)"
        )
    # A step-N folder, or one holding rank files, is one of ours even without its marker (never committed).
    ours = (path / COMMIT_FILE).is_file() or path.name.startswith("step-") or any(path.glob("rank-*"))
    if not ours:
        if is_deepspeed_checkpoint(path):
            return _inspect_deepspeed(path)
        if step_directories(path):
            return _inspect_root(path)
        raise CheckpointError(
            f"{path} is not a checkpoint: no {COMMIT_FILE} (longloom), no step-N folders (a checkpoints/ folder), "
            "no *_optim_states.pt or `latest` file (DeepSpeed)"
        )
    report = {
        "path": str(path),
        "format": "longloom",
        "committed": (path / COMMIT_FILE).is_file(),
        "error": None,
        "corrupt": [],
    }
    try:
        meta, problems = verify_checkpoint(path)
        report["valid"] = not problems
        report["checksums"] = "verified" if checksums_recorded(meta) else "none recorded (format version 1)"
        if problems:
            report.update(
                corrupt=[{"file": p.file, "tensor": p.tensor, "reason": p.reason} for p in problems],
                checksums="MISMATCH",
                error=describe_problems(path, problems),
            )
    except CheckpointError as error:
        report.update(valid=False, error=str(error))
        try:
            meta = read_commit(path)
        except CheckpointError:
            files = sorted(p for p in path.iterdir() if p.is_file())
            report["files"] = {p.name: p.stat().st_size for p in files}
            # Ranks that published their manifest (rank-RRRRR-<token>.json) before the run stopped.
            report["finished_ranks"] = sorted(
                p.name.split("-")[1] for p in files if p.name.startswith("rank-") and p.suffix == ".json"
            )
            report["ok"] = False
            return report
    report["ok"] = report["valid"]
    params = [
        {"name": name, "shape": entry["shape"], "dtype": entry["dtype"], "numel": math.prod(entry["shape"])}
        for name, entry in meta["params"].items()
    ]
    report.update(
        step=meta["step"],
        layout=meta["layout"],
        world_size=meta["world_size"],
        zero_stage=meta.get("source", {}).get("zero_stage"),
        optimizer_step=meta["optimizer"].get("step"),
        lr=[group.get("lr") for group in meta["optimizer"].get("param_groups", [])],
        files={name: info["bytes"] for name, info in meta["files"].items()},
        total_bytes=sum(info["bytes"] for info in meta["files"].values()),
        num_params=len(params),
        numel=sum(p["numel"] for p in params),
        tensors=sum(len(pieces) for entry in meta["params"].values() for pieces in entry["pieces"].values()),
        states=sorted({state for entry in meta["params"].values() for state in entry["pieces"]}),
        params=params,
        extras_ranks=len(meta.get("extras") or []),
    )
    return report


def _inspect_deepspeed(path: Path) -> dict:
    reader = DeepSpeedCheckpointReader(path)
    files = sorted(p for p in reader.path.iterdir() if p.is_file())
    params = [
        {"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "numel": s.numel}
        for s in reader.specs.values()
    ]
    return {
        "path": str(reader.path),
        "format": "deepspeed",
        "committed": None,  # DeepSpeed writes no commit marker
        "valid": True,
        "ok": True,
        "checksums": "none (DeepSpeed records none)",
        "error": None,
        "step": reader.step,
        "layout": reader.meta["layout"],
        "world_size": reader.world_size,
        "zero_stage": reader.zero_stage,
        "optimizer_step": reader.optimizer_step,
        "lr": [group.get("lr") for group in reader.param_groups],
        "files": {p.name: p.stat().st_size for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
        "num_params": len(params),
        "numel": sum(p["numel"] for p in params),
        "tensors": sum(len(pieces) for entry in reader.pieces.values() for pieces in entry.values()),
        "states": ["exp_avg", "exp_avg_sq", "fp32"],
        "params": params,
    }


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return str(nbytes)


def format_inspection(report: dict, max_params: int = 20) -> str:
    """The report of inspect_checkpoint as text for a terminal."""
    if report["format"] == "longloom-checkpoints-root":
        lines = [
            f"{report['path']}: {len(report['steps'])} step folders, latest committed: {report['latest_committed']}"
        ]
        for step in report["steps"]:
            if not step["committed"]:
                status = "NOT committed (left by a run that stopped while writing it)"
            elif step.get("error"):
                status = f"CORRUPT: {step['error']}"
            else:
                status = (
                    "committed, checksums verified" if step.get("verified") else "committed, no checksums"
                )
            lines.append(f"  step {step['step']:>8}  {status}")
        return "\n".join(lines)
    status = {True: "committed", False: "NOT committed", None: "no commit marker (DeepSpeed)"}[
        report["committed"]
    ]
    if report.get("corrupt"):
        status += ", CORRUPT"
    elif not report.get("valid", True):
        status += ", INVALID"
    lines = [f"{report['path']}  [{report['format']}]  {status}"]
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
    if report.get("checksums"):
        lines.append(f"  checksums: {report['checksums']}")
    if "step" not in report:
        lines.append(
            f"  files present: {len(report.get('files', {}))}, ranks finished: {report.get('finished_ranks')}"
        )
        return "\n".join(lines)
    lines.append(
        f"  step {report['step']}  layout {report['layout']}  saved by {report['world_size']} ranks"
        f"  zero stage {report['zero_stage']}  optimizer step {report['optimizer_step']}  lr {report['lr']}"
    )
    lines.append(
        f"  {report['num_params']} parameters, {report['numel']:,} elements, {report['tensors']} stored tensors "
        f"({', '.join(report['states'])}), {len(report['files'])} files, {_size(report['total_bytes'])}"
    )
    for param in report["params"][:max_params]:
        lines.append(f"    {param['name']:<48} {tuple(param['shape'])!s:<18} {param['dtype']}")
    if len(report["params"]) > max_params:
        lines.append(f"    ... {len(report['params']) - max_params} more")
    return "\n".join(lines)
