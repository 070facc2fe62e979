"""Pretrained weights from a Hugging Face folder's safetensors into a built model, whole or ZeRO-3 partitioned.

A transformers folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`weight_map`: tensor name -> file). Every check runs on the files' headers before any value is read:
each model tensor must be in the files exactly once with the model's shape (tied tensors, such as an LM
head tied to the embedding, need one of their names), and every tensor in the files must belong to the
model. A mismatch raises ValueError naming the key, the file and what to change.

Then each tensor is read from the memory-mapped file on its own:
- a whole parameter (no ZeRO-3): `get_tensor`, copied into the parameter and dropped; host memory holds
  one tensor at a time (plus the page cache of the mapped file, which the kernel can reclaim);
- a ZeRO-3 parameter (built under `deepspeed.zero.Init`, `param.ds_id` set): this rank's partition
  [rank * part, rank * part + part) of the flattened tensor, read with `get_slice` over the rows that
  cover it (`checkpointing/tensor_file.read_flat_range`), into `param.ds_tensor`. A rank reads about
  1/world of each tensor and nobody ever holds a whole one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from longloom.checkpointing.tensor_file import read_flat_range

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHOWN_KEYS = 8  # keys named in an error message; the count says how many more


@dataclass(frozen=True)
class WeightsLoaded:
    """What `load_safetensors_weights` did on this rank."""

    tensors: int  # model tensors filled
    elements: int  # elements this rank copied in (its partitions under ZeRO-3)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file for the folder's weights (index json or a single file)."""
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{index_path} is not a safetensors index (JSON with a 'weight_map' of tensor name -> file): "
                f"{error!r}; re-save the model with save_pretrained"
            ) from None
        files = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({str(path) for path in files.values() if not path.is_file()})
        if absent:
            raise ValueError(
                f"{index_path} lists shard files that are not there: {absent}; copy the complete model folder"
            )
        return files
    if single_path.is_file():
        return {name: single_path for name in _file_keys(single_path)}
    others = sorted(path.name for path in folder.glob("*.bin")) + sorted(
        path.name for path in folder.glob("*.pt")
    )
    hint = (
        f" (found {others}: load it with transformers and save_pretrained(..., safe_serialization=True))"
        if others
        else ""
    )
    raise ValueError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: no safetensors weights{hint}")


def _file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def _file_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(set(files.values())):
        keys = [key for key, file in files.items() if file == path]
        try:
            with safe_open(str(path), framework="pt") as handle:
                present = set(handle.keys())
                for key in keys:
                    if key not in present:
                        raise ValueError(
                            f"the index maps {key!r} to {path.name}, which does not contain it; re-save the model "
                            "with save_pretrained"
                        )
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    return shapes


def _is_zero3(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _model_tensors(model: torch.nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """([every state-dict name of the tensor], tensor) for each distinct tensor, in state-dict order."""
    by_identity: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_identity.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(by_identity.values())


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if _is_zero3(tensor) else tuple(tensor.shape)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def match_checkpoint(model: torch.nn.Module, folder: Path | str) -> list[tuple[str, Path, torch.Tensor]]:
    """(file key, file, model tensor) for every model tensor; ValueError on any mismatch. Reads headers only."""
    files = checkpoint_files(Path(folder))
    shapes = _file_shapes(files)
    # The architecture's own list of file keys to skip, and RoPE frequencies that old checkpoints saved
    # (transformers skips them too: the model computes them from its config).
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), r"rotary_emb\.inv_freq$"]
    ignored = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    plan, missing, mismatched, used = [], [], [], set()
    for names, tensor in _model_tensors(model):
        found = [name for name in names if name in files]
        if not found:
            missing.append(" = ".join(names))
            continue
        key = found[0]  # tied tensors: the first name in the files, as transformers ties to the source
        used.update(found)
        if shapes[key] != _shape(tensor):
            mismatched.append(
                f"{key}: {list(shapes[key])} in {files[key].name}, {list(_shape(tensor))} in the model"
            )
        plan.append((key, files[key], tensor))
    unexpected = sorted(key for key in files if key not in used and not ignored.search(key))
    where = f"{folder} (config.json against its safetensors)"
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} model tensors are not in the weights: {_listed(missing)}; the weights were "
            "saved from another architecture or config, or the folder is incomplete"
        )
    if mismatched:
        raise ValueError(
            f"{where}: {len(mismatched)} tensors have another shape in the weights than config.json gives: "
            f"{_listed(mismatched)}; use the config.json the weights were saved with"
        )
    if unexpected:
        raise ValueError(
            f"{where}: {len(unexpected)} tensors in the weights belong to no model tensor: {_listed(unexpected)}; "
            "the weights were saved from another architecture or config"
        )
    return plan


@torch.no_grad()
def load_safetensors_weights(model: torch.nn.Module, folder: Path | str) -> WeightsLoaded:
    """Fills every parameter and persistent buffer of `model` from the folder's safetensors.

    Whole tensors, or under ZeRO-3 this rank's partition of each (read alone from the file). Everything
    is checked first (`match_checkpoint`): on a mismatch nothing in the model changes.
    """
    plan = match_checkpoint(model, folder)
    elements = 0
    for path in sorted({path for _, path, _ in plan}):
        with safe_open(str(path), framework="pt") as handle:
            for key, _, tensor in (entry for entry in plan if entry[1] == path):
                if _is_zero3(tensor):
                    elements += _load_partition(handle, key, tensor)
                else:
                    tensor.copy_(handle.get_tensor(key))
                    elements += tensor.numel()
    return WeightsLoaded(tensors=len(plan), elements=elements)


def _load_partition(handle, key: str, param: torch.Tensor) -> int:
    """Copies this rank's ZeRO-3 partition of `key` into `param.ds_tensor`; returns its element count."""
    part = param.ds_tensor.ds_numel
    start = dist.get_rank(group=param.ds_process_group) * part
    numel = max(0, min(part, param.ds_numel - start))  # the last ranks' partitions are padded
    if numel:
        param.ds_tensor.data[:numel].copy_(read_flat_range(handle, key, start, numel))
    return numel
