"""Tiny random Hugging Face causal LMs of the families longloom fine-tunes, built from config classes (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 96

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    config_class, _ = FAMILIES[family]
    settings = {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "initializer_range": 0.1,  # larger than HF's 0.02: attention far from uniform, a sharper test
        "sliding_window": None,
    }
    return config_class(**(settings | overrides))


def tiny_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return FAMILIES[family][1](tiny_config(family, **overrides)).float()


def save_tiny_model(folder: Path, family: str, max_shard_size: str | None = None, **overrides):
    """Saves a tiny random model of `family` with save_pretrained into `folder`; returns it (eval mode)."""
    model = tiny_model(family, **overrides).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def random_tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
