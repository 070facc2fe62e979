"""The tiny Llama the model-level tests share (vocab 61, hidden 32, 4 heads / 2 KV heads)."""

from longloom.config import ModelConfig


def tiny_model_config(pattern: str, **overrides) -> ModelConfig:
    """One layer per letter of `pattern` (S softmax, L linear attention); `overrides` as ModelConfig fields."""
    return ModelConfig(
        vocab_size=61, hidden=32, layers=len(pattern), heads=4, kv_heads=2, layer_pattern=pattern, **overrides
    )
