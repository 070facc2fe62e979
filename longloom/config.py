"""Typed run configuration: pydantic v2 models, a YAML file plus dotted overrides (CLI > file > defaults).

The section and key names of DESIGN.md are a contract; every model forbids unknown keys so a typo
fails loudly with the key's full dotted path, and every value is range-checked here, at load time.
What follows from the config and the world size (the split, dtype, MLP tiles, optimizer GPU share,
memory estimate) is decided once by the run plan (training/plan.py), not here: this module imports
no other part of longloom.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the key and the fix."""


def _reject_bool(value: object) -> object:
    # pydantic's lax mode reads true as 1.0: a flag written where a number belongs is a mistake.
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a flag, not a number")  # noqa: TRY004 - pydantic reports ValueError only
    return value


# Every whole-number key is strict (true / 2.5 / "3" are refused, not read as 1 / 2 / 3) and every real
# number is finite and no flag; the ranges are on the fields, so a message can name them.
Whole = StrictInt
Real = Annotated[float, BeforeValidator(_reject_bool), Field(allow_inf_nan=False)]
Flag = StrictBool
PositiveWhole = Annotated[StrictInt, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# With model.source hf:<folder> these come from the folder's config.json (models/hf_loading.py checks
# that any of them set explicitly agrees with the folder: a silent mismatch would train another shape).
NATIVE_SHAPE_KEYS = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate")
NATIVE_ROPE_THETA = 10000.0


class ModelConfig(_Section):
    source: str = Field(
        "native",
        min_length=1,
        description="native (longloom's Llama) or hf:<local transformers folder> (its architecture and weights)",
    )
    vocab_size: Whole = Field(259, ge=2)
    hidden: Whole = Field(64, ge=1)
    layers: Whole = Field(2, ge=1)
    heads: Whole = Field(4, ge=1)
    kv_heads: Whole | None = Field(None, ge=1, description="None = heads (no GQA)")
    layer_pattern: str = Field("S", description="S softmax, L linear; repeated over the layers")
    intermediate: Whole | None = Field(None, ge=1, description="SwiGLU width; None = 8/3 hidden rounded to 8")
    rope_theta: Real | None = Field(
        None, gt=0, description="RoPE base; None = 10000 for native, the folder's for hf: models"
    )
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description="hf: models only: {type: linear | dynamic | yarn | llama3, factor, "
        "original_max_position_embeddings, ...} replacing the folder's RoPE scaling",
    )
    norm_eps: Real = Field(1e-5, gt=0, lt=1)
    activation_checkpointing: Flag = True
    linear_decay: Flag = Field(True, description="per-head decay in linear layers (Lightning style)")
    # Default untiled: tiling costs one more MLP forward per layer (4.7% of the 8B step at 128K on 2 x H200,
    # BENCHMARKS.md); long-sequence configs (configs/llama8b-1m.yaml) use auto, which tiles only when the
    # whole MLP would not fit the GPU.
    mlp_tiles: PositiveWhole | Literal["auto"] = Field(
        1,
        description="token tiles of the tiled MLP (models/tiled_mlp.py); auto = untiled where the memory "
        "estimate fits the GPU, else ceil(local tokens / hidden) as ALST (training/plan.py); 1 = untiled",
    )

    @field_validator("layer_pattern")
    @classmethod
    def _pattern_letters(cls, pattern: str) -> str:
        if not pattern or set(pattern) - {"S", "L"}:
            raise ValueError(f"layer_pattern {pattern!r} must be a non-empty string of 'S' and 'L'")
        return pattern

    @field_validator("source")
    @classmethod
    def _native_or_hf(cls, source: str) -> str:
        if source == "native" or (source.startswith("hf:") and len(source) > 3):
            return source
        raise ValueError(
            f"model.source={source!r} must be 'native' or 'hf:<local transformers model folder>' "
            "(e.g. hf:/models/llama-3-8b)"
        )

    @model_validator(mode="after")
    def _rope_for_source(self) -> ModelConfig:
        if not self.is_hf and self.rope_scaling is not None:
            raise ValueError(
                f"model.rope_scaling={self.rope_scaling} is for model.source hf:<folder> only: the native model "
                "has plain RoPE; drop model.rope_scaling or set model.rope_theta"
            )
        if not self.is_hf and self.rope_theta is None:
            # The native default, written out so saved configs and checkpoints read as before.
            self.__dict__["rope_theta"] = NATIVE_ROPE_THETA
        return self

    @property
    def is_hf(self) -> bool:
        return self.source.startswith("hf:")

    @field_validator("mlp_tiles", mode="before")
    @classmethod
    def _tiles_count_or_auto(cls, value: object) -> int | str:
        # One check with one message, instead of pydantic's pair of errors for the two union members.
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(
            f"mlp_tiles={value!r} must be a whole number >= 1 or 'auto' (auto = untiled where the memory "
            "estimate fits the GPU, else ceil(local tokens / hidden) tiles as in ALST; 1 = the untiled MLP)"
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
    source: str = Field("synthetic:passkey", min_length=1)
    seq_len: Whole = Field(256, ge=2)
    text_column: str = Field("text", min_length=1)
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="bytes or a local HF tokenizer folder, the vocabulary the data was made with; None = the "
        "model folder's tokenizer for hf: models that have one, else bytes",
    )
    document_masking: Flag = Field(
        True,
        description="packed samples carry document ids, so attention stays inside each document; "
        "false: no ids, attention runs across the documents of a sample (the old behaviour)",
    )
    eval_source: str | None = Field(
        None,
        min_length=1,
        description="held-out data for train.eval_every (a prepared folder or synthetic:<task>); None = "
        "held-out draws of a synthetic data.source",
    )


