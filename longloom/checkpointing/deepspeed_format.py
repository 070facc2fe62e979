"""DeepSpeed's ZeRO 1/2/3 checkpoints, read as flat ranges of full parameters.

Reading (`DeepSpeedCheckpointReader`): a checkpoint written by `engine.save_checkpoint` holds one
`*_optim_states.pt` per ZeRO rank with that rank's flat fp32 partition and Adam moments, and a
model-states file with the parameter shapes. ZeRO-1/2 record where each parameter's fragment
sits in the flat partition (`param_slice_mappings`); ZeRO-3 pads every parameter to a multiple of
the rank count and gives rank r the slice [r * ceil(n / R), ...). Either way each fragment is a
flat range of a parameter, which is all our universal reader interface needs, so the converters
treat a DeepSpeed checkpoint like one of ours. Files are opened with `torch.load(weights_only=True,
mmap=True)` (DeepSpeed's three small helper classes allow-listed): nothing executes, and a
converter touches only the pages of the fragments it reads.

Writing DeepSpeed's universal layout: deepspeed_universal.py.
"""

from __future__ import annotations

import glob
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from longloom.checkpointing.commit import CheckpointError, safe_member
from longloom.checkpointing.engine_state import STATE_KEYS, ParamSpec

_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: Path, required: tuple[str, ...] = ()) -> dict:
    """torch.load of a DeepSpeed checkpoint file without executing pickled code (weights_only).

    A file that is not a torch checkpoint (garbage bytes, a pickle of something else, a dict
    without the `required` keys) raises CheckpointError naming the file.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable DeepSpeed checkpoint file ({type(error).__name__}: {reason[:300]}); "
            "it is damaged or was not written by DeepSpeed's engine.save_checkpoint"
        ) from None
    missing = [key for key in required if not isinstance(value, dict) or key not in value]
    if missing:
        found = sorted(map(str, value))[:8] if isinstance(value, dict) else type(value).__name__
        raise CheckpointError(
            f"{path} is not a DeepSpeed checkpoint file: it lacks {missing} (found {found}); it was not written by "
            "DeepSpeed's engine.save_checkpoint"
        )
    return value


def resolve_latest(path: Path) -> Path:
    """The tag folder a DeepSpeed `latest` file names; refuses tags that lead outside `path`."""
    tag = (path / "latest").read_text().strip()
    return safe_member(path, tag, f"{path / 'latest'}")


def is_deepspeed_checkpoint(path: Path) -> bool:
    path = Path(path)
    return bool(glob.glob(str(path / "*_optim_states.pt"))) or (path / "latest").is_file()


class DeepSpeedCheckpointReader:
    """A DeepSpeed ZeRO 1/2/3 checkpoint (one tag folder) seen as flat ranges of full parameters."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not glob.glob(str(path / "*_optim_states.pt")) and (path / "latest").is_file():
            path = resolve_latest(path)
        files = {}
        for file in glob.glob(str(path / "*_optim_states.pt")):
            match = _RANK_FILE.search(file)
            if match and int(match.group(2)) == 0:
                files[int(match.group(1))] = Path(file)
        if not files:
            raise CheckpointError(
                f"{path} holds no DeepSpeed ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt)"
            )
        if int(max(files)) + 1 != len(files):
            raise CheckpointError(
                f"{path}: ZeRO rank files {sorted(files)} are not 0..{len(files) - 1}; checkpoint incomplete"
            )
        if any(
            int(m.group(2)) > 0
            for m in map(_RANK_FILE.search, glob.glob(str(path / "*_optim_states.pt")))
            if m
        ):
            raise CheckpointError(
                f"{path} was written with tensor/pipeline parallelism (mp_rank > 0), which is not supported"
            )
        self.path = path
        self.rank_files = [files[r] for r in range(len(files))]
        self.world_size = len(files)
        self._loaded: dict[int, dict] = {}
        self._lock = threading.Lock()
        first = self._optim(0)
        if not isinstance(first, dict):
            raise CheckpointError(
                f"{self.rank_files[0]}: optimizer_state_dict is a {type(first).__name__}, not a dict"
            )
        self.zero_stage = int(first.get("zero_stage", 1))
        model_file = path / (
            "zero_pp_rank_0_mp_rank_00_model_states.pt"
            if self.zero_stage == 3
            else "mp_rank_00_model_states.pt"
        )
        if not model_file.is_file():
            raise CheckpointError(
                f"{path}: model states file {model_file.name} is missing; checkpoint incomplete"
            )
        self.model_states = load_deepspeed_file(model_file, required=("param_shapes",))
        try:
            self._read_layout()
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise CheckpointError(
                f"{path}: the files do not have the layout of a DeepSpeed ZeRO 1/2/3 checkpoint "
                f"({type(error).__name__}: {error}); was it written by engine.save_checkpoint?"
            ) from None

    def _read_layout(self) -> None:
        module = self.model_states.get("module") or {}
        shapes = OrderedDict()
        for group in self.model_states["param_shapes"]:
            shapes.update(group)
        self.specs = {
            name: ParamSpec(name, tuple(shape), module[name].dtype if name in module else torch.float32)
            for name, shape in shapes.items()
        }
        self.pieces: dict[str, dict[str, list]] = {name: {} for name in self.specs}
        self._index()
        self.step = int(self.model_states.get("global_steps", 0))
        self.lr_scheduler = self.model_states.get("lr_scheduler")
        self.engine_counters = {
            "global_steps": self.step,
            "global_samples": int(self.model_states.get("global_samples", 0)),
            "skipped_steps": int(self.model_states.get("skipped_steps", 0)),
        }
        self.meta = {
            "layout": f"deepspeed-zero{self.zero_stage}",
            "world_size": self.world_size,
            "step": self.step,
        }

    def _optim(self, rank: int) -> dict:
        with self._lock:
            if rank not in self._loaded:
                loaded = load_deepspeed_file(self.rank_files[rank], required=("optimizer_state_dict",))
                self._loaded[rank] = loaded["optimizer_state_dict"]
            return self._loaded[rank]

    def _flat(self, rank: int, group: int, state: str) -> torch.Tensor:
        optim = self._optim(rank)
        if self.zero_stage == 3:
            if state == "fp32":
                return optim["fp32_flat_groups"][group]
            return optim["optimizer_state_dict"]["state"][group][state]
        if state == "fp32":
            return optim["single_partition_of_fp32_groups"][group]
        return optim["base_optimizer_state"]["state"][group][state]

    def _index(self) -> None:
        # pieces[name][state] = [(rank, group, offset in the rank's flat group, start in param, numel)]
        if self.zero_stage == 3:
            for rank in range(self.world_size):
                for group, shapes in enumerate(self.model_states["param_shapes"]):
                    offset = 0
                    for name, shape in shapes.items():
                        numel = math.prod(shape)
                        part = -(-numel // self.world_size)
                        own = max(0, min(part, numel - rank * part))
                        if own:
                            for state in STATE_KEYS:
                                self.pieces[name].setdefault(state, []).append(
                                    (rank, group, offset, rank * part, own)
                                )
                        offset += part
        else:
            seen = {name: 0 for name in self.specs}
            for rank in range(self.world_size):
                for group, mapping in enumerate(self._optim(rank)["param_slice_mappings"]):
                    for name, address in mapping.items():
                        for state in STATE_KEYS:
                            self.pieces[name].setdefault(state, []).append(
                                (rank, group, address.start, seen[name], address.numel)
                            )
                        seen[name] += address.numel
        for name, spec in self.specs.items():
            covered = sum(piece[4] for piece in self.pieces[name].get("fp32", []))
            if covered != spec.numel:
                raise CheckpointError(
                    f"{self.path}: fragments of {name} cover {covered} of {spec.numel} elements"
                )

    @property
    def optimizer_step(self) -> int:
        optim = self._optim(0)
        states = (
            optim["optimizer_state_dict"]["state"]
            if self.zero_stage == 3
            else optim["base_optimizer_state"]["state"]
        )
        return max(int(s["step"]) for s in states.values() if "step" in s)

    @property
    def param_groups(self) -> list[dict]:
        optim = self._optim(0)
        groups = (optim["optimizer_state_dict"] if self.zero_stage == 3 else optim["base_optimizer_state"])[
            "param_groups"
        ]
        return [{k: v for k, v in group.items() if k != "params"} for group in groups]

    def states(self, name: str) -> list[str]:
        return [state for state in STATE_KEYS if state in self.pieces[name]]

    def read(self, name: str, state: str, start: int, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        for rank, group, offset, piece_start, piece_numel in self.pieces[name][state]:
            a, b = max(start, piece_start), min(start + numel, piece_start + piece_numel)
            if a < b:
                flat = self._flat(rank, group, state)
                out[a - start : b - start] = flat[offset + a - piece_start : offset + b - piece_start]
        return out

    def read_full(self, name: str, state: str) -> torch.Tensor:
        spec = self.specs[name]
        return self.read(name, state, 0, spec.numel).view(spec.shape)

    def extra(self, rank: int) -> dict | None:
        return None

    def optimizer_state(self, rank: int) -> dict:
        """The `optimizer_state_dict` entry of `rank`'s optimizer file (loaded once, memory-mapped)."""
        return self._optim(rank)

    def raw_step(self, name: str):
        """Adam's `step` of the param group holding `name`, as DeepSpeed stored it (int or tensor)."""
        group = self.pieces[name]["fp32"][0][1]
        optim = self._optim(0)
        states = optim["optimizer_state_dict" if self.zero_stage == 3 else "base_optimizer_state"]["state"]
        return states[group].get("step")

    def model_state_files(self) -> list[Path]:
        """The model-states files ds_to_universal copies: mp_rank_* (ZeRO-1/2), every *model_states.pt (ZeRO-3)."""
        pattern = "*model_states.pt" if self.zero_stage == 3 else "mp_rank_*_model_states.pt"
        return sorted(Path(f) for f in glob.glob(str(self.path / pattern)) if "_expert_" not in Path(f).name)

    def close(self) -> None:
        self._loaded.clear()
