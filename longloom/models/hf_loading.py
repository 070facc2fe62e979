"""Build a pretrained Hugging Face causal LM from a local folder for longloom training (`model.source: hf:<folder>`).

    config = load_hf_config(folder, rope_theta=..., rope_scaling=...)    # config.json + overrides, checked
    check_hf_folder(folder, config, seq_len)                              # optional: all checks, no memory
    model = build_hf_causal_lm(folder, config, seq_len=..., dtype=..., device=..., zero3_config=...)

The architecture comes from transformers (`AutoModelForCausalLM`, never custom code from the folder),
built without random initialisation, and the weights come from the folder's safetensors
(models/hf_weights.py). Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, which partitions
every parameter as soon as its module exists, and each rank then reads only its own partitions, so no
rank ever holds the whole model. Otherwise it is built straight on the training device.

What longloom's sequence parallelism cannot honour is refused here, before anything is built or
written: architectures that do not call attention through `transformers.AttentionInterface`, sliding
windows shorter than `data.seq_len`, attention sinks, attention dropout (models/hf.py checks the rest
at the first forward).

Host memory while loading (Llama-3-8B: 8.03e9 parameters, 15.0 GiB of bf16 safetensors, largest
tensor the 128256 x 4096 embedding, 0.98 GiB), per node of 8 GPU ranks:
- ZeRO-3 over W ranks: construction allocates on the GPU and partitions module by module, so the host
  holds only each rank's current slice: at most (largest tensor / W + 2 rows) x 2 B, 0.12 GiB per rank
  at W = 8, about 1 GiB per node (0.5 GiB at W = 16); the read-only mapped files add at most the
  8 / W share of the checkpoint to the page cache (15 GiB at W = 8, 7.5 GiB at W = 16), which the
  kernel reclaims. `from_pretrained` on every rank would instead hold 8 x 15 GiB = 120 GiB.
- ZeRO 0-2: the model is built on each GPU and one whole tensor at a time passes through the host:
  at most 0.98 GiB per rank, 7.8 GiB per node, plus the same 15 GiB of shared page cache.
A dtype conversion (fp32 files into a bf16 model) can add one converted copy of that slice or tensor.

Context extension: `model.rope_theta` and `model.rope_scaling` replace the folder's RoPE settings. In
transformers 5 they live in `config.rope_parameters` ({rope_type, rope_theta, factor, ...}); the
override goes there, through transformers' own standardisation and validation, so the model computes
exactly what transformers computes for a config saved with that scaling (and export writes it back).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import __version__ as transformers_version
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from longloom.models.hf_weights import load_safetensors_weights, match_checkpoint

HF_SOURCE_PREFIX = "hf:"
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
# Parameters through which an architecture adds attention logits SP attention does not compute
# (gpt-oss: learned per-head sinks, passed to attention as `s_aux`).
SINK_PARAMETER_NAMES = ("sinks", "s_aux")


def hf_folder(source: str) -> Path | None:
    """The folder of `model.source: hf:<folder>`, or None for the native model."""
    if not source.startswith(HF_SOURCE_PREFIX):
        return None
    folder = Path(source[len(HF_SOURCE_PREFIX) :]).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"model.source={source!r}: {folder} is not a folder; give a local transformers model folder "
            "(config.json + safetensors), e.g. the output of save_pretrained"
        )
    return folder


def load_hf_config(
    folder: Path, rope_theta: float | None = None, rope_scaling: dict[str, Any] | None = None
) -> PretrainedConfig:
    """The folder's transformers config (no custom code), with the RoPE overrides applied and validated."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{folder} has no config.json: not a transformers model folder; set model.source to a folder "
            "written by save_pretrained"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    for key in ("model_type", "architectures"):
        if not raw.get(key):
            raise ValueError(
                f"{config_path} has no {key!r}: not a transformers model config; re-save the model with "
                "save_pretrained"
            )
    if "auto_map" in raw:
        raise ValueError(
            f"{config_path} has an 'auto_map' ({sorted(raw['auto_map'])}): the architecture needs custom code "
            "from the folder, which longloom does not run; use an architecture built into transformers"
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"{config_path}: model_type {raw['model_type']!r} is not known to transformers {transformers_version}: "
            f"{error}"
        ) from None
    _override_rope(config, rope_theta, rope_scaling)
    return config


