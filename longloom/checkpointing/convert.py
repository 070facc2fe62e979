"""`longloom ckpt inspect` and `longloom ckpt convert`: between our, DeepSpeed's and HF's formats.

Sources are detected from the folder: one of our checkpoints (`commit.json`; distributed or
universal layout; a `checkpoints/` root picks its newest committed step) or a DeepSpeed ZeRO 1/2/3
checkpoint written by `engine.save_checkpoint` (a tag folder, or its parent with `latest`).
Every source is read through the same interface (full shapes, and any flat range of any
parameter's fp32 / exp_avg / exp_avg_sq), so each target has one writer:

- `universal`: our consolidated layout, one full-shape tensor per parameter and state in
  safetensors shards plus `commit.json`; `LazyAsyncCheckpointer.load` reads it on any layout.
- `deepspeed-universal`: DeepSpeed's universal layout (deepspeed_universal.py), file for file what
  `ds_to_universal` writes and loadable with `"checkpoint": {"load_universal": true}`.
- `hf`: `model.safetensors` (sharded above 5 GB, with an index) and `config.json` of a Hugging
  Face `LlamaForCausalLM`, weights in the dtype the model trained in.

Conversions stream parameter by parameter on a thread pool: memory stays at about `workers`
parameters, and shard files are written in place (`os.pwrite`) as tensors are ready.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from longloom.checkpointing.commit import (
    COMMIT_FILE,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    checksums_recorded,
    describe_problems,
    read_commit,
    step_directories,
    verify_checkpoint,
)
from longloom.checkpointing.deepspeed_format import DeepSpeedCheckpointReader, is_deepspeed_checkpoint
from longloom.checkpointing.deepspeed_universal import write_deepspeed_universal
from longloom.checkpointing.engine_state import jsonable
from longloom.checkpointing.hf_export import parse_export_dtype, write_hf
from longloom.checkpointing.resume import find_latest_verified
from longloom.checkpointing.tensor_file import TensorFileLayout, dtype_name, write_sharded, write_tensor_file
from longloom.checkpointing.universal import CheckpointReader, build_commit, encode_extra

TARGETS = ("universal", "deepspeed-universal", "hf")
UNIVERSAL_SHARD_BYTES = 2 << 30


# --------------------------------------------------------------------------- sources
def open_source(path: str | Path):
    """A reader for the checkpoint at `path` (ours, our universal, or DeepSpeed ZeRO 1/2/3)."""
    path = Path(path)
    if (path / COMMIT_FILE).is_file() or path.name.startswith("step-"):
        return CheckpointReader(path)
    if is_deepspeed_checkpoint(path):
        return DeepSpeedCheckpointReader(path)
    if step_directories(path):
        latest = find_latest_verified(path)
        if latest is None:
            raise CheckpointError(f"{path} holds step-N folders but none is committed and intact")
        return CheckpointReader(latest)
    if (path / "zero" / "optimizer_state.pt").is_file():
        raise CheckpointError(
            f"{path} is a DeepSpeed universal checkpoint; convert from the ZeRO checkpoint it came from"
        )
    raise CheckpointError(
        f"cannot tell the format of {path}: expected a longloom checkpoint (commit.json), a checkpoints/ "
        "folder of step-N checkpoints, or a DeepSpeed checkpoint (*_optim_states.pt or a `latest` file)"
    )


# --------------------------------------------------------------------------- inspect
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


# --------------------------------------------------------------------------- convert
def _runner(workers: int, progress: bool, description: str) -> Callable:
    def run_parallel(fn: Callable, items: list) -> None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=description, unit="param")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(fn, item) for item in items]:
                future.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    return run_parallel


def _new_destination(dst: Path) -> tuple[Path, list[Path]]:
    """Checks `dst` can be created; returns (temporary sibling to write into, parents created for it)."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} is a file: choose a new folder")
    if dst.is_dir() and any(dst.iterdir()):
        raise CheckpointError(f"destination {dst} exists and is not empty: choose a new folder")
    created = []
    parent = dst.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(created):
            folder.mkdir()
        # A hidden sibling on the same filesystem: renamed to `dst` only once everything is written.
        tmp = dst.absolute().parent / f".{dst.name}.partial-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as error:
        _remove_created(created)
        raise CheckpointError(
            f"cannot write the converted checkpoint under {dst.absolute().parent} ({error.strerror or error}): "
            "choose a destination in a folder you can write to"
        ) from None
    return tmp, created