class ParallelConfig(_Section):
    dp: PositiveWhole | Literal["auto"] = "auto"
    ulysses: Whole = Field(1, ge=1)
    ring: PositiveWhole | Literal["auto"] = 1


class TrainConfig(_Section):
    steps: Whole = Field(20, ge=1)
    micro_batch_size: Whole = Field(1, ge=1, description="samples per data-parallel rank per micro step")
    grad_accum: Whole = Field(
        1, ge=1, le=65536, description="micro steps per optimizer step (gradient accumulation)"
    )
    lr: Real = Field(1e-3, gt=0)
    min_lr_ratio: Real = Field(0.1, ge=0, le=1)
    warmup_steps: Whole = Field(2, ge=0)
    weight_decay: Real = Field(0.0, ge=0)
    betas: tuple[Annotated[Real, Field(ge=0, lt=1)], Annotated[Real, Field(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: Real = Field(1.0, ge=0, description="0 disables clipping")
    # torch.manual_seed and numpy's generators take any 64-bit seed; negative ones read differently.
    seed: Whole = Field(0, ge=0, lt=2**63)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    zero_stage: Whole = Field(1, ge=0, le=3)
    output_dir: str = Field("runs/default", min_length=1)
    log_every: Whole = Field(1, ge=1)
    eval_every: Whole = Field(0, ge=0, description="steps between held-out loss evaluations; 0 = never")
    max_nonfinite_steps: Whole = Field(
        3,
        ge=1,
        le=1000,
        description="stop after this many consecutive steps with a NaN/inf loss or grad norm",
    )


class OffloadConfig(_Section):
    activations: Flag | Annotated[Real, Field(ge=0, le=1)] = Field(
        False,
        description="swap checkpointed layer inputs to host memory, with the attention output of this "
        "share of the tokens (true = 1.0: no attention recomputation); the other tokens are recomputed",
    )
    device_activations: Annotated[Real, Field(ge=0, le=1)] = Field(
        0.0,
        description="share of the tokens whose attention output stays in GPU memory (not recomputed, not "
        "swapped), on top of offload.activations' share; the two add up to at most 1",
    )
    optimizer: Literal["none", "cpu", "interleaved"] = "none"
    gpu_share: Annotated[Real, Field(gt=0, le=1)] | Literal["auto"] = Field(
        "auto", description="interleaved: share of parameter subgroups updated on the GPU, in (0, 1]"
    )
    host_memory_limit_gb: Real | None = Field(None, gt=0, description="None = what the host has")

    @field_validator("activations", mode="before")
    @classmethod
    def _share_in_range(cls, value: object) -> object:
        # One message, instead of pydantic's pair of errors for the two union members.
        if isinstance(value, int | float) and not isinstance(value, bool) and not 0.0 <= value <= 1.0:
            raise ValueError(f"offload.activations={value} must be true, false or a share in [0, 1]")
        return value

    @field_validator("device_activations")
    @classmethod
    def _device_share_on_top_of_offload(cls, device: float, info: ValidationInfo) -> float:
        if "activations" not in info.data:
            return device  # offload.activations itself was refused; its message says why
        activations = info.data["activations"]
        host = (1.0 if activations else 0.0) if isinstance(activations, bool) else float(activations)
        written = str(activations).lower() if isinstance(activations, bool) else f"{activations:g}"
        if device > 0 and host == 0:
            raise ValueError(
                f"offload.device_activations={device:g} keeps attention outputs on top of activation offload, "
                f"which is off (offload.activations={written}): set offload.activations to true or a share in "
                "(0, 1] with offload.activations + offload.device_activations <= 1, or "
                "offload.device_activations=0"
            )
        if host + device > 1 + 1e-9:
            raise ValueError(
                f"offload.activations={written} and offload.device_activations={device:g} add up to "
                f"{host + device:g}, more than all the tokens: lower one of them so that they add up to at "
                f"most 1 (e.g. offload.device_activations={max(0.0, 1 - host):g})"
            )
        return device

    @property
    def activation_share(self) -> float:
        if isinstance(self.activations, bool):
            return 1.0 if self.activations else 0.0
        return float(self.activations)


class CheckpointConfig(_Section):
    interval: Whole = Field(0, ge=0, description="0 = never")
    keep: Whole = Field(3, ge=1)
    async_: Flag = Field(True, alias="async")
    resume: Flag = True


class LaunchConfig(_Section):
    backend: Literal["auto", "local", "torchrun", "ray"] = "auto"
    workers: Whole = Field(1, ge=1)
    address: str | None = Field(None, min_length=1)
    max_failures: Whole = Field(0, ge=0, le=1000, description="worker-group restarts after failures")
    # torch.distributed keeps the timeout as a C++ duration: an absurd value overflows at init, not here.
    collective_timeout_s: Real = Field(
        600.0, gt=0, le=86400, description="a hung collective fails after this (at most a day)"
    )
    connect_timeout_s: Real = Field(
        45.0, gt=0, le=3600, description="joining launch.address fails after this when nothing answers"
    )
    cpu_threads: PositiveWhole | Literal["auto"] = Field(
        "auto",
        description="CPU threads per worker (CPU Adam, host tensor work); auto = the node's cores / its "
        "workers (launchers default to 1: torchrun's and Ray's OMP_NUM_THREADS)",
    )


class DebugConfig(_Section):
    fail_at_step: Whole | None = Field(
        None, ge=1, description="one worker raises at this step, first attempt only"
    )
    gpu_memory_history: bool = Field(
        False,
        description="record the CUDA allocator's events during the first step (slower) and log, for each side "
        "stream, where its allocations came from",
    )
    unbounded_run_ahead: bool = Field(
        False,
        description="let the host run any number of decoder layers ahead of the GPU under ZeRO-3 (no "
        "training/run_ahead.py bound), to measure what the bound saves or costs",
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)}): fix it, or quote "
                "it to pass it as text"
            ) from None
        # `null`-looking data sources or addresses stay strings only when quoted; keep YAML semantics.
        _set_dotted(tree, key.strip(), value)
    return tree


