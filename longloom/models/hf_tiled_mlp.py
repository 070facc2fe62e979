"""Tiled MLP (ALST's TiledMLP, models/tiled_mlp.py) inside a Hugging Face decoder: `model.mlp_tiles` for hf: models.

Each decoder layer's `mlp` (a token-wise module in every supported family: Llama, Mistral, Qwen2/3) runs
over tiles of tokens through `tiled_mlp`: forward under no_grad keeping only its input, backward
recomputing tile by tile. The layer's `mlp` instance gets a `forward` that calls its own class forward
per tile, so parameter names, ZeRO-3's hooks (on the projections it calls) and HF export are unchanged;
the class itself, and every other instance of it, is left as it was.
"""

from __future__ import annotations

import functools

from torch import nn

from longloom.models.tiled_mlp import tiled_mlp


def enable_tiled_mlp(causal_lm: nn.Module, tiles: int) -> int:
    """Runs every decoder layer's MLP over `tiles` token tiles (1: unchanged); returns the layers tiled."""
    if tiles <= 1:
        return 0
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if layers is None or not all(isinstance(getattr(layer, "mlp", None), nn.Module) for layer in layers):
        raise ValueError(
            f"model.mlp_tiles={tiles}: {type(causal_lm).__name__} has no decoder `layers` with an `mlp` "
            "module each, which the tiled MLP runs over tiles of tokens; set model.mlp_tiles: 1"
        )
    for layer in layers:
        mlp = layer.mlp
        plain = type(mlp).forward.__get__(mlp)  # the class's forward, bound: the tile function
        mlp.forward = functools.partial(tiled_mlp, plain, mlp, tiles=tiles)
    return len(layers)