def _remove_created(folders: list[Path]) -> None:
    """Removes the (empty) parent folders this command created, deepest first; never anything else."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "universal",
    progress: bool = True,
    workers: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Converts the checkpoint at `src` (format auto-detected) into format `to` under `dst`.

    The output appears at `dst` complete or not at all: it is written into a hidden sibling
    folder that is renamed to `dst` at the end, and removed (with any parent folders the command
    created) when the conversion fails. Every tensor read from one of our checkpoints is checked
    against its recorded checksum.
    """
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r} is not one of {', '.join(TARGETS)}")
    if dtype is not None and to != "hf":
        raise CheckpointError(
            f"--dtype {dtype} applies to --to hf only: {to} stores fp32 masters and Adam moments"
        )
    out_dtype = parse_export_dtype(dtype) if dtype is not None else None
    dst = Path(dst)
    workers = workers or min(8, os.cpu_count() or 1)
    source = open_source(src)
    try:
        tmp, created = _new_destination(dst)
        try:
            run_parallel = _runner(workers, progress, f"{to} <- {Path(src).name}")
            if to == "universal":
                _write_universal(source, tmp, run_parallel)
            elif to == "deepspeed-universal":
                write_deepspeed_universal(source, tmp, run_parallel)
            else:
                write_hf(source, tmp, run_parallel, out_dtype)
            os.replace(tmp, dst)  # atomic; replaces an empty `dst` folder the user made
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_created(created)
            raise
    finally:
        source.close()
    if to == "deepspeed-universal":
        # DeepSpeed's load_checkpoint(load_universal=True) finds the tag through this file.
        atomic_write_text(dst.absolute().parent / "latest_universal", dst.name)
    return dst


def _write_universal(source, dst: Path, run_parallel) -> None:
    entries = [
        (f"{name}:{state}", torch.float32, spec.shape, name)
        for name, spec in source.specs.items()
        for state in source.states(name)
    ]

    def produce(name: str):
        return [(f"{name}:{state}", source.read_full(name, state)) for state in source.states(name)]

    names = ("universal.safetensors", "universal-{index:05d}-of-{count:05d}.safetensors")
    where, files = write_sharded(entries, UNIVERSAL_SHARD_BYTES, names, dst, produce, run_parallel)
    extras, tensors = [], {}
    meta_extras = getattr(source, "meta", {}).get("extras") or []
    for rank in range(len(meta_extras)):
        extras.append(
            {
                "file": "extras.safetensors",
                "value": encode_extra(source.extra(rank), f"rank{rank}/extra", tensors),
            }
        )
    if extras:
        layout = TensorFileLayout([(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()])
        pool = torch.empty(layout.data_bytes, dtype=torch.uint8)
        for key, tensor in tensors.items():
            layout.view(pool, key).copy_(tensor)
        files["extras.safetensors"] = write_tensor_file(dst / "extras.safetensors", layout, pool)
    pieces = {
        name: {
            state: [[where[f"{name}:{state}"], f"{name}:{state}", 0, spec.numel]]
            for state in source.states(name)
        }
        for name, spec in source.specs.items()
    }
    commit = build_commit(
        step=source.step,
        layout="universal",
        token=getattr(source, "meta", {}).get("token", "universal"),
        world_size=int(source.meta.get("world_size", 1)),
        files=files,
        specs=source.specs,
        pieces=pieces,
        optimizer={"step": int(source.optimizer_step), "param_groups": jsonable(source.param_groups)},
        lr_scheduler=jsonable(source.lr_scheduler) if source.lr_scheduler is not None else None,
        engine=jsonable(source.engine_counters),
        extras=extras,
        source={
            "converted_from": str(source.path),
            "layout": source.meta.get("layout"),
            **source.meta.get("source", {}),
        },
    )
    atomic_write_json(dst / COMMIT_FILE, commit)
