"""Tiled MLP: the SwiGLU MLP run over tiles of tokens, so that one tile's intermediates are alive at a time.

Paper: "Arctic Long Sequence Training: Scalable And Efficient Training For Multi-Million Token
Sequences" (ALST, 2025), TiledMLP. Idea: the MLP works token by token, so nothing forces it to see the
whole sequence at once. Forward runs it tile by tile under no_grad and keeps only its input; backward
recomputes each tile with grad enabled, back-propagates that tile alone, writes the tile's slice of the
input gradient and lets autograd accumulate the weight gradients. The [tokens, intermediate] gate / up /
activation / product tensors and their gradients (4 x 14336 wide at Llama-3-8B width: the peak of a
layer's backward at long sequences) then exist for one tile only. The cost is one more MLP forward.

The tiles call the MLP's own projection modules, never their weights directly: DeepSpeed ZeRO-3 gathers
a module's parameters in that module's forward hooks, in forward and again in the recomputation. Each
tile's backward accumulates into the weights' .grad; `ds_grad_is_ready` (DeepSpeed's flag for exactly
this loop, used by its own ALST TiledMLP) tells ZeRO-2/3 to reduce a gradient only after the last tile.

Results equal the untiled MLP up to rounding order: every token's output and input gradient comes from
the same operations on the same numbers (a BLAS may block a matmul of fewer rows differently, a last-bit
difference), and the weight gradients are sums of per-tile matmuls instead of one matmul over all
tokens: the same products, accumulated in another order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn


def resolve_mlp_tiles(setting: int | str, tokens: int, hidden: int) -> int:
    """Tiles for `tokens` rows: `model.mlp_tiles`, where "auto" is ceil(tokens / hidden) as in ALST.

    The run plan (training/plan.py) first leaves an "auto" MLP whole when GPU memory allows and hands the
    model its resolved count; this is the count when tiling is needed, or when no plan sized it.

    With "auto" a tile holds about `hidden` tokens, so its [tile, intermediate] tensors are about the
    size of the MLP's own weights: small next to the layer's [tokens, hidden] tensors at long sequences.
    Never more tiles than tokens (no empty tile).
    """
    tiles = math.ceil(tokens / hidden) if setting == "auto" else int(setting)
    return max(1, min(tiles, tokens))


def tile_bounds(rows: int, tiles: int) -> list[slice]:
    """`tiles` consecutive row ranges whose sizes differ by at most one (a count need not divide `rows`)."""
    edges = [rows * index // tiles for index in range(tiles + 1)]
    return [slice(begin, end) for begin, end in itertools.pairwise(edges)]


class TiledMLPFunction(torch.autograd.Function):
    """y = mlp_fn(x) over row tiles of x [..., hidden]; saves only x.

    `module` owns the parameters mlp_fn uses: their gradients are accumulated by the per-tile backward
    (they are not inputs of this Function, as in ALST, so ZeRO-3 never sees them outside their modules).
    """

    @staticmethod
    def forward(
        ctx, mlp_fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, tiles: int
    ):
        ctx.mlp_fn, ctx.module, ctx.tiles = mlp_fn, module, tiles
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.size(-1))
        out = None
        with torch.no_grad():
            for rows in tile_bounds(flat.size(0), tiles):
                tile_out = mlp_fn(flat[rows])
                if out is None:  # shaped and typed like the MLP's output, without a final torch.cat
                    out = tile_out.new_empty(flat.size(0), tile_out.size(-1))
                out[rows] = tile_out
        return out.view(*x.shape[:-1], out.size(-1))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.size(-1))
        grad_flat = grad_out.reshape(-1, grad_out.size(-1))
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        bounds = tile_bounds(flat.size(0), ctx.tiles)
        for index, rows in enumerate(bounds):
            for param in params:
                param.ds_grad_is_ready = index == len(bounds) - 1
            tile = flat[rows].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                tile_out = ctx.mlp_fn(tile)
            torch.autograd.backward(tile_out, grad_flat[rows])
            if grad_x is not None:
                grad_x[rows] = tile.grad
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        return None, None, grad_x, None


def tiled_mlp(
    mlp_fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, tiles: int
) -> torch.Tensor:
    """mlp_fn(x) computed over `tiles` row tiles of x [..., hidden] (see the module docstring).

    Falls back to the plain call for one tile, or when autograd would need the weights' gradients but
    x carries none (the Function's backward only runs when its input requires grad).
    """
    if tiles <= 1 or (torch.is_grad_enabled() and not x.requires_grad):
        return mlp_fn(x)
    return TiledMLPFunction.apply(mlp_fn, module, x, tiles)
