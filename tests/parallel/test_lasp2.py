"""LASP-2 (and the LASP-1 baseline) against the fp64 quadratic reference: forward and dq/dk/dv."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longloom.attention.reference import reference_linear_attention
from longloom.parallel.lasp2 import lasp1_linear_attention, lasp2_linear_attention
from longloom.parallel.sharding import shard_sequence, unshard_tensors

TOLERANCE = 2e-5  # max abs error relative to the largest reference value (fp32 inputs)
BATCH, SEQ, HEADS, DIM_K, DIM_V = 2, 288, 2, 8, 6  # 288 = 16 x 18: zigzag over 8 ranks works


def _inputs(seed: int, seq: int = SEQ, with_decay: bool = True):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(BATCH, seq, HEADS, DIM_K, generator=generator) for _ in range(2))
    v = torch.randn(BATCH, seq, HEADS, DIM_V, generator=generator)
    grad_out = torch.randn(BATCH, seq, HEADS, DIM_V, generator=generator)
    # One head without decay, one whose decay over a chunk (0.97 ** 18 ~ 0.58) still matters.
    decay = torch.tensor([1.0, 0.97]) if with_decay else None
    return q, k, v, grad_out, decay


def _reference(q, k, v, grad_out, decay):
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = reference_linear_attention(*leaves, None if decay is None else decay.double())
    out.backward(grad_out.double())
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _assert_close(results, expected, names=("out", "dq", "dk", "dv")):
    for name, got, want in zip(names, results, expected):
        scale = want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= TOLERANCE * scale, f"{name}: max abs error {error:.3g} vs scale {scale:.3g}"


def _lasp2_worker(seed: int, with_decay: bool, layout: str, backend: str | None = None):
    q, k, v, grad_out, decay = _inputs(seed, with_decay=with_decay)
    group = dist.group.WORLD
    q, k, v, grad_out = (shard_sequence(x, 1, group, layout) for x in (q, k, v, grad_out))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = lasp2_linear_attention(q, k, v, group, decay=decay, layout=layout, backend=backend)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("with_decay", [False, True])
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_lasp2_matches_reference(distributed, world_size, with_decay, layout):
    per_rank = distributed(world_size, _lasp2_worker, 0, with_decay, layout)
    results = [unshard_tensors([rank[i] for rank in per_rank], 1, layout) for i in range(4)]
    _assert_close(results, _reference(*_inputs(0, with_decay=with_decay)))


@pytest.mark.parametrize("backend", ["triton", "triton-blocks"])
def test_lasp2_triton_local_scan_matches_reference(distributed, backend):
    """The CUDA paths (Triton scan, or the block-parallel kernels; here in interpreter mode) inside LASP-2,
    at a tiny size: incoming states from the other rank's zigzag chunks, outgoing state gradients."""
    pytest.importorskip("triton")
    per_rank = distributed(2, _tiny_triton_worker, backend)
    results = [unshard_tensors([rank[i] for rank in per_rank], 1, "zigzag") for i in range(4)]
    q, k, v, grad_out, decay = _tiny_inputs()
    _assert_close(results, _reference(q, k, v, grad_out, decay))


def _tiny_inputs():
    generator = torch.Generator().manual_seed(3)
    q, k, v, grad_out = (torch.randn(1, 24, 2, 4, generator=generator) for _ in range(4))
    return q, k, v, grad_out, torch.tensor([0.9, 1.0])


