"""Durable commit of a checkpoint directory, and finding the newest one that is complete.

A checkpoint `<root>/step-N/` counts only once its commit marker `commit.json` exists. The
marker is written last, after every data file is fsynced: to a temporary name, fsynced, renamed
over the final name (atomic on POSIX), and the directory fsynced so the rename itself survives a
power cut. A crash at any moment therefore leaves either the previous marker or the new one,
never a marker that points at unwritten data. The marker also holds the checkpoint's index
(which file holds which piece of which tensor, with file sizes and, from format version 2, a
checksum of every tensor's bytes: checksums.py). Validating a checkpoint's structure is one JSON
read plus a `stat` and a header read per file; verifying it (`verify_checkpoint`) also hashes
every byte, and is what resume, `ckpt inspect` and `ckpt convert` do.

Every file name a marker records is a plain name inside the checkpoint folder: a marker naming
`../x` or `/etc/x` is refused, so a checkpoint never leads a reader outside itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from longloom.checkpointing.checksums import Corruption, has_checksums, verify_files
from longloom.checkpointing.tensor_file import fsync_directory, read_header
from longloom.config import ConfigError

logger = logging.getLogger(__name__)

COMMIT_FILE = "commit.json"
FORMAT = "longloom-checkpoint"
# 2: files carry per-tensor checksums. Version 1 checkpoints load, without checksums to verify.
FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys every marker has, with their JSON types.
_MARKER_FIELDS = {
    "step": int,
    "layout": str,
    "world_size": int,
    "files": dict,
    "params": dict,
    "optimizer": dict,
}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded: never committed, truncated, corrupt, or not ours."""


def safe_member(folder: Path, name: object, what: str) -> Path:
    """`folder / name` for a name recorded in a checkpoint; refuses names that lead outside `folder`."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CheckpointError(
            f"{what} names {name!r}, which is not a plain file name inside {folder}: refusing to follow it "
            "(a checkpoint only refers to files in its own folder; was it edited or crafted?)"
        )
    return Path(folder) / name


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


def atomic_write_text(path: Path, text: str) -> None:
    """Like atomic_write_json, for a text file (config.yaml, DeepSpeed's `latest_universal`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {path}: commit marker {marker} is unreadable ({error}); it is truncated or damaged: "
            "resume from an earlier step"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{marker} is not a longloom checkpoint marker (format={found!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{marker} has format version {version!r}; this longloom reads up to {FORMAT_VERSION}: upgrade"
        )
    wrong = [key for key, kind in _MARKER_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise CheckpointError(f"{marker} is damaged: fields {wrong} are missing or have the wrong type")
    for name, record in meta["files"].items():
        safe_member(path, name, f"{marker} (files)")
        if not isinstance(record, dict) or not isinstance(record.get("bytes"), int):
            raise CheckpointError(f"{marker} is damaged: the record of file {name} has no byte count")
    for name, entry in meta["params"].items():
        pieces = entry.get("pieces") if isinstance(entry, dict) else None
        if not isinstance(pieces, dict) or not isinstance(entry.get("shape"), list) or "dtype" not in entry:
            raise CheckpointError(f"{marker} is damaged: parameter {name} lacks its shape, dtype or pieces")
        for state, listed in pieces.items():
            for piece in listed:
                if not isinstance(piece, list) or len(piece) != 4 or piece[0] not in meta["files"]:
                    raise CheckpointError(
                        f"{marker} is damaged: a piece of {name}/{state} ({piece!r}) names no file the marker lists"
                    )
    for extra in meta.get("extras") or []:
        if not isinstance(extra, dict) or extra.get("file") not in meta["files"]:
            raise CheckpointError(f"{marker} is damaged: an extras entry names no file the marker lists")
    return meta


def validate_checkpoint(path: Path) -> dict:
    """read_commit plus: every data file exists, has the committed size and a readable header."""
    meta = read_commit(path)
    for name, info in meta["files"].items():
        file = safe_member(Path(path), name, f"{path / COMMIT_FILE}")
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


def verify_checkpoint(path: Path, items=None) -> tuple[dict, list[Corruption]]:
    """validate_checkpoint plus the checksum of every tensor (or of `items`, this rank's share).

    Returns (marker, problems); problems is empty when every checksum matches. Raises
    CheckpointError when the checkpoint is structurally broken (no marker, wrong sizes).
    """
    meta = validate_checkpoint(path)
    return meta, verify_files(Path(path), meta["files"], items)


def describe_problems(path: Path, problems: list[Corruption], limit: int = 5) -> str:
    shown = "; ".join(str(problem) for problem in problems[:limit])
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return f"checkpoint {path} is corrupt: {shown}{more}"


def checksums_recorded(meta: dict) -> bool:
    """False for checkpoints written before checksums existed (format version 1)."""
    return has_checksums(meta["files"])


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


def prune(root: Path, keep: int, committed_step: int, protect: Path | None = None) -> list[Path]:
    """After committing `committed_step`: keep it and the newest `keep - 1` older intact steps.

    Also removes leftovers of crashed saves: uncommitted or broken `step-N` directories older than
    the new commit (they do not count towards `keep`) and files in the new step's directory that
    its marker does not list. Directories of later steps are left alone (the marker of the step
    just written is the only one we trust to be the current run's). `protect` (the checkpoint
    this run resumed from, verified when it was loaded) is never removed.
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
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        try:
            validate_checkpoint(path)
            intact = True
        except CheckpointError:
            intact = False
        if intact and kept < keep:
            kept += 1
            continue
        # Un-commit first: a crash during the removal must not leave a marker over missing data.
        (path / COMMIT_FILE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        fsync_directory(Path(root))
    return removed
