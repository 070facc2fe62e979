"""Export to Hugging Face: a model folder (safetensors, config.json, tokenizer) from any checkpoint reader.

Runs with `model.source: hf:<folder>` export to that folder's own architecture (Mistral, Qwen2,
Qwen3, Llama, ...): HFCausalLM keeps the HF parameter names, so the checkpoint's names are the file
keys. config.json is the folder's, with the run's RoPE overrides (model.rope_theta / rope_scaling)
applied exactly as training applied them (models/hf_loading.load_hf_config), so
`AutoModelForCausalLM.from_pretrained` rebuilds the model that trained. The tokenizer files come
from data.tokenizer when it is a folder, else from the model folder. Before anything is written, the
checkpoint's parameter names and shapes are checked against the architecture built on the meta device.

Native runs export to `LlamaForCausalLM`: longloom.models.llama names its parameters like HF's Llama
without the `model.` prefix (`layers.{i}.self_attn.q_proj.weight`, ...), keeps q/k/v/o as [out, in]
linear weights and rotates RoPE pairs as (first half, second half) like HF's `rotate_half`, so
export is a rename: no permutation of heads. Linear-attention layers ("L" in model.layer_pattern)
have no HF Llama form and are refused.

The weights are the fp32 masters, cast to the dtype the model trained in (or `--dtype`: bf16, fp16, fp32).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import yaml

from longloom.checkpointing.commit import CheckpointError
from longloom.checkpointing.inspection import shape_differences
from longloom.checkpointing.tensor_file import dtype_name, write_sharded

SHARD_BYTES = 5 << 30  # Hugging Face's default max_shard_size
# What a model folder holds besides weights and config.json that a user of the export needs: the
# tokenizer (fast or sentencepiece, BPE vocab/merges), its chat template, and the generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# `--dtype` spellings: the short names the CLI documents, torch's names, and HF's torch_dtype values.
EXPORT_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_export_dtype(name: str) -> torch.dtype:
    """`--dtype` of `ckpt convert --to hf` -> torch dtype (bf16, fp16, fp32 or torch's names)."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in EXPORT_DTYPES:
        raise CheckpointError(
            f"--dtype {name!r} is not a dtype for exported weights: use bf16, fp16 or fp32 "
            "(or torch's names bfloat16, float16, float32)"
        )
    return EXPORT_DTYPES[key]


_HF_LAYER_NAMES = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """longloom.models.llama parameter name -> Hugging Face Llama name."""
    name = name.removeprefix("module.")
    if name == "lm_head.weight":
        return name
    if name in ("embed_tokens.weight", "norm.weight"):
        return f"model.{name}"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _HF_LAYER_NAMES:
        return f"model.{name}"
    raise CheckpointError(
        f"parameter {name!r} has no Hugging Face Llama counterpart: --to hf supports softmax-attention "
        "Llama models (model.layer_pattern of 'S' only)"
    )


def _run_config(source) -> dict:
    """The run's saved config (model, data, ...): from the checkpoint's extras, else <output_dir>/config.yaml."""
    extra = source.extra(0) or {}
    config = extra.get("config")
    if config is None:
        candidate = Path(source.path).parent.parent / "config.yaml"
        if candidate.is_file():
            config = yaml.safe_load(candidate.read_text())
    if not config or "model" not in config:
        raise CheckpointError(
            f"{source.path}: no model configuration found (neither extra['config'] in the checkpoint nor "
            "<output_dir>/config.yaml): --to hf needs the run's model.* settings"
        )
    return config


def run_model_config(source):
    """(ModelConfig, data.seq_len) of the run that wrote `source` (evaluation builds its model from this)."""
    from longloom.config import ModelConfig

    run = _run_config(source)
    return ModelConfig.model_validate(run["model"]), run.get("data", {}).get("seq_len")


def write_hf(
    source, dst: Path, run_parallel, dtype: torch.dtype | None, hf_folder: Path | None = None
) -> None:
    """Writes `source` as a Hugging Face model folder into `dst`: the run's own architecture.

    model.source hf:<folder> runs: that folder's architecture (`write_hf_sourced`); native runs: a
    `LlamaForCausalLM`. `hf_folder` replaces the folder a hf: run recorded (moved since training).
    """
    run = _run_config(source)
    if str(run["model"].get("source", "")).startswith("hf:"):
        write_hf_sourced(source, dst, run_parallel, dtype, run, hf_folder)
        return
    if hf_folder is not None:
        raise CheckpointError(
            f"--hf-folder {hf_folder}: {source.path} was trained from the native model "
            f"(model.source={run['model'].get('source', 'native')!r}), not from a Hugging Face folder; drop --hf-folder"
        )
    cfg, seq_len = run_model_config(source)
    if set(cfg.layer_pattern) != {"S"}:
        raise CheckpointError(
            f"model.layer_pattern={cfg.layer_pattern!r}: --to hf exports softmax-attention models only"
        )
    out_dtype = write_weights(
        source, dst, run_parallel, dtype, {name: hf_name(name) for name in source.specs}
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": max(seq_len or 4096, 4096),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name(out_dtype),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = run.get("data", {}).get("tokenizer")
    if tokenizer and Path(tokenizer).is_dir():
        copy_tokenizer_files(Path(tokenizer), dst)


def write_weights(
    source, dst: Path, run_parallel, dtype: torch.dtype | None, renamed: dict[str, str]
) -> torch.dtype:
    """The fp32 masters of `source` as safetensors under their `renamed` names (sharded above 5 GB, with
    HF's index), cast to `dtype` (default: the dtype the model trained in); returns the dtype written."""
    out_dtype = dtype or next(iter(source.specs.values())).dtype
    entries = [(renamed[name], out_dtype, spec.shape, name) for name, spec in source.specs.items()]

    def produce(name: str):
        return [(renamed[name], source.read_full(name, "fp32").to(out_dtype))]

    files = ("model.safetensors", "model-{index:05d}-of-{count:05d}.safetensors")
    where, _ = write_sharded(entries, SHARD_BYTES, files, dst, produce, run_parallel)
    if len(set(where.values())) > 1:
        total = sum(math.prod(spec.shape) * out_dtype.itemsize for spec in source.specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dtype


def copy_tokenizer_files(folder: Path, dst: Path) -> list[str]:
    """Copies the tokenizer, chat template and generation settings of `folder` into `dst`; the names copied."""
    copied = []
    for name in sorted(TOKENIZER_FILES):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
            copied.append(name)
    return copied


def write_hf_sourced(
    source, dst: Path, run_parallel, dtype: torch.dtype | None, run: dict, hf_folder: Path | None
) -> None:
    """A run of `model.source: hf:<folder>` as a folder of that architecture (see the module docstring)."""
    from longloom.models.hf_loading import hf_model_shape, load_hf_config, meta_causal_lm

    model = run["model"]
    recorded = Path(model["source"][len("hf:") :]).expanduser()
    folder = Path(hf_folder) if hf_folder is not None else recorded
    if not (folder / "config.json").is_file():
        given = "--hf-folder" if hf_folder is not None else f"the run's model.source={model['source']!r}"
        raise CheckpointError(
            f"{source.path} was trained from a Hugging Face folder, but {folder / 'config.json'} ({given}) is not "
            "there: --to hf writes that folder's architecture and config.json; pass --hf-folder <folder> with "
            "the model folder the run trained from"
        )
    folder_config = load_hf_config(folder)
    folder_theta = (getattr(folder_config, "rope_parameters", None) or {}).get("rope_theta")
    # The run saved its resolved model.rope_theta (the folder's unless overridden): only a change is an override.
    theta = model.get("rope_theta")
    theta = (
        theta
        if theta is not None and folder_theta is not None and float(theta) != float(folder_theta)
        else None
    )
    config = load_hf_config(folder, rope_theta=theta, rope_scaling=model.get("rope_scaling"))
    _check_same_shape(source, folder, model, hf_model_shape(config), meta_causal_lm(config))
    out_dtype = write_weights(source, dst, run_parallel, dtype, {name: name for name in source.specs})
    config.dtype = out_dtype
    config.to_json_file(dst / "config.json")
    tokenizer = run.get("data", {}).get("tokenizer")
    tokenizer_folder = Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else folder
    copy_tokenizer_files(tokenizer_folder, dst)
    if tokenizer_folder != folder and (folder / "generation_config.json").is_file():
        shutil.copyfile(folder / "generation_config.json", dst / "generation_config.json")


def _check_same_shape(source, folder: Path, model: dict, shape: dict, meta_model: torch.nn.Module) -> None:
    """Refuses a folder whose config.json builds another model than the checkpoint holds, naming what differs."""
    keys = [
        f"model.{key}={model[key]} in the run, {value} in config.json"
        for key, value in shape.items()
        if key != "rope_theta" and model.get(key) is not None and model[key] != value
    ]
    ours = {name: tuple(param.shape) for name, param in meta_model.named_parameters()}
    saved = {name: tuple(spec.shape) for name, spec in source.specs.items()}
    differences = shape_differences(saved, ours, "in the architecture")
    if keys or differences:
        raise CheckpointError(
            f"{source.path} does not fit the architecture of {folder / 'config.json'}: "
            + "; ".join((keys + differences)[:6])
            + (f" (and {len(keys + differences) - 6} more)" if len(keys + differences) > 6 else "")
            + ". Pass --hf-folder <folder> with the config.json the run trained from"
        )
    buffers = set(meta_model.state_dict()) - set(dict(meta_model.named_parameters(remove_duplicate=False)))
    if buffers:
        raise CheckpointError(
            f"{type(meta_model).__name__} keeps persistent buffers {sorted(buffers)[:4]} that checkpoints do not "
            "hold (training does not change them): --to hf cannot export this architecture"
        )
