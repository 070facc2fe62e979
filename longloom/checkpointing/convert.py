"""`longloom ckpt inspect` and `longloom ckpt convert`: between our, DeepSpeed's and HF's formats.

Sources are detected from the folder: one of our checkpoints (`commit.json`; distributed or
universal layout; a `checkpoints/` root picks its newest committed step) or a DeepSpeed ZeRO 1/2/3
checkpoint written by `engine.save_checkpoint` (a tag folder, or its parent with `latest`).
Every source is read through the same interface (full shapes, and any flat range of any
parameter's fp32 / exp_avg / exp_avg_sq), so each target has one writer:

- `universal`: our consolidated layout, one full-shape tensor per parameter and state in
  safetensors shards plus `commit.json`; `LazyAsyncCheckpointer.load` reads it on any layout.
- `deepspeed-universal`: DeepSpeed's universal layout (deepspeed_format.py), equal tensor for
  tensor to what `ds_to_universal` writes and loadable with `"checkpoint": {"load_universal": true}`.
- `hf`: `model.safetensors` (sharded above 5 GB, with an index) and `config.json` of a Hugging
  Face `LlamaForCausalLM`, weights in the dtype the model trained in.

Conversions stream parameter by parameter on a thread pool: memory stays at about `workers`
parameters, and shard files are written in place (`os.pwrite`) as tensors are ready.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from longloom.checkpointing.commit import (
    COMMIT_FILE,
    CheckpointError,
    atomic_write_json,
    find_latest_committed,
    read_commit,
    step_directories,
    validate_checkpoint,
)
from longloom.checkpointing.deepspeed_format import (
    DeepSpeedCheckpointReader,
    is_deepspeed_checkpoint,
    write_deepspeed_universal,
)
from longloom.checkpointing.engine_state import jsonable
from longloom.checkpointing.hf_export import write_hf
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
        latest = find_latest_committed(path)
        if latest is None:
            raise CheckpointError(f"{path} holds step-N folders but none is committed and intact")
        return CheckpointReader(latest)
    if (path / "zero" / "optimizer_state.pt").is_file():
        raise ValueError(
            f"{path} is a DeepSpeed universal checkpoint; convert from the ZeRO checkpoint it came from"
        )
    raise ValueError(
        f"cannot tell the format of {path}: expected a longloom checkpoint (commit.json), a checkpoints/ "
        "folder of step-N checkpoints, or a DeepSpeed checkpoint (*_optim_states.pt or a `latest` file)"
    )


# --------------------------------------------------------------------------- inspect
def inspect_checkpoint(path: str | Path) -> dict:
    """Step, layout, tensors, sizes and whether the checkpoint is committed (and intact)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if not (path / COMMIT_FILE).is_file() and not path.name.startswith("step-"):
        if is_deepspeed_checkpoint(path):
            return _inspect_deepspeed(path)
        if step_directories(path):
            latest = find_latest_committed(path)
            return {
                "path": str(path),
                "format": "longloom-checkpoints-root",
                "steps": [
                    {"step": step, "path": str(p), "committed": (p / COMMIT_FILE).is_file()}
                    for step, p in step_directories(path)
                ],
                "latest_committed": str(latest) if latest else None,
            }
    report = {
        "path": str(path),
        "format": "longloom",
        "committed": (path / COMMIT_FILE).is_file(),
        "error": None,
    }
    try:
        meta = validate_checkpoint(path)
        report["valid"] = True
    except CheckpointError as error:
        report.update(valid=False, error=str(error))
        try:
            meta = read_commit(path)
        except CheckpointError:
            files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
            report["files"] = {p.name: p.stat().st_size for p in files}
            report["finished_ranks"] = sorted(p.name.split("-")[1] for p in files if p.suffix == ".json")
            return report
    params = [
        {"name": name, "shape": entry["shape"], "dtype": entry["dtype"], "numel": math.prod(entry["shape"])}
        for name, entry in meta["params"].items()
    ]
    report.update(
        step=meta["step"],
        layout=meta["layout"],
        world_size=meta["world_size"],
        zero_stage=meta.get("source", {}).get("zero_stage"),
        optimizer_step=meta["optimizer"]["step"],
        lr=[group.get("lr") for group in meta["optimizer"]["param_groups"]],
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
        lines += [
            f"  step {s['step']:>8}  {'committed' if s['committed'] else 'NOT committed'}"
            for s in report["steps"]
        ]
        return "\n".join(lines)
    status = {True: "committed", False: "NOT committed", None: "no commit marker (DeepSpeed)"}[
        report["committed"]
    ]
    lines = [
        f"{report['path']}  [{report['format']}]  {status}{'' if report.get('valid', True) else ', INVALID'}"
    ]
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
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


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "universal",
    progress: bool = True,
    workers: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Converts the checkpoint at `src` (format auto-detected) into format `to` under `dst`."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not one of {', '.join(TARGETS)}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty: choose a new folder")
    dst.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, os.cpu_count() or 1)
    source = open_source(src)
    run_parallel = _runner(workers, progress, f"{to} <- {Path(src).name}")
    try:
        if to == "universal":
            _write_universal(source, dst, run_parallel)
        elif to == "deepspeed-universal":
            write_deepspeed_universal(source, dst, run_parallel)
        else:
            write_hf(source, dst, run_parallel, dtype)
    finally:
        source.close()
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
    where = write_sharded(entries, UNIVERSAL_SHARD_BYTES, names, dst, produce, run_parallel)
    extras, tensors = [], {}
    meta_extras = getattr(source, "meta", {}).get("extras") or []
    for rank in range(len(meta_extras)):
        extras.append(
            {
                "file": "extras.safetensors",
                "value": encode_extra(source.extra(rank), f"rank{rank}/extra", tensors),
            }
        )
    files = {}
    if extras:
        layout = TensorFileLayout([(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()])
        pool = torch.empty(layout.data_bytes, dtype=torch.uint8)
        for key, tensor in tensors.items():
            layout.view(pool, key).copy_(tensor)
        write_tensor_file(dst / "extras.safetensors", layout, pool)
        files["extras.safetensors"] = layout.file_bytes
    files.update({name: (dst / name).stat().st_size for name in set(where.values())})
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