def _yaml_problem(error: yaml.YAMLError) -> str:
    """'line 3, column 5: mapping values are not allowed here' from a PyYAML error."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@cache
def _config_schema() -> dict[str, Any]:
    return LongloomConfig.model_json_schema(by_alias=True)


def _field_schema(loc: tuple[Any, ...]) -> tuple[str, dict[str, Any] | None]:
    """(dotted key, JSON schema of that key) for an error location; union member tags are dropped."""
    schema, definitions = _config_schema(), _config_schema().get("$defs", {})
    path: list[str] = []
    for part in loc:
        if "$ref" in schema:
            schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        properties = schema.get("properties", {})
        if part not in properties:
            break
        path.append(str(part))
        schema = properties[part]
    return ".".join(path) or ".".join(map(str, loc)), (schema if path else None)


def _bound_text(schema: dict[str, Any]) -> str:
    # pydantic writes a bound inside a union member with its own names (ge, gt, ...), elsewhere JSON schema's.
    signs = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    signs |= {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = [f"{sign} {schema[key]}" for key, sign in signs.items() if key in schema]
    return f" {' and '.join(bounds)}" if bounds else ""


def _allowed(schema: dict[str, Any]) -> str:
    """The values a key takes, in words, from its JSON schema (types, bounds, choices)."""
    if "anyOf" in schema:
        return " or ".join(_allowed(option) for option in schema["anyOf"])
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    kind = schema.get("type")
    if kind == "integer":
        return "a whole number" + _bound_text(schema)
    if kind == "number":
        return "a finite number" + _bound_text(schema)
    if kind == "boolean":
        return "true or false"
    if kind == "null":
        return "null"
    if kind == "string":
        return "text" + (f" of at least {schema['minLength']} character" if schema.get("minLength") else "")
    if kind == "array" and "prefixItems" in schema:
        return "a list [" + ", ".join(_allowed(item) for item in schema["prefixItems"]) + "]"
    if "$ref" in schema:
        return "a section (mapping of keys)"
    return "see the key's description in longloom/config.py"


def _describe(error: ValidationError) -> str:
    """One line per key: what was given, why it is refused, and what the key allows."""
    lines: dict[str, str] = {}
    for item in error.errors():
        key, schema = _field_schema(tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            key = ".".join(map(str, item["loc"]))
            lines[key] = f"unknown config key {key!r}: remove it or check its spelling"
            continue
        if key in lines:
            continue  # the other members of a union say the same thing about the same value
        message = item["msg"].removeprefix("Value error, ")
        allowed = f"; allowed: {_allowed(schema)}" if schema else ""
        lines[key] = f"config key {key!r}={item.get('input')!r}: {message}{allowed}"
    return "\n".join(lines.values())


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
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(
                f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}; fix that line "
                "(configs/tiny.yaml shows the layout)"
            ) from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"config file {str(path)!r} is not UTF-8 text (byte {error.start}): is it the right file?"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree)
