"""Typed run configuration: pydantic v2 models, a YAML file plus dotted overrides (CLI > file > defaults).

The section and key names of DESIGN.md are a contract; every model forbids unknown keys so a typo
fails loudly with the key's full dotted path. `validate_layout` checks everything that can be
checked without starting workers (split sizes, divisibility) and says which key to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(_Section):
    vocab_size: int = Field(259, ge=2)
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1, description="None = heads (no GQA)")
    layer_pattern: str = Field("S", description="S softmax, L linear; repeated over the layers")
    intermediate: int | None = Field(None, ge=1, description="SwiGLU width; None = 8/3 hidden rounded to 8")
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation_checkpointing: bool = True
    linear_decay: bool = Field(True, description="per-head decay in linear layers (Lightning style)")
    # Default untiled: tiling costs one more MLP forward per step, which no GPU run has weighed yet
    # against the memory it saves; long-sequence configs (configs/llama8b-1m.yaml) turn it on.
    mlp_tiles: int | Literal["auto"] = Field(
        1,
        description="token tiles of the tiled MLP (models/tiled_mlp.py); auto = ceil(local tokens / hidden), "
        "1 = untiled",
    )

    @field_validator("layer_pattern")
    @classmethod
    def _pattern_letters(cls, pattern: str) -> str:
        if not pattern or set(pattern) - {"S", "L"}:
            raise ValueError(f"layer_pattern {pattern!r} must be a non-empty string of 'S' and 'L'")
        return pattern

    @field_validator("mlp_tiles", mode="before")
    @classmethod
    def _tiles_count_or_auto(cls, value: object) -> int | str:
        # One check with one message, instead of pydantic's pair of errors for the two union members.
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(
            f"mlp_tiles={value!r} must be a whole number >= 1 or 'auto' (auto = ceil(local tokens / hidden) "
            "tiles as in ALST; 1 = the untiled MLP)"
        )

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate or 8 * ((8 * self.hidden // 3 + 7) // 8)

    def layer_kinds(self) -> list[str]:
        """The per-layer kind, the pattern repeated to cover all layers ("LLS" x 2 for 6 layers)."""
        return [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.layers)]


class DataConfig(_Section):
    source: str = "synthetic:passkey"
    seq_len: int = Field(256, ge=2)
    text_column: str = "text"


class ParallelConfig(_Section):
    dp: int | Literal["auto"] = "auto"
    ulysses: int = Field(1, ge=1)
    ring: int | Literal["auto"] = 1


class TrainConfig(_Section):
    steps: int = Field(20, ge=1)
    micro_batch_size: int = Field(1, ge=1, description="samples per data-parallel rank per step")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(2, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = 0
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    zero_stage: int = Field(1, ge=0, le=3)
    output_dir: str = "runs/default"
    log_every: int = Field(1, ge=1)


class OffloadConfig(_Section):
    activations: bool | float = Field(
        False,
        description="swap checkpointed layer inputs to host memory, with the attention output of this "
        "share of the tokens (true = 1.0: no attention recomputation); the other tokens are recomputed",
    )
    optimizer: Literal["none", "cpu", "interleaved"] = "none"
    gpu_share: float | Literal["auto"] = Field(
        "auto", description="interleaved: share of parameter subgroups updated on the GPU"
    )
    host_memory_limit_gb: float | None = Field(None, gt=0, description="None = what the host has")

    @field_validator("activations")
    @classmethod
    def _share_in_range(cls, value: bool | float) -> bool | float:
        if not isinstance(value, bool) and not 0.0 <= value <= 1.0:
            raise ValueError(f"offload.activations={value} must be true, false or a share in [0, 1]")
        return value

    @property
    def activation_share(self) -> float:
        if isinstance(self.activations, bool):
            return 1.0 if self.activations else 0.0
        return float(self.activations)


class CheckpointConfig(_Section):
    interval: int = Field(0, ge=0, description="0 = never")
    keep: int = Field(3, ge=1)
    async_: bool = Field(True, alias="async")
    resume: bool = True


class LaunchConfig(_Section):
    backend: Literal["auto", "local", "torchrun", "ray"] = "auto"
    workers: int = Field(1, ge=1)
    address: str | None = None
    max_failures: int = Field(0, ge=0)
    collective_timeout_s: float = Field(600.0, gt=0, description="a hung collective fails after this")
    connect_timeout_s: float = Field(
        45.0, gt=0, le=3600, description="joining launch.address fails after this when nothing answers"
    )


class DebugConfig(_Section):
    fail_at_step: int | None = Field(
        None, ge=1, description="one worker raises at this step, first attempt only"
    )


class LongloomConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    offload: OffloadConfig = OffloadConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    launch: LaunchConfig = LaunchConfig()
    debug: DebugConfig = DebugConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted_key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["model.hidden=64", "data.source=synthetic:recall"]` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=10)")
        value = yaml.safe_load(raw) if raw != "" else ""
        # `null`-looking data sources or addresses stay strings only when quoted; keep YAML semantics.
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key {path!r}: remove it or check its spelling")
        else:
            lines.append(f"config key {path!r}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any]) -> LongloomConfig:
    try:
        return LongloomConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LongloomConfig:
    """Defaults, then the YAML file, then the dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)


