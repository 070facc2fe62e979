"""The universal checkpoint format: per-parameter pieces plus metadata, loadable onto any layout.

Universal Checkpointing (Lian et al., 2024): save in whatever layout training used, but describe
every stored piece by (parameter, flat offset, length) next to each parameter's full shape and
dtype; a loader on any number of ranks, ZeRO stage or dp/sp split then reads, for each range it
needs, exactly the overlapping bytes of the pieces (safetensors `get_slice`, no whole-file reads).

One format serves two layouts, told apart by `layout` in the commit marker:

- "distributed" (what training writes): `rank-R-<token>.safetensors` per rank, each holding 1-D
  pieces of fp32 masters and Adam moments (`<name>:<state>:<start>`), plus per-rank extras.
- "universal" (`longloom ckpt convert --to universal`): one full-shape tensor per parameter and
  state (`<name>:<state>`), sharded over files; the same reader loads it.

`commit.json` (see commit.py) holds: step, layout, world_size, files with sizes and per-tensor
checksums (checksums.py; a read of a whole stored tensor checks it), per-parameter
shape/dtype/pieces, the optimizer step and param-group hyper-parameters, the LR scheduler state,
the engine counters and every rank's extras (JSON, tensors referenced by key). Loading never
unpickles anything: JSON and safetensors only.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from longloom.checkpointing.checksums import checksum
from longloom.checkpointing.commit import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    read_commit,
    safe_member,
    validate_checkpoint,
)
from longloom.checkpointing.engine_state import STATE_KEYS, EngineState, ParamSpec
from longloom.checkpointing.tensor_file import dtype_from_name, dtype_name, read_flat_range

TENSOR_REF = "__tensor__"


# --------------------------------------------------------------------------- extras
def encode_extra(value, prefix: str, tensors: dict[str, torch.Tensor], path: str = ""):
    """JSON tree of `value`; tensors are moved into `tensors` under `prefix + path` keys."""
    if torch.is_tensor(value):
        key = f"{prefix}{path}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {TENSOR_REF: key}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"checkpoint extra {path or '<root>'}: dict key {k!r} must be a str for JSON")
        return {k: encode_extra(v, prefix, tensors, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_extra(v, prefix, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(
        f"checkpoint extra {path or '<root>'} is a {type(value).__name__}; extras hold JSON values and "
        "torch tensors only (convert numpy arrays with torch.from_numpy)"
    )


def decode_extra(tree, get_tensor):
    if isinstance(tree, dict):
        if set(tree) == {TENSOR_REF}:
            return get_tensor(tree[TENSOR_REF])
        return {k: decode_extra(v, get_tensor) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_extra(v, get_tensor) for v in tree]
    return tree


# --------------------------------------------------------------------------- marker
def build_commit(
    *,
    step: int,
    layout: str,
    token: str,
    world_size: int,
    files: dict[str, dict],
    specs: dict[str, ParamSpec],
    pieces: dict[str, dict[str, list]],
    optimizer: dict,
    lr_scheduler: dict | None,
    engine: dict,
    extras: list,
    source: dict | None = None,
) -> dict:
    """The commit marker's content; `pieces[name][state]` = [[file, key, start, numel], ...].

    `files[name]` is the file's record (size and checksums) from tensor_file's writers.
    """
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "layout": layout,
        "token": token,
        "world_size": world_size,
        "files": dict(sorted(files.items())),
        "params": {
            name: {"shape": list(spec.shape), "dtype": dtype_name(spec.dtype), "pieces": pieces[name]}
            for name, spec in specs.items()
        },
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "engine": engine,
        "extras": extras,
        "source": source or {},
    }


# --------------------------------------------------------------------------- reader
class CheckpointReader:
    """Reads any flat range of any parameter state from one of our checkpoints (either layout).

    A read that covers a whole stored tensor (every read of a conversion, the extras) checks the
    tensor's recorded checksum and raises CheckpointError naming the tensor and file on a mismatch.
    Reads of part of a stored tensor (resume on another layout) cannot be checked one by one:
    resume verifies the whole checkpoint first (resume.find_latest_verified).
    """

    def __init__(self, path: str | Path, validate: bool = True):
        self.path = Path(path)
        self.meta = validate_checkpoint(self.path) if validate else read_commit(self.path)
        self.specs = {
            name: ParamSpec(name, tuple(entry["shape"]), dtype_from_name(entry["dtype"]))
            for name, entry in self.meta["params"].items()
        }
        self.pieces = {
            name: {
                state: sorted(pieces, key=lambda piece: piece[2]) for state, pieces in entry["pieces"].items()
            }
            for name, entry in self.meta["params"].items()
        }
        self.step: int = self.meta["step"]
        self.optimizer_step: int = self.meta["optimizer"]["step"]
        self.param_groups: list[dict] = self.meta["optimizer"]["param_groups"]
        self.lr_scheduler: dict | None = self.meta.get("lr_scheduler")
        self.engine_counters: dict = self.meta.get("engine", {})
        self._local = threading.local()

    def _handle(self, file: str):
        # safe_open handles are not shared between threads: the converter reads from a pool.
        handles = self._local.__dict__.setdefault("handles", {})
        if file not in handles:
            handles[file] = safe_open(
                str(safe_member(self.path, file, "a piece")), framework="pt", device="cpu"
            )
        return handles[file]

    def _checked(self, file: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, the whole stored tensor `key` of `file`, after checking its recorded checksum."""
        expected = self.meta["files"][file].get("checksums", {}).get("tensors", {}).get(key)
        if expected is not None:
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            found = checksum(memoryview(raw).cast("B"))
            if found != expected:
                raise CheckpointError(
                    f"checkpoint {self.path} is corrupt: tensor {key!r} in {file} has checksum {found}, the "
                    f"commit recorded {expected} (its bytes changed after the checkpoint was written)"
                )
        return tensor

    def states(self, name: str) -> list[str]:
        return [state for state in STATE_KEYS if state in self.pieces[name]]

    def read(self, name: str, state: str, start: int, numel: int) -> torch.Tensor:
        """fp32 elements [start, start + numel) of the flattened `state` of parameter `name`."""
        if name not in self.pieces or state not in self.pieces[name]:
            raise CheckpointError(f"checkpoint {self.path} holds no {state} for parameter {name}")
        out = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for file, key, piece_start, piece_numel in self.pieces[name][state]:
            a, b = max(start, piece_start), min(start + numel, piece_start + piece_numel)
            if a < b:
                try:
                    if (a, b) == (piece_start, piece_start + piece_numel):
                        piece = self._checked(
                            file, key, read_flat_range(self._handle(file), key, 0, piece_numel)
                        )
                    else:
                        piece = read_flat_range(self._handle(file), key, a - piece_start, b - a)
                    out[a - start : b - start] = piece
                except CheckpointError:
                    raise
                except (SafetensorError, OSError, RuntimeError, ValueError) as error:
                    raise CheckpointError(
                        f"checkpoint {self.path}: reading {key} from {file} failed: {error}"
                    ) from None
                covered += b - a
        if covered != numel:
            raise CheckpointError(
                f"checkpoint {self.path}: pieces of {name}/{state} cover {covered} of the {numel} elements "
                f"[{start}, {start + numel}): the index is inconsistent"
            )
        return out

    def read_full(self, name: str, state: str) -> torch.Tensor:
        spec = self.specs[name]
        return self.read(name, state, 0, spec.numel).view(spec.shape)

    def extra(self, rank: int) -> dict | None:
        """The extra dict saved by `rank` (by rank 0 when the checkpoint had fewer ranks)."""
        extras = self.meta.get("extras") or []
        if not extras:
            return None
        entry = extras[rank] if rank < len(extras) else extras[0]
        file = entry["file"]
        return decode_extra(
            entry["value"], lambda key: self._checked(file, key, self._handle(file).get_tensor(key))
        )

    def close(self) -> None:
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- load onto an engine
def _check_same_model(path: Path, ours: dict[str, ParamSpec], saved: dict[str, ParamSpec]) -> None:
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    wrong = [
        f"{n}: model {ours[n].shape} vs checkpoint {saved[n].shape}"
        for n in ours
        if n in saved and ours[n].shape != saved[n].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]} (was it written for another model.* configuration?)"
        )


def load_into_engine(path: str | Path, engine) -> dict | None:
    """Restores a checkpoint (any layout it was saved with) onto `engine`; returns this rank's extra.

    Collective: every rank calls it. Each rank reads only the ranges its ZeRO partition (or, in
    fp32 stage 0, its full replica) needs. Afterwards the engine's fp32 masters, model weights,
    Adam moments and step, param-group hyper-parameters, LR scheduler and step counters equal the
    saved ones.
    """
    with CheckpointReader(path) as reader:
        state = EngineState(engine)
        _check_same_model(reader.path, state.specs(), reader.specs)
        state.load(reader.read, reader.optimizer_step, reader.param_groups)
        if engine.lr_scheduler is not None and reader.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(dict(reader.lr_scheduler))
        counters = reader.engine_counters
        engine.global_steps = counters.get("global_steps", reader.step)
        engine.global_samples = counters.get(
            "global_samples", engine.global_steps * engine.train_batch_size()
        )
        engine.skipped_steps = counters.get("skipped_steps", 0)
        # Micro-steps restart on a step boundary under the new gradient-accumulation setting.
        engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
        return reader.extra(state.rank)
