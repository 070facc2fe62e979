"""Output folders that appear whole or not at all, and never at the cost of something we did not write.

`data prepare` writes into a fresh temporary sibling of the destination (`.NAME.tmp-XXXX`) and renames
it into place at the very end; on failure or Ctrl-C only that temporary folder is removed (and parent
folders this command created, while empty). Before any work the destination is checked:

- it may not be the source, lie inside it, or contain it (`prepare raw raw --overwrite` used to delete
  the source files);
- it must be missing, an empty folder, or, with `--overwrite`, a folder that `data prepare` wrote
  itself: an index.json of ours and files named as its shards, nothing else. The old folder is moved
  aside and only those files are deleted, after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from longloom.data.arrow import FORMAT, INDEX_FILE, SHARD_FILE_PATTERN

logger = logging.getLogger(__name__)


def _relation(destination: Path, source: Path) -> str | None:
    """How `destination` overlaps `source` (both resolved), or None when they are apart."""
    if destination == source:
        return "is the data source itself"
    if destination in source.parents:
        return "contains the data source"
    if source in destination.parents:
        return "is inside the data source"
    return None


def prepared_folder_files(folder: Path) -> list[str]:
    """The entries of a folder written by `data prepare`; ValueError when it is not one, or holds more.

    Ours: an index.json of our format (any version, even with damaged entries, so that --overwrite can
    replace a damaged or older folder) and files named as prepare names shards; anything else is not.
    """
    index_path = folder / INDEX_FILE
    try:
        index = json.loads(index_path.read_bytes())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(
            f"--overwrite replaces only a folder written by `longloom data prepare`, and {str(folder)!r} is not "
            f"one (no readable {INDEX_FILE} of format {FORMAT!r}). Nothing was changed: remove it yourself if "
            "it can go, or choose another output folder"
        )
    present = sorted(os.listdir(folder))
    foreign = [name for name in present if name != INDEX_FILE and not re.fullmatch(SHARD_FILE_PATTERN, name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output folder {str(folder)!r} was written by `longloom data prepare` but now also holds files it "
            f"did not write ({shown}); --overwrite would delete them. Nothing was changed: move them out, or "
            "choose another output folder"
        )
    return present


def check_output_folder(source: Path, destination: Path, overwrite: bool) -> None:
    """Refuses a destination that would replace or mix with anything not written by `data prepare`."""
    relation = _relation(destination.resolve(), source.resolve())
    if relation:
        suggestion = source.resolve().parent / f"{source.resolve().stem}-shards"
        raise ValueError(
            f"output folder {str(destination)!r} {relation} ({str(source)!r}): shards go to a folder of their "
            f"own, outside the source, so that no source file is replaced. Nothing was changed: choose another "
            f"output folder, e.g. {suggestion}"
        )
    if destination.is_symlink():
        raise ValueError(
            f"output folder {str(destination)!r} is a symbolic link: pass the folder it points to "
            f"({os.path.realpath(destination)}) or another folder"
        )
    if not destination.exists():
        return
    if not destination.is_dir():
        raise ValueError(
            f"output {str(destination)!r} is a file, not a folder: choose a folder name for the shards"
        )
    if not any(destination.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"output folder {str(destination)!r} already exists and is not empty: choose another folder, or "
            "pass --overwrite (overwrite=True) if it is an earlier `longloom data prepare` output to replace"
        )
    prepared_folder_files(destination)


def _make_parents(folder: Path) -> list[Path]:
    """Creates the missing folders of `folder`; returns those it created, outermost first."""
    missing = []
    probe = folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail with a confusing message
            raise ValueError(
                f"{str(probe)!r} is a broken symbolic link: fix it or choose another output folder"
            )
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"cannot create the output folder under {str(probe)!r}: it is a file, not a folder; choose another "
            "output folder"
        )
    created = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except OSError as error:
        _remove_if_empty(created)
        raise ValueError(
            f"cannot create the folder {str(error.filename or path)!r} ({error.strerror}): choose an output "
            "folder where you may write"
        ) from None
    return created


def _remove_if_empty(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break  # something else was put there meanwhile: it stays


def _move_into_place(staged: Path, destination: Path) -> None:
    """Renames `staged` to `destination`; an earlier prepared folder is replaced, nothing else is."""
    old_files = None
    if destination.is_dir() and any(destination.iterdir()):
        old_files = prepared_folder_files(destination)  # again: it may have changed during a long run
    if old_files is None:
        try:
            # rename(2) replaces a missing or empty folder atomically and fails for anything else.
            os.rename(staged, destination)
        except OSError as error:
            raise ValueError(
                f"cannot put the shards at {str(destination)!r} ({error.strerror}): something was created "
                "there meanwhile; nothing was changed"
            ) from None
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    os.rename(destination, aside)
    try:
        os.rename(staged, destination)
    except BaseException:
        os.rename(aside, destination)
        raise
    for name in old_files:
        (aside / name).unlink(missing_ok=True)
    try:
        aside.rmdir()
    except OSError:
        logger.warning("kept %s: files appeared in the old output folder while it was replaced", aside)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def staged_output_folder(destination: Path) -> Iterator[Path]:
    """Yields a fresh temporary sibling of `destination` that becomes `destination` when the block succeeds.

    Call `check_output_folder` first. On any failure only what this created is removed.
    """
    created = _make_parents(destination.parent)
    try:
        staged = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
        # mkdtemp makes the folder private (0700); the output should get what mkdir would give it.
        staged.chmod(0o777 & ~_umask())
    except OSError as error:
        _remove_if_empty(created)
        raise ValueError(
            f"cannot write in {str(destination.parent)!r} ({error.strerror}): choose an output folder where "
            "you may write"
        ) from None
    try:
        yield staged
        _move_into_place(staged, destination)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        _remove_if_empty(created)
        raise