def resolve_split(cfg: LongloomConfig, world_size: int | None = None) -> tuple[int, int, int]:
    """(dp, ulysses, ring) for `world_size` workers, filling in `auto` and checking the product."""
    workers = world_size if world_size is not None else cfg.launch.workers
    ulysses = cfg.parallel.ulysses
    ring = cfg.parallel.ring
    if ring == "auto":
        # The SP degree is what dp leaves of the workers; parallel/hybrid.py's cost model splits it
        # into ulysses x ring (parallel.ulysses is then ignored).
        from longloom.parallel.hybrid import choose_ring_degree

        fixed_dp = 1 if cfg.parallel.dp == "auto" else cfg.parallel.dp
        if workers % fixed_dp:
            raise ConfigError(f"launch.workers={workers} is not divisible by parallel.dp={fixed_dp}")
        sp = workers // fixed_dp
        m = cfg.model
        ring = choose_ring_degree(sp, m.heads, m.num_kv_heads, cfg.data.seq_len, head_dim=m.head_dim)
        ulysses = sp // ring
    dp = cfg.parallel.dp
    if dp == "auto":
        if workers % (ulysses * ring):
            raise ConfigError(
                f"launch.workers={workers} is not divisible by parallel.ulysses * parallel.ring = "
                f"{ulysses} * {ring}: change launch.workers or the SP degrees"
            )
        dp = workers // (ulysses * ring)
    if dp * ulysses * ring != workers:
        raise ConfigError(
            f"parallel.dp * parallel.ulysses * parallel.ring = {dp} * {ulysses} * {ring} = "
            f"{dp * ulysses * ring} must equal the number of workers ({workers}): set launch.workers="
            f"{dp * ulysses * ring} or change parallel.*"
        )
    return dp, ulysses, ring


def validate_layout(cfg: LongloomConfig, world_size: int | None = None) -> tuple[int, int, int]:
    """Checks the split against the model and data; returns (dp, ulysses, ring)."""
    dp, ulysses, ring = resolve_split(cfg, world_size)
    m = cfg.model
    if m.hidden % m.heads:
        raise ConfigError(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if m.heads % m.num_kv_heads:
        raise ConfigError(f"model.heads={m.heads} is not divisible by model.kv_heads={m.num_kv_heads}")
    if "S" in m.layer_pattern and m.heads % ulysses:
        raise ConfigError(
            f"model.heads={m.heads} is not divisible by parallel.ulysses={ulysses}: "
            f"choose parallel.ulysses among the divisors of {m.heads}"
        )
    if "S" in m.layer_pattern and m.num_kv_heads % ulysses and ulysses % m.num_kv_heads:
        raise ConfigError(
            f"model.kv_heads={m.num_kv_heads} and parallel.ulysses={ulysses}: one must divide the other"
        )
    sp = ulysses * ring
    chunks = sp * 2 if ring > 1 else sp
    if cfg.data.seq_len % chunks:
        what = f"2 * parallel.ring * parallel.ulysses = {chunks}" if ring > 1 else f"the SP degree {sp}"
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be divisible by {what}; "
            f"e.g. data.seq_len={(cfg.data.seq_len // chunks + 1) * chunks}"
        )
    return dp, ulysses, ring
