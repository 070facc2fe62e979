"""`longloom ckpt convert`: between our, DeepSpeed's and HF's formats (`ckpt inspect`: inspection.py).

Sources are detected from the folder: one of our checkpoints (`commit.json`; distributed or
universal layout; a `checkpoints/` root picks its newest step that verifies) or a DeepSpeed ZeRO 1/2/3
checkpoint written by `engine.save_checkpoint` (a tag folder, or its parent with `latest`).
Every source is read through the same interface (full shapes, and any flat range of any
parameter's fp32 / exp_avg / exp_avg_sq), so each target has one writer:

- `universal`: our consolidated layout, one full-shape tensor per parameter and state in
  safetensors shards plus `commit.json`; `LazyAsyncCheckpointer.load` reads it on any layout.
- `deepspeed-universal`: DeepSpeed's universal layout (deepspeed_universal.py), file for file what
  `ds_to_universal` writes and loadable with `"checkpoint": {"load_universal": true}`.
- `hf`: a Hugging Face model folder (hf_export.py): `model.safetensors` (sharded above 5 GB, with an
  index), `config.json` and tokenizer files; the folder's own architecture for `model.source: hf:`
  runs, `LlamaForCausalLM` for the native model; weights in the dtype the model trained in.

A Hugging Face model folder is a source too, for `universal` only (hf_import.py): the state of a
`model.source: hf:<folder>` run before its first step.

Conversions stream parameter by parameter on a thread pool: memory stays at about `workers`
parameters, and shard files are written in place (`os.pwrite`) as tensors are ready.
"""

from __future__ import annotations

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
    step_directories,
)
from longloom.checkpointing.deepspeed_format import DeepSpeedCheckpointReader, is_deepspeed_checkpoint
from longloom.checkpointing.deepspeed_universal import write_deepspeed_universal
from longloom.checkpointing.engine_state import jsonable
from longloom.checkpointing.inspection import format_inspection, inspect_checkpoint
from longloom.checkpointing.resume import find_latest_verified
from longloom.checkpointing.tensor_file import TensorFileLayout, write_sharded, write_tensor_file
from longloom.checkpointing.universal import CheckpointReader, build_commit, encode_extra
from longloom.conversion.hf_export import parse_export_dtype, write_hf
from longloom.conversion.hf_import import HFFolderReader, is_hf_model_folder

__all__ = ["convert_checkpoint", "format_inspection", "inspect_checkpoint", "open_source"]

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
        "folder of step-N checkpoints, a DeepSpeed checkpoint (*_optim_states.pt or a `latest` file), or "
        "(for --to universal) a Hugging Face model folder (config.json + safetensors)"
    )


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


def _check_destination(dst: Path) -> None:
    """Refuses, before any source is read, a destination that is a file, lies under a file, or holds files."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} is a file, a folder was expected: choose a new folder")
    for parent in dst.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(
                    f"destination {dst} lies under {parent}, which is a file, a folder was expected: "
                    "choose a new folder"
                )
            break
    if dst.is_dir() and any(dst.iterdir()):
        raise CheckpointError(f"destination {dst} exists and is not empty: choose a new folder")


def _new_destination(dst: Path) -> tuple[Path, list[Path]]:
    """Checks `dst` can be created; returns (temporary sibling to write into, parents created for it)."""
    _check_destination(dst)
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
    hf_folder: str | Path | None = None,
) -> Path:
    """Converts the checkpoint at `src` (format auto-detected) into format `to` under `dst`.

    The output appears at `dst` complete or not at all: it is written into a hidden sibling
    folder that is renamed to `dst` at the end, and removed (with any parent folders the command
    created) when the conversion fails. Every tensor read from one of our checkpoints is checked
    against its recorded checksum. `hf_folder` (--to hf): where the model folder of a `model.source:
    hf:` run is now, when it moved since training.
    """
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r} is not one of {', '.join(TARGETS)}")
    if dtype is not None and to != "hf":
        raise CheckpointError(
            f"--dtype {dtype} applies to --to hf only: {to} stores fp32 masters and Adam moments"
        )
    if hf_folder is not None and to != "hf":
        raise CheckpointError(
            f"--hf-folder applies to --to hf only (the model folder a run trained from), not {to}"
        )
    out_dtype = parse_export_dtype(dtype) if dtype is not None else None
    dst = Path(dst)
    workers = workers or min(8, os.cpu_count() or 1)
    _check_destination(dst)
    if is_hf_model_folder(Path(src)):
        if to != "universal":
            raise CheckpointError(
                f"{src} is a Hugging Face model folder: it converts --to universal only (the state before step 0 "
                f"of a run); to train from it, set model.source=hf:{src}"
            )
        source = HFFolderReader(src)
    else:
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
                write_hf(source, tmp, run_parallel, out_dtype, Path(hf_folder) if hf_folder else None)
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
