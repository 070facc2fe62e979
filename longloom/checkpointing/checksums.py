"""Per-tensor checksums of checkpoint files: recorded when a file is written, verified when it is read.

The commit marker records, for every data file, its size and the XXH3-64 checksum (xxHash, the
`xxhash` package) of its safetensors header and of every tensor's bytes. A file whose bytes
changed after it was written (a bad disk, a copy that went wrong, a stray write) then fails
verification naming the tensor and the file, instead of loading as NaN weights.

XXH3 hashes about 17 GB/s on one CPU core and the `xxhash` package releases the GIL while it
hashes a buffer, so the checkpointer hashes in its background flush, off the training thread:
each write thread hashes a piece of a tensor right before writing it, while the piece is in the
CPU cache (tensor_file.write_tensor_file), so the bytes are read from memory once. Verification memory-maps the file and hashes every tensor's byte
range on a thread pool; a split of the work over ranks (`items`) lets a resuming job read each
byte once.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_64"
VERIFY_THREADS = 4


def checksum(data) -> str:
    """XXH3-64 of a bytes-like object (bytes, memoryview, numpy array), as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def hasher():
    """A streaming XXH3-64: `update(piece)` for each piece in order, then `hexdigest()` == checksum(all)."""
    return xxhash.xxh3_64()


def file_record(nbytes: int, header: bytes, tensors: dict[str, str]) -> dict:
    """What the commit marker stores for one data file."""
    return {
        "bytes": int(nbytes),
        "checksums": {
            "algorithm": ALGORITHM,
            "header": checksum(header),
            "tensors": dict(sorted(tensors.items())),
        },
    }


@dataclass(frozen=True)
class Corruption:
    """One verification failure: a tensor (or, tensor None, the file's header) whose bytes changed."""

    file: str
    tensor: str | None
    reason: str

    def __str__(self) -> str:
        what = f"tensor {self.tensor!r} in {self.file}" if self.tensor else f"file {self.file}"
        return f"{what}: {self.reason}"


def verification_items(files: dict[str, dict]) -> list[tuple[str, str | None]]:
    """Every (file, tensor) pair a marker's `files` records a checksum for; tensor None = the header."""
    items = []
    for name, record in sorted(files.items()):
        sums = record.get("checksums")
        if sums:
            items.append((name, None))
            items += [(name, key) for key in sums["tensors"]]
    return items


def has_checksums(files: dict[str, dict]) -> bool:
    return bool(files) and all(record.get("checksums") for record in files.values())


def _verify_file(path: Path, name: str, record: dict, keys: list[str | None]) -> list[Corruption]:
    sums = record["checksums"]
    if sums.get("algorithm") != ALGORITHM:
        return [Corruption(name, None, f"checksum algorithm {sums.get('algorithm')!r} is not {ALGORITHM}")]
    problems = []
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            return [Corruption(name, None, f"{size} bytes: too short for a safetensors file")]
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                (header_length,) = struct.unpack("<Q", view[:8])
                if 8 + header_length > size:
                    return [Corruption(name, None, f"header of {header_length} bytes in a {size}-byte file")]
                header = view[: 8 + header_length]
                if None in keys and checksum(header) != sums["header"]:
                    problems.append(
                        Corruption(name, None, "its safetensors header changed after it was written")
                    )
                    return problems  # offsets from a damaged header cannot be trusted
                try:
                    offsets = {
                        k: v["data_offsets"]
                        for k, v in json.loads(bytes(header[8:])).items()
                        if k != "__metadata__"
                    }
                except (ValueError, KeyError, TypeError) as error:
                    return [Corruption(name, None, f"unreadable safetensors header ({error})")]
                data = view[8 + header_length :]
                for key in keys:
                    if key is None:
                        continue
                    if key not in offsets:
                        problems.append(Corruption(name, key, "missing from the file"))
                        continue
                    begin, end = offsets[key]
                    if not 0 <= begin <= end <= len(data):
                        problems.append(
                            Corruption(name, key, f"byte range [{begin}, {end}) outside the file")
                        )
                        continue
                    found = checksum(data[begin:end])
                    if found != sums["tensors"][key]:
                        problems.append(
                            Corruption(
                                name,
                                key,
                                f"checksum {found} but the commit recorded {sums['tensors'][key]} "
                                "(its bytes changed after the checkpoint was written)",
                            )
                        )
                del data, header
            finally:
                view.release()
    return problems


def verify_files(
    directory: Path, files: dict[str, dict], items: Iterable[tuple[str, str | None]] | None = None
) -> list[Corruption]:
    """Checks the recorded checksums of `items` (default: all) of the files under `directory`.

    Files without recorded checksums (written before checksums existed) are not checked.
    """
    by_file: dict[str, list[str | None]] = {}
    for name, key in verification_items(files) if items is None else items:
        by_file.setdefault(name, []).append(key)

    def one(name: str) -> list[Corruption]:
        path = Path(directory) / name
        try:
            return _verify_file(path, name, files[name], by_file[name])
        except OSError as error:
            return [Corruption(name, None, f"cannot be read ({error})")]

    with ThreadPoolExecutor(max_workers=max(1, min(VERIFY_THREADS, len(by_file)))) as pool:
        return [problem for found in pool.map(one, sorted(by_file)) for problem in found]
