"""Export to Hugging Face: `LlamaForCausalLM` safetensors + config.json from any checkpoint reader.

longloom.models.llama names its parameters like HF's Llama without the `model.` prefix
(`layers.{i}.self_attn.q_proj.weight`, ...), keeps q/k/v/o as [out, in] linear weights and rotates
RoPE pairs as (first half, second half) like HF's `rotate_half`, so export is a rename: no
permutation of heads. Linear-attention layers ("L" in model.layer_pattern) have no HF Llama form and
are refused. The weights are the fp32 masters, cast to the dtype the model trained in (or `--dtype`:
bf16, fp16, fp32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from longloom.checkpointing.commit import CheckpointError
from longloom.checkpointing.tensor_file import dtype_name, write_sharded

SHARD_BYTES = 5 << 30  # Hugging Face's default max_shard_size
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


def _model_config(source):
    """(ModelConfig, data.seq_len) of the run: from the checkpoint's extras, else its config.yaml."""
    extra = source.extra(0) or {}
    config = extra.get("config")
    if config is None:
        candidate = Path(source.path).parent.parent / "config.yaml"
        if candidate.is_file():
            config = yaml.safe_load(candidate.read_text())
    if not config or "model" not in config:
        raise CheckpointError(
            f"{source.path}: no model configuration found (neither extra['config'] in the checkpoint nor "
            "<output_dir>/config.yaml): --to hf needs heads and kv_heads"
        )
    from longloom.config import ModelConfig

    return ModelConfig.model_validate(config["model"]), config.get("data", {}).get("seq_len")


def write_hf(source, dst: Path, run_parallel, dtype: torch.dtype | None) -> None:
    cfg, seq_len = _model_config(source)
    if set(cfg.layer_pattern) != {"S"}:
        raise CheckpointError(
            f"model.layer_pattern={cfg.layer_pattern!r}: --to hf exports softmax-attention models only"
        )
    renamed = {name: hf_name(name) for name in source.specs}
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