def _tiny_triton_worker(backend):
    q, k, v, grad_out, decay = _tiny_inputs()
    group = dist.group.WORLD
    q, k, v, grad_out = (shard_sequence(x, 1, group, "zigzag") for x in (q, k, v, grad_out))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = lasp2_linear_attention(q, k, v, group, decay=decay, layout="zigzag", backend=backend)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_single_device(layout):
    q, k, v, grad_out, decay = _inputs(1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = lasp2_linear_attention(*leaves, None, decay=decay, layout=layout)
    out.backward(grad_out)
    _assert_close([out.detach()] + [leaf.grad for leaf in leaves], _reference(q, k, v, grad_out, decay))


def test_default_backend_is_the_block_kernels_on_cuda_up_to_head_dim_128_and_torch_on_cpu(monkeypatch):
    # The policy alone (no GPU here): None resolves by the input's device, a named backend is kept.
    from types import SimpleNamespace

    from longloom.parallel import lasp2

    def query(is_cuda: bool, head_dim: int) -> SimpleNamespace:
        return SimpleNamespace(is_cuda=is_cuda, size=lambda dim: {-1: head_dim}[dim])

    monkeypatch.setattr(lasp2, "_triton_available", lambda: True)
    on_gpu, on_cpu = query(True, 128), query(False, 128)
    assert lasp2.resolve_backend(on_gpu, None) == "triton-blocks"
    assert lasp2.resolve_backend(on_cpu, None) == "torch"
    assert [lasp2.resolve_backend(on_gpu, name) for name in lasp2.BACKENDS] == list(lasp2.BACKENDS)
    # Heads wider than the block kernels were measured at keep the scan (q's or v's width).
    assert lasp2.resolve_backend(query(True, 256), None) == "triton"
    assert lasp2.resolve_backend(on_gpu, None, head_dim_v=192) == "triton"
    monkeypatch.setattr(lasp2, "_triton_available", lambda: False)
    assert lasp2.resolve_backend(on_gpu, None) == "torch"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_single_device_runs_one_scan_forward_and_three_backward(monkeypatch, layout):
    """The states-only and dual scans only carry state between ranks: one device skips them."""
    from longloom.parallel import lasp2

    calls = []

    def counting_scan(*args, **kwargs):
        calls.append(args[0] is None)  # True: a states-only scan (no queries)
        return lasp2.chunked_linear_scan.__wrapped_scan__(*args, **kwargs)

    counting_scan.__wrapped_scan__ = lasp2.chunked_linear_scan
    monkeypatch.setattr(lasp2, "chunked_linear_scan", counting_scan)
    q, k, v, grad_out, decay = _inputs(3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = lasp2_linear_attention(*leaves, None, decay=decay, layout=layout, backend="torch")
    assert calls == [False]
    out.backward(grad_out)
    assert calls == [False] * 4
    _assert_close([out.detach()] + [leaf.grad for leaf in leaves], _reference(q, k, v, grad_out, decay))


def _lasp1_worker(seed: int):
    q, k, v, grad_out, decay = _inputs(seed)
    group = dist.group.WORLD
    q, k, v, grad_out = (shard_sequence(x, 1, group) for x in (q, k, v, grad_out))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = lasp1_linear_attention(q, k, v, group, decay=decay)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def test_lasp1_baseline_matches_reference(distributed):
    per_rank = distributed(4, _lasp1_worker, 2)
    results = [unshard_tensors([rank[i] for rank in per_rank], 1, "contiguous") for i in range(4)]
    _assert_close(results, _reference(*_inputs(2)))


_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "barrier",
)


def _counting_worker(layout: str):
    """Runs LASP-2 at two sequence lengths with every torch.distributed collective wrapped."""
    calls: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append((name, max((t.numel() for t in tensors), default=0)))
            return function(*args, **kwargs)

        return wrapper

    for name, function in originals.items():
        setattr(dist, name, counted(name, function))
    try:
        counts = []
        for seq in (96, 192):
            q, k, v, grad_out, decay = _inputs(4, seq=seq)
            group = dist.group.WORLD
            q, k, v, grad_out = (shard_sequence(x, 1, group, layout) for x in (q, k, v, grad_out))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            calls.clear()
            out = lasp2_linear_attention(q, k, v, group, decay=decay, layout=layout)
            forward_calls = list(calls)
            calls.clear()
            out.backward(grad_out)
            counts.append((forward_calls, list(calls)))
        return counts
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_one_all_gather_each_way_independent_of_length(distributed, layout):
    for counts in distributed(4, _counting_worker, layout):
        (short_forward, short_backward), (long_forward, long_backward) = counts
        for calls in (short_forward, short_backward, long_forward, long_backward):
            assert len(calls) == 1 and calls[0][0].startswith("all_gather"), calls
        # The exchanged states are d_k x d_v per head and chunk: the same at twice the length.
        assert short_forward == long_forward and short_backward == long_backward
        chunks = 2 if layout == "zigzag" else 1
        assert long_forward[0][1] == 4 * BATCH * chunks * HEADS * DIM_K * DIM_V


def test_bad_shapes_name_the_config_key():
    q = torch.zeros(1, 9, 2, 4)
    with pytest.raises(ValueError, match=r"9.*data\.seq_len"):
        lasp2_linear_attention(q, q, q, None, layout="zigzag")
    with pytest.raises(ValueError, match="model.kv_heads"):
        lasp2_linear_attention(q, q[:, :, :1], q, None)
    with pytest.raises(ValueError, match=r"decay must be \[heads\] = \[2\]"):
        lasp2_linear_attention(q, q, q, None, decay=torch.ones(3))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lasp2_linear_attention(q, q, q, None, decay=torch.tensor([0.5, 1.5]))