def _override_rope(config: PretrainedConfig, rope_theta: float | None, rope_scaling: dict | None) -> None:
    if rope_theta is None and rope_scaling is None:
        return
    current = dict(getattr(config, "rope_parameters", None) or {})
    if not current:
        raise ValueError(
            f"{config.model_type} has no RoPE parameters to override: drop model.rope_theta / model.rope_scaling"
        )
    if config.nested_rope_parameter_keys(current):
        raise ValueError(
            f"{config.model_type} has RoPE parameters per layer type ({sorted(current)}): model.rope_theta / "
            "model.rope_scaling cover one global RoPE; edit config.json's rope_parameters instead"
        )
    parameters = current
    if rope_scaling is not None:
        scaling = dict(rope_scaling)
        kinds = {scaling.pop("rope_type", None), scaling.pop("type", None)} - {None}
        if len(kinds) != 1 or next(iter(kinds)) not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"model.rope_scaling={rope_scaling} needs one 'type' (or 'rope_type') among {ROPE_SCALING_TYPES}"
            )
        kind = kinds.pop()
        # The folder's theta and partial rotary factor stay unless overridden, and so does its pretraining
        # length for the scalings that use it (a Llama 3.1 folder: 8192, not its max_position_embeddings).
        kept_keys = ["rope_theta", "partial_rotary_factor"]
        if kind in ("yarn", "llama3"):
            kept_keys.append("original_max_position_embeddings")
        kept = {key: current[key] for key in kept_keys if key in current}
        parameters = kept | {"rope_type": kind} | scaling
    if rope_theta is not None:
        parameters["rope_theta"] = float(rope_theta)
    config.rope_parameters = parameters
    # transformers' own rules: fills original_max_position_embeddings for yarn / llama3, checks the keys.
    config.standardize_rope_params()
    try:
        config.validate_rope()
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"model.rope_scaling={rope_scaling} (rope_theta={rope_theta}) is refused by transformers: {error}"
        ) from None


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers causal-LM class of `config`, refused when SP attention cannot be installed in it."""
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(
            f"model_type {config.model_type!r} ({config.architectures}) has no causal language model class in "
            f"transformers {transformers_version}: longloom fine-tunes causal LMs"
        ) from None
    if not model_class.is_backend_compatible():
        raise ValueError(
            f"{model_class.__name__} does not call attention through transformers.AttentionInterface "
            "(_supports_attention_backend is False): longloom SP attention cannot be installed in it; use "
            "an architecture that does (Llama, Mistral, Qwen2, Qwen3, ...)"
        )
    return model_class


def meta_causal_lm(config: PretrainedConfig) -> PreTrainedModel:
    """The architecture on the meta device: parameter names and shapes, no memory (sizes for `longloom check`)."""
    model_class = causal_lm_class(config)
    with torch.device("meta"):
        return model_class(config)


def check_sequence_parallel_support(config: PretrainedConfig, seq_len: int) -> type[PreTrainedModel]:
    """Refuses what SP attention would silently compute differently at `seq_len`; returns the model class."""
    model_class = causal_lm_class(config)
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    windowed = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if windowed and window < seq_len:
        raise ValueError(
            f"{config.model_type} attends over a sliding window of {window} tokens (config.json sliding_window), "
            f"shorter than data.seq_len={seq_len}: longloom SP attention is full causal; set data.seq_len <= "
            f"{window} or use a full-attention model"
        )
    if getattr(text, "attention_dropout", 0.0):
        raise ValueError(
            f"config.json attention_dropout={text.attention_dropout}: longloom SP attention has no dropout; "
            "set attention_dropout to 0 in config.json"
        )
    # The parameters tell: the architecture on the meta device (no memory, no values).
    sinks = [
        name
        for name, _ in meta_causal_lm(config).named_parameters()
        if name.rsplit(".", 1)[-1] in SINK_PARAMETER_NAMES
    ]
    if sinks:
        raise ValueError(
            f"{model_class.__name__} has attention sinks ({sinks[0]}, ...): longloom SP attention does not "
            "add sink logits; use a model without them"
        )
    return model_class


def check_hf_folder(folder: Path, config: PretrainedConfig, seq_len: int) -> None:
    """Everything `build_hf_causal_lm` refuses, from config.json and the safetensors headers alone.

    No memory, no device, no collective: run it before anything is written (the run's output folder)
    and in `longloom check`.
    """
    check_sequence_parallel_support(config, seq_len)
    match_checkpoint(meta_causal_lm(config), Path(folder))


def build_hf_causal_lm(
    folder: Path,
    config: PretrainedConfig,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    zero3_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The folder's causal LM in `dtype` with its pretrained weights.

    `config` from `load_hf_config(folder, ...)`. With `zero3_config` (the DeepSpeed config dict the
    engine will get, ZeRO stage 3), the model is built under `deepspeed.zero.Init` (torch.distributed
    initialised) and each rank loads only its partitions; `device` is then DeepSpeed's (the accelerator
    of this rank). Without, it is built whole on `device`. Weights that do not match the config raise
    ValueError before any is copied.
    """
    check_sequence_parallel_support(config, seq_len)
    if zero3_config is not None:
        model = _build_zero3(config, dtype, zero3_config)
    else:
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    # no_init_weights also skips post_init's tying: tie as transformers' loaders do after construction.
    model.tie_weights()
    load_safetensors_weights(model, Path(folder))
    return model


def _build_zero3(config: PretrainedConfig, dtype: torch.dtype, zero3_config: dict) -> PreTrainedModel:
    import deepspeed

    stage = zero3_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(
            f"zero3_config has zero_optimization.stage={stage}; pass it only for train.zero_stage=3"
        )
    # zero.Init takes its dtype from the config, as the engine will: DeepSpeed 0.19 ignores its `dtype`
    # argument where the accelerator has no fp16 (on CPU it would always build bf16).
    config_dtype = (
        torch.bfloat16
        if zero3_config.get("bf16", {}).get("enabled")
        else torch.float16
        if zero3_config.get("fp16", {}).get("enabled")
        else torch.float32
    )
    if config_dtype != dtype:
        raise ValueError(
            f"dtype {dtype} but the DeepSpeed config's bf16 / fp16 sections give {config_dtype}: pass the config "
            "the engine gets for this dtype"
        )
    # The modeling module must be imported before zero.Init, which replaces torch.Tensor.__new__ in a way
    # torch._dynamo (imported by transformers' modeling code) refuses: resolving the class imports it.
    causal_lm_class(config)
    contexts = (
        no_init_weights(),
        # zero.Init casts floating tensors made by torch.arange to its dtype: RoPE frequencies would be bf16.
        _keep_arange_dtype(),
        deepspeed.zero.Init(config_dict_or_path=zero3_config),
    )
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    restore_rope_buffers(model)
    return model


def _keep_arange_dtype() -> contextlib.AbstractContextManager:
    """transformers' guard against zero.Init's arange cast, where this transformers has it (5.2x).

    Older releases (5.17 on the GPU machines) lack it: `restore_rope_buffers` then rebuilds the RoPE
    frequencies after zero.Init.
    """
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        return contextlib.nullcontext()
    return prevent_arange_dtype_change()


def restore_rope_buffers(model: PreTrainedModel) -> None:
    """RoPE frequencies back in fp32 where zero.Init cast them (bf16 rotates positions beyond a few thousand
    wrongly): each rotary module's buffers are taken from a fresh copy built outside zero.Init with the
    module's own config (its public constructor; rotary modules hold no parameters to partition)."""
    import transformers

    for module in model.modules():
        cast = {
            name: buffer
            for name, buffer in module.named_buffers(recurse=False)
            if name.endswith("inv_freq") and buffer.dtype != torch.float32
        }
        if cast and hasattr(module, "config"):
            fresh = type(module)(module.config)
            for name, buffer in cast.items():
                setattr(module, name, getattr(fresh, name).to(buffer.device))
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq") and buffer.dtype != torch.float32:
            raise ValueError(
                f"under ZeRO-3 the model's RoPE frequencies {name} were built in {buffer.dtype}, not float32, "
                f"and could not be rebuilt (transformers {transformers.__version__}): upgrade transformers "
                "(5.24 has prevent_arange_dtype_change) or set train.zero_stage to 2 or lower"
            )


def hf_model_shape(config: PretrainedConfig) -> dict[str, Any]:
    """The folder's shape in longloom's model.* keys (validate_layout, memory estimate, saved config)."""
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    shape = {
        "vocab_size": text.vocab_size,
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "heads": text.num_attention_heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "intermediate": text.intermediate_size,
        "norm_eps": getattr(text, "rms_norm_eps", None) or 1e-5,
    }
    if rope.get("rope_theta") is not None:
        shape["rope_theta"] = float(rope["rope_theta"])
    return shape


def resolve_hf_model(model_cfg, seq_len: int | None = None):
    """(model.* with the folder's shape, the folder's checked transformers config) for `model.source: hf:`.

    A shape key (model.hidden, ...) set explicitly to something else than the folder's is refused: the
    folder decides the architecture, and a silently ignored model.layers=4 would train another model than
    the user meant. The same value (a config.yaml a run wrote back) is accepted.
    """
    from longloom.config import NATIVE_SHAPE_KEYS

    folder = hf_folder(model_cfg.source)
    config = load_hf_config(folder, rope_theta=model_cfg.rope_theta, rope_scaling=model_cfg.rope_scaling)
    shape = hf_model_shape(config)
    conflicts = [
        f"model.{key}={getattr(model_cfg, key)} (config.json: {shape[key]})"
        for key in NATIVE_SHAPE_KEYS
        if key in model_cfg.model_fields_set and getattr(model_cfg, key) != shape[key]
    ]
    if conflicts:
        raise ValueError(
            f"model.source={model_cfg.source!r} takes its shape from {folder / 'config.json'}, but "
            f"{', '.join(conflicts)}: drop these keys (the folder decides the architecture)"
        )
    if seq_len is not None:
        check_sequence_parallel_support(config, seq_len)
    update = {key: value for key, value in shape.items() if key != "rope_theta"}
    update["rope_theta"] = (
        model_cfg.rope_theta if model_cfg.rope_theta is not None else shape.get("rope_theta")
    )
    return model_cfg.model_copy(update=update | {"layer_pattern": "S"}), config
