"""Durable commit of a checkpoint directory, and finding the newest one that is complete.

A checkpoint `<root>/step-N/` counts only once its commit marker `commit.json` exists. The
marker is written last, after every data file is fsynced: to a temporary name, fsynced, renamed
over the final name (atomic on POSIX), and the directory fsynced so the rename itself survives a
power cut. A crash at any moment therefore leaves either the previous marker or the new one,
never a marker that points at unwritten data. The marker also holds the checkpoint's index
(which file holds which piece of which tensor, with file sizes), so validating a checkpoint is
one JSON read plus a `stat` and a header read per file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from longloom.checkpointing.tensor_file import fsync_directory, read_header

logger = logging.getLogger(__name__)

COMMIT_FILE = "commit.json"
FORMAT = "longloom-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: never committed, truncated, or not ours."""


def step_directory(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def atomic_write_json(path: Path, payload: dict) -> None:
    """tmp -> fsync -> rename -> fsync(dir): readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def read_commit(path: Path) -> dict:
    """The commit marker of checkpoint `path`; CheckpointError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    marker = path / COMMIT_FILE
    if not marker.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {COMMIT_FILE}: it was never committed (the run stopped while writing "
            "it); resume from an earlier step"
        )
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: commit marker {marker} is unreadable ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{marker} is not a longloom checkpoint marker (format={meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{marker} has format version {meta['version']}; this longloom reads up to {FORMAT_VERSION}: upgrade"
        )
    return meta


def validate_checkpoint(path: Path) -> dict:
    """read_commit plus: every data file exists, has the committed size and a readable header."""
    meta = read_commit(path)
    for name, info in meta["files"].items():
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: data file {name} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {size} bytes, the commit recorded {info['bytes']}"
            )
        if name.endswith(".safetensors"):
            try:
                read_header(file)
            except ValueError as error:
                raise CheckpointError(f"checkpoint {path} is corrupt: {error}") from None
    return meta


def step_directories(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def find_latest_committed(root: Path) -> Path | None:
    """The newest `step-N` under root that is committed and intact; None if there is none.

    Uncommitted or corrupt steps are skipped with a warning, so a crash (or a damaged file) in
    the newest checkpoint falls back to the previous committed one.
    """
    for _, path in step_directories(root):
        try:
            validate_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        return path
    return None


def prune(root: Path, keep: int, committed_step: int) -> list[Path]:
    """After committing `committed_step`: keep it and the newest `keep - 1` older committed steps.

    Also removes leftovers of crashed saves: uncommitted `step-N` directories older than the new
    commit and files in the new step's directory that its marker does not list. Directories of
    later steps are left alone (the marker of the step just written is the only one we trust to
    be the current run's).
    """
    removed = []
    kept = 0
    for step, path in step_directories(root):
        if step > committed_step:
            continue
        if step == committed_step:
            kept += 1
            listed = set(read_commit(path)["files"]) | {COMMIT_FILE}
            for child in path.iterdir():
                if child.name not in listed and child.is_file():
                    child.unlink(missing_ok=True)
            continue
        committed = (path / COMMIT_FILE).is_file()
        if committed and kept < keep:
            kept += 1
            continue
        # Un-commit first: a crash during the removal must not leave a marker over missing data.
        (path / COMMIT_FILE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        fsync_directory(Path(root))
    return removed
