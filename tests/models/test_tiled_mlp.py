"""Tiled MLP (models/tiled_mlp.py): output and every gradient equal the untiled SwiGLU; one tile alive."""

import itertools

import pytest
import torch

from longloom.config import ConfigError, ModelConfig, load_config
from longloom.models.llama import DecoderLayer, SwiGLU, plain_checkpoint, rope_tables
from longloom.models.tiled_mlp import resolve_mlp_tiles, tile_bounds
from longloom.offload.activations import ActivationOffloader

HIDDEN, WIDTH = 16, 40


def _pair(tiles, dtype=torch.float32):
    torch.manual_seed(0)
    tiled = SwiGLU(HIDDEN, WIDTH, tiles).to(dtype)
    plain = SwiGLU(HIDDEN, WIDTH, 1).to(dtype)
    plain.load_state_dict(tiled.state_dict())
    return tiled, plain


def _run(mlp, x, grad_out):
    x = x.clone().requires_grad_()
    out = mlp(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {name: p.grad for name, p in mlp.named_parameters()}


def _assert_same(got, want, rtol):
    # rtol on the largest magnitude: the weight gradients are the same products summed in another order.
    scale = want.abs().max()
    assert (got - want).abs().max() <= rtol * scale, (got - want).abs().max() / scale


@pytest.mark.parametrize("tiles", [2, 3, 7, 26, "auto"])  # 26 rows: 3 and 7 do not divide them
def test_output_and_gradients_equal_untiled(tiles):
    tiled, plain = _pair(tiles)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, HIDDEN, generator=g)
    grad_out = torch.randn(2, 13, HIDDEN, generator=g)
    got, want = _run(tiled, x, grad_out), _run(plain, x, grad_out)
    _assert_same(got[0], want[0], 1e-6)
    _assert_same(got[1], want[1], 1e-6)
    for name in want[2]:
        _assert_same(got[2][name], want[2][name], 1e-6)


def _saved_shapes(mlp, x) -> list[tuple[int, ...]]:
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        mlp(x)
    return shapes


def test_forward_saves_only_the_input():
    tiled, plain = _pair(4)
    x = torch.randn(1, 32, HIDDEN, requires_grad=True)
    assert _saved_shapes(tiled, x) == [(1, 32, HIDDEN)]  # no [tokens, width] gate / up / product kept
    assert (1, 32, WIDTH) in _saved_shapes(plain, x)  # the untiled MLP keeps them


def test_no_grad_forward_and_input_without_grad():
    tiled, plain = _pair(3)
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        _assert_same(tiled(x), plain(x), 1e-6)
    out = tiled(x)  # x needs no grad but the weights do: falls back to the plain call, weights get grads
    out.sum().backward()
    assert all(p.grad is not None for p in tiled.parameters())


@pytest.mark.parametrize("checkpoint_kind", ["torch", "offload"])
def test_inside_activation_checkpointing(checkpoint_kind):
    cfgs = [ModelConfig(hidden=HIDDEN, heads=2, intermediate=WIDTH, mlp_tiles=t) for t in (3, 1)]
    results = []
    for cfg in cfgs:
        torch.manual_seed(0)
        layer = DecoderLayer(cfg, "S", None)
        checkpoint_fn = (
            plain_checkpoint
            if checkpoint_kind == "torch"
            else ActivationOffloader(1.0, torch.device("cpu")).checkpoint
        )
        g = torch.Generator().manual_seed(2)
        hidden = torch.randn(2, 10, HIDDEN, generator=g, requires_grad=True)
        cos, sin = rope_tables(torch.arange(10).expand(2, 10), cfg.head_dim, cfg.rope_theta)
        out = checkpoint_fn(layer, hidden, cos, sin, is_last_layer=False)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        results.append((out.detach(), hidden.grad, [p.grad for p in layer.parameters()]))
    (out, grad, weights), (want_out, want_grad, want_weights) = results
    _assert_same(out, want_out, 1e-6)
    _assert_same(grad, want_grad, 1e-6)
    for got, want in zip(weights, want_weights):
        _assert_same(got, want, 1e-6)


def test_bf16_is_close_to_fp32():
    tiled, _ = _pair(3, torch.bfloat16)
    _, plain = _pair(1, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, HIDDEN, generator=g)
    grad_out = torch.randn(2, 11, HIDDEN, generator=g)
    got = _run(tiled, x.bfloat16(), grad_out.bfloat16())
    want = _run(plain, x, grad_out)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    _assert_same(got[0].float(), want[0], 3e-2)
    _assert_same(got[1].float(), want[1], 3e-2)
    for name in want[2]:
        _assert_same(got[2][name].float(), want[2][name], 3e-2)


def test_tile_counts():
    assert resolve_mlp_tiles("auto", 4096 * 32, 4096) == 32
    assert resolve_mlp_tiles("auto", 4097, 4096) == 2
    assert resolve_mlp_tiles(5, 3, 4096) == 3  # never an empty tile
    assert resolve_mlp_tiles(1, 10**6, 4096) == 1
    bounds = tile_bounds(26, 7)
    sizes = [b.stop - b.start for b in bounds]
    assert len(bounds) == 7 and sum(sizes) == 26 and max(sizes) - min(sizes) <= 1
    assert bounds[0].start == 0 and all(a.stop == b.start for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("value", ["0", "-2", "many", "true", "1.5"])
def test_bad_tile_setting_names_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.mlp_tiles.*whole number >= 1 or 'auto'"):
        load_config(None, [f"model.mlp_tiles={value}"])
    assert load_config(None, ["model.mlp_tiles=4"]).model.mlp_tiles == 4
    assert load_config(None, []).model.mlp_tiles == 1  # untiled unless a config asks (long sequences)
