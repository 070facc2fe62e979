"""A DeepSpeed engine's fp32 master weights and Adam moments, as flat ranges of each parameter.

Universal Checkpointing (Lian et al., "Universal Checkpointing: Efficient and Flexible
Checkpointing for Large Scale Distributed Training", 2024): whatever the parallel layout, every
rank holds pieces of parameters, and a piece is fully described by (parameter name, flat offset,
length) plus the parameter's full shape. Saving writes each piece once; loading onto another
layout asks, for every piece the new layout holds, for that flat range of the full parameter.

How a piece is found depends on the ZeRO stage, through DeepSpeed's public fragment APIs:

- ZeRO-3 (`param.ds_id`): the rank's partition [r * part, r * part + part) of the flattened
  parameter (`deepspeed.utils.safe_get_local_fp32_param` / `safe_get_local_optimizer_state`).
- ZeRO-1/2 and bf16 stage 0 (DeepSpeed's BF16_Optimizer): `param._hp_mapping`, the fragment of
  the fp32 partition that overlaps this parameter (`lp_fragment_address`, `get_hp_fragment`).
- Stage 0 in fp32: the parameters are the masters and every rank holds them all; to share the
  writing, each rank saves an even 1/W slice of the concatenated flat parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
STATE_KEYS = ("fp32", *ADAM_KEYS)
# read(name, state, start, numel) -> fp32 CPU tensor of that flat range of the full parameter.
RangeReader = Callable[[str, str, int, int], torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """A parameter's identity in a checkpoint: full shape and the dtype the model holds it in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatRange:
    """Elements [start, start + numel) of a parameter's flattened view."""

    name: str
    start: int
    numel: int


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EngineState:
    """Views of one engine's optimizer state as flat ranges; reads on save, writes on load."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = engine.optimizer
        # ZeRO and BF16 wrappers keep the torch-style optimizer (whose `state` holds the Adam
        # moments and step) in `.optimizer`; without a wrapper the engine holds it directly.
        self.base = getattr(engine.optimizer, "optimizer", None) or engine.optimizer
        self.params: dict[str, torch.nn.Parameter] = {}
        frozen = []
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                self.params[name] = param
            else:
                frozen.append(name)
        if frozen:
            raise ValueError(
                f"parameters {frozen[:5]} are frozen (requires_grad=False); the checkpointer saves optimizer "
                "state for trainable parameters only: make them trainable or exclude them from the model"
            )
        values = list(self.params.values())
        if any(hasattr(p, "ds_id") for p in values):
            self.kind = "zero3"
        elif any(hasattr(p, "_hp_mapping") for p in values):
            self.kind = "fragments"
        else:
            self.kind = "replicated"
        self.rank, self.world_size = _world()

    # ----------------------------------------------------------------- what this rank holds
    def specs(self) -> dict[str, ParamSpec]:
        specs = {}
        for name, p in self.params.items():
            shape = tuple(p.ds_shape) if self.kind == "zero3" else tuple(p.shape)
            specs[name] = ParamSpec(name, shape, p.dtype)
        return specs

    def _zero3_partition(self, p) -> tuple[int, int, int]:
        part = p.ds_tensor.ds_numel
        start = dist.get_rank(group=p.ds_process_group) * part
        return part, start, max(0, min(part, p.ds_numel - start))

    def held(self) -> list[tuple[FlatRange, dict[str, torch.Tensor]]]:
        """Every range this rank holds, with live flat views of fp32 / exp_avg / exp_avg_sq."""
        held = []
        if self.kind == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            for name, p in self.params.items():
                _, start, numel = self._zero3_partition(p)
                if numel:
                    views = {"fp32": safe_get_local_fp32_param(p).view(-1)[:numel]}
                    for key in ADAM_KEYS:
                        views[key] = safe_get_local_optimizer_state(p, key).view(-1)[:numel]
                    held.append((FlatRange(name, start, numel), views))
        elif self.kind == "fragments":
            for name, p in self.params.items():
                mapping = p._hp_mapping
                if mapping is None:
                    continue
                if not mapping.optim_fragment:
                    raise RuntimeError(
                        f"optimizer state of {name} is not initialised yet: save a checkpoint after the first "
                        "engine.step()"
                    )
                address = mapping.lp_fragment_address
                views = {"fp32": mapping.get_hp_fragment().view(-1)}
                views.update({key: mapping.get_hp_fragment(key).view(-1) for key in ADAM_KEYS})
                held.append((FlatRange(name, address.start, address.numel), views))
        else:
            for name, p in self.params.items():
                state = self.base.state.get(p, {})
                if not all(key in state for key in ADAM_KEYS):
                    raise RuntimeError(
                        f"optimizer state of {name} is not initialised yet: save a checkpoint after the first "
                        "engine.step()"
                    )
                views = {"fp32": p.detach().view(-1)}
                views.update({key: state[key].view(-1) for key in ADAM_KEYS})
                held.append((FlatRange(name, 0, p.numel()), views))
        return held

    def saved_share(self) -> list[tuple[FlatRange, dict[str, torch.Tensor]]]:
        """The ranges this rank writes: each range of the model exactly once across all ranks.

        Collective (all_gather_object) in the sharded kinds: a range held by several ranks (ZeRO
        partition groups smaller than the world) is written by one of them, chosen round-robin.
        """
        held = self.held()
        if self.kind == "replicated":
            return _even_share(held, self.rank, self.world_size)
        mine = [(r.name, r.start, r.numel) for r, _ in held]
        everyone = [mine]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        holders: dict[tuple, list[int]] = {}
        for rank, ranges in enumerate(everyone):
            for item in ranges:
                holders.setdefault(tuple(item), []).append(rank)
        specs = self.specs()
        _check_tiling(specs, holders.keys())
        owner = {item: ranks[i % len(ranks)] for i, (item, ranks) in enumerate(sorted(holders.items()))}
        return [(r, views) for r, views in held if owner[(r.name, r.start, r.numel)] == self.rank]

    # ----------------------------------------------------------------- optimizer scalars
    def optimizer_step(self) -> int:
        steps = [int(s["step"]) for s in self.base.state.values() if "step" in s]
        return max(steps, default=0)

    def param_groups(self) -> list[dict]:
        return [
            jsonable({k: v for k, v in group.items() if k != "params"}) for group in self.base.param_groups
        ]

    # ----------------------------------------------------------------- load
    def load(self, read: RangeReader, step: int, param_groups: list[dict]) -> None:
        """Writes fp32 masters, model weights and Adam moments of every held range from `read`."""
        groups = _restorable_groups(param_groups, len(self.base.param_groups))
        if self.kind == "zero3":
            self._load_zero3(read, step)
        elif self.kind == "fragments":
            self._load_fragments(read, step)
        else:
            self._load_replicated(read, step)
        for group, saved in zip(self.base.param_groups, groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k in group})

    def _step_value(self, existing, step: int):
        if torch.is_tensor(existing):
            return torch.full_like(existing, step)
        if existing is None and not type(self.base).__module__.startswith("deepspeed."):
            # torch-style optimizers (torch.optim Adam(W), longloom's interleaved AdamW) keep
            # `step` as a 0-dim fp32 CPU tensor; DeepSpeed's Fused/CPU Adam count in Python ints.
            return torch.tensor(float(step))
        return int(step)

    def _load_zero3(self, read: RangeReader, step: int) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        # Partition everything first (persistent small parameters stay gathered otherwise) and
        # re-gather them at the end from the restored partitions, as DeepSpeed's own loader does.
        self.optimizer.checkpoint_event_prologue()
        for flat in self.optimizer.fp32_partitioned_groups_flat:
            state = self.base.state[flat]
            for key in ADAM_KEYS:
                state.setdefault(key, torch.zeros_like(flat))
            state["step"] = self._step_value(state.get("step"), step)
        for name, p in self.params.items():
            part, start, numel = self._zero3_partition(p)
            for key in STATE_KEYS:
                value = torch.zeros(part, dtype=torch.float32)
                value[:numel] = read(name, key, start, numel)
                value = value.to(p.ds_tensor.device)
                if key == "fp32":
                    safe_set_local_fp32_param(p, value)
                    p.ds_tensor.data.copy_(value.to(p.ds_tensor.dtype))
                else:
                    safe_set_local_optimizer_state(p, value, key)
        self.optimizer.checkpoint_event_epilogue()

    def _load_fragments(self, read: RangeReader, step: int) -> None:
        from deepspeed.utils import map_to_flat_opt_states

        for name, p in self.params.items():
            mapping = p._hp_mapping
            if mapping is None:
                continue
            address = mapping.lp_fragment_address
            fp32 = mapping.get_hp_fragment()
            fp32.data.copy_(read(name, "fp32", address.start, address.numel).view_as(fp32))
            mapping.optim_fragment = {
                key: read(name, key, address.start, address.numel).to(fp32.device) for key in ADAM_KEYS
            }
        # Rebuild the flat moment tensors of each fp32 partition from the fragments, exactly as
        # DeepSpeed's universal-checkpoint loader does (this also works before the first step,
        # when the optimizer has no state yet).
        lp_groups = getattr(self.optimizer, "bit16_groups", None) or self.optimizer.bf16_groups
        for index, group in enumerate(self.base.param_groups):
            flat = group["params"][0]
            map_to_flat_opt_states(flat, lp_groups[index], self.base.state, list(ADAM_KEYS))
            self.base.state[flat]["step"] = self._step_value(self.base.state[flat].get("step"), step)
        # Low-precision model weights from the restored fp32 partitions (all-gather over ZeRO ranks).
        self.optimizer.update_lp_params()

    def _load_replicated(self, read: RangeReader, step: int) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(read(name, "fp32", 0, p.numel()).view_as(p))
                state = self.base.state[p]
                for key in ADAM_KEYS:
                    value = read(name, key, 0, p.numel()).view_as(p).to(device=p.device, dtype=torch.float32)
                    if key in state:
                        state[key].copy_(value)
                    else:
                        state[key] = value
                state["step"] = self._step_value(state.get("step"), step)


# Param-group entries carried across optimizers; structural ones (params, on_cpu, fused, ...) belong
# to the loading optimizer.
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "bias_correction")


def _restorable_groups(saved: list[dict], count: int) -> list[dict]:
    """Saved hyper-parameters per param group of the loading optimizer.

    Optimizers may split parameters into different numbers of groups (the interleaved optimizer
    makes subgroups); that is fine when all saved groups agree on the hyper-parameters.
    """
    groups = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in saved]
    if len(groups) == count:
        return groups
    if all(g == groups[0] for g in groups):
        return [groups[0]] * count
    raise ValueError(
        f"checkpoint has {len(groups)} optimizer param groups with different hyper-parameters and this "
        f"optimizer has {count}: the optimizer configuration changed (offload.optimizer, weight decay groups)"
    )


def _even_share(held, rank: int, world_size: int):
    """This rank's 1/W of the concatenated flat parameters, cut into per-parameter ranges."""
    total = sum(r.numel for r, _ in held)
    share = -(-total // world_size)
    lo, hi = rank * share, min(total, (rank + 1) * share)
    out, offset = [], 0
    for r, views in held:
        a, b = max(lo, offset), min(hi, offset + r.numel)
        if a < b:
            begin = a - offset
            out.append(
                (
                    FlatRange(r.name, r.start + begin, b - a),
                    {k: v[begin : begin + b - a] for k, v in views.items()},
                )
            )
        offset += r.numel
    return out


def _check_tiling(specs: dict[str, ParamSpec], ranges) -> None:
    """Every parameter must be covered exactly once by the saved ranges; anything else is a bug."""
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, start, numel in ranges:
        by_name.setdefault(name, []).append((start, numel))
    for name, spec in specs.items():
        cursor = 0
        for start, numel in sorted(by_name.get(name, [])):
            if start != cursor:
                raise RuntimeError(
                    f"parameter {name} {spec.shape}: ranks hold overlapping or missing ranges "
                    f"{sorted(by_name.get(name, []))}; cannot save it exactly once"
                )
            cursor += numel
        if cursor != spec.numel:
            raise RuntimeError(f"parameter {name} {spec.shape}: ranks hold {cursor} of {spec.numel} elements")


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)
