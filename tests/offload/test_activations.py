"""Activation offload: identical results to plain checkpointing, a pool that stops growing, prefetch order.

The layers here are a small stand-in for the decoder layer (norm, projection, gate, residual, RoPE-like
tables passed as extra inputs) so the tests do not depend on the attention modules; the end-to-end
equality through the trainer lives in test_training_offload.py.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from longloom.offload.activations import ActivationOffloader, HostCopy

HIDDEN = 16


def plain_checkpoint(layer: nn.Module, *inputs: torch.Tensor, is_last_layer: bool = False) -> torch.Tensor:
    """The model's default checkpoint_fn (models/llama.py), repeated so these tests need no attention code."""
    return checkpoint(layer, *inputs, use_reentrant=False)


class ToyLayer(nn.Module):
    """Norm -> (optionally SP-mixed) projection -> gate -> residual; uses cos/sin like a decoder layer."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN)
        self.proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.out = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.group = group

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_outputs=None
    ) -> torch.Tensor:
        # attention_outputs: no softmax attention here (tests/offload/test_tokenwise_attention.py).
        x = self.norm(hidden) * cos + hidden.flip(-1) * sin
        if self.group is not None:
            # A collective inside the layer, as SP attention has: must re-run in the same order in backward.
            gathered = torch.cat(dist_fn.all_gather(x, group=self.group), dim=1)
            x = x + gathered.mean(dim=1, keepdim=True)
        gate, up = self.proj(x).chunk(2, dim=-1)
        return hidden + self.out(torch.nn.functional.silu(gate) * up)


class ToyStack(nn.Module):
    def __init__(self, layers: int, checkpoint_fn, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.embed = nn.Linear(8, HIDDEN)
        self.layers = nn.ModuleList(ToyLayer(group) for _ in range(layers))
        self.checkpoint_fn = checkpoint_fn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            hidden = self.checkpoint_fn(layer, hidden, cos, sin, is_last_layer=index == last)
        return hidden


def _inputs(seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq, 8, generator=generator)
    angles = torch.randn(1, seq, 1, generator=generator)
    return x, angles.cos(), angles.sin()


def _train_steps(checkpoint_fn, steps: int, seq: int = 12, layers: int = 4, group=None, on_step=None, seed=0):
    """Runs `steps` forward/backward passes; returns outputs and all gradients of every step."""
    torch.manual_seed(0)
    model = ToyStack(layers, checkpoint_fn, group)
    results = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        x, cos, sin = _inputs(seq, seed=seed + step)
        x.requires_grad_(True)
        out = model(x, cos, sin)
        (out.square().mean() + out.sum() * 1e-3).backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()])
        if on_step is not None:
            on_step(step)
    return results


def _assert_bitwise(expected: list, actual: list) -> None:
    for step, (want_step, got_step) in enumerate(zip(expected, actual)):
        for index, (want, got) in enumerate(zip(want_step, got_step)):
            assert torch.equal(want, got), f"step {step}, tensor {index}: max diff {(want - got).abs().max()}"


@pytest.mark.parametrize("share", [1.0, 0.5, 0.3])
def test_offload_equals_plain_checkpoint_bitwise(share: float) -> None:
    expected = _train_steps(plain_checkpoint, steps=2)
    offloader = ActivationOffloader(share, torch.device("cpu"))
    actual = _train_steps(offloader.checkpoint, steps=2)
    _assert_bitwise(expected, actual)
    # Every layer but the last swapped its whole [2, 12, 16] fp32 input, whatever the share (the share
    # is of attention outputs, which these layers do not have).
    assert offloader.swapped_bytes == 3 * 2 * 12 * HIDDEN * 4


@pytest.mark.parametrize("device_layers", [1, 2, 5])
def test_device_layers_keep_their_inputs_and_change_nothing_else(device_layers: int) -> None:
    # The first device_layers layers of each forward keep their input on the device; 2 steps check the
    # count restarts with each forward. 5 (more than the 3 swapping layers): nothing goes to the host.
    expected = _train_steps(plain_checkpoint, steps=2)
    offloader = ActivationOffloader(1.0, torch.device("cpu"), device_layers=device_layers)
    actual = _train_steps(offloader.checkpoint, steps=2)
    _assert_bitwise(expected, actual)
    assert offloader.swapped_bytes == max(0, 3 - device_layers) * 2 * 12 * HIDDEN * 4
    with pytest.raises(ValueError, match="device_layers must be >= 0, got -1"):
        ActivationOffloader(1.0, torch.device("cpu"), device_layers=-1)


def test_pool_is_reused_not_grown_across_steps() -> None:
    offloader = ActivationOffloader(1.0, torch.device("cpu"))
    sizes: dict[int, tuple[int, int]] = {}
    in_use_after_backward, allocation_seconds = [], []

    def record(step: int) -> None:
        gc.collect()
        sizes[step + 1] = (offloader.pool.total_bytes, offloader.pool.num_buffers)
        allocation_seconds.append(offloader.pool.allocation_seconds)
        in_use_after_backward.append(offloader.pool.bytes_in_use)

    _train_steps(offloader.checkpoint, steps=5, layers=4, on_step=record)
    assert sizes[2] == sizes[5], sizes
    assert sizes[1][1] == 3, "the last of 4 layers keeps its input on the device; the other 3 use the pool"
    assert in_use_after_backward == [0] * 5, "every buffer goes back to the pool after backward"
    assert offloader.pool.peak_bytes_in_use == offloader.pool.total_bytes
    # Buffers are created (pinned, on GPU) in the first step only: its time stops growing after it.
    assert allocation_seconds[0] > 0 and allocation_seconds[1:] == [allocation_seconds[0]] * 4


def test_abandoned_graph_returns_buffers() -> None:
    offloader = ActivationOffloader(1.0, torch.device("cpu"))
    model = ToyStack(3, offloader.checkpoint)
    x, cos, sin = _inputs(12)
    out = model(x, cos, sin)
    assert offloader.pool.bytes_in_use > 0
    del out
    gc.collect()
    assert offloader.pool.bytes_in_use == 0


class RecordingOffloader(ActivationOffloader):
    """Notes, for each swapped input, whether its copy back had started before backward needed it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready_when_needed: list[bool] = []

    def _unpack(self, packed):
        swapped_input = getattr(packed, "input", None)
        if isinstance(swapped_input, HostCopy):
            self.ready_when_needed.append(swapped_input.prefetch.tensor is not None)
        return super()._unpack(packed)


def test_backward_prefetches_one_layer_ahead() -> None:
    offloader = RecordingOffloader(1.0, torch.device("cpu"))
    _train_steps(offloader.checkpoint, steps=2, layers=5)
    # 4 swapped inputs per step, each already on its way back when its layer's recomputation began.
    assert offloader.ready_when_needed == [True] * 8


def test_share_out_of_range_names_the_config_key() -> None:
    with pytest.raises(ValueError, match="offload.activations"):
        ActivationOffloader(1.5, torch.device("cpu"))
    with pytest.raises(ValueError, match="offload.activations"):
        ActivationOffloader(0.0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"offload.device_activations=0.6 .* offload.activations=0.5"):
        ActivationOffloader(0.5, torch.device("cpu"), device_share=0.6)
    with pytest.raises(ValueError, match=r"offload.device_activations=-0.1"):
        ActivationOffloader(0.5, torch.device("cpu"), device_share=-0.1)
    ActivationOffloader(0.25, torch.device("cpu"), device_share=0.75)  # together all the tokens: fine


def _sequence_parallel_worker(share: float) -> list[list[torch.Tensor]]:
    group = dist.new_group(list(range(dist.get_world_size())))
    rank = dist.get_rank()
    expected = _train_steps(plain_checkpoint, steps=2, group=group, seed=10 * rank)
    offloader = ActivationOffloader(share, torch.device("cpu"))
    actual = _train_steps(offloader.checkpoint, steps=2, group=group, seed=10 * rank)
    _assert_bitwise(expected, actual)
    return [[tensor.sum() for tensor in step] for step in actual] + [[torch.tensor(float(rank))]]


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_offload_with_collectives_inside_layers(distributed, share: float) -> None:
    results = distributed(2, _sequence_parallel_worker, share)
    assert [result[-1][0].item() for result in results] == [0.0, 1.0]


def test_host_memory_exhaustion_names_the_pool_and_the_fix(monkeypatch) -> None:
    offloader = ActivationOffloader(1.0, torch.device("cpu"))
    offloader.pool.acquire(1000)  # one buffer in the pool already
    real_empty = torch.empty

    def refusing_empty(*args, **kwargs):
        if kwargs.get("dtype") == torch.uint8:
            raise RuntimeError("out of host memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refusing_empty)
    with pytest.raises(
        RuntimeError, match=r"allocate 0.00 GiB .* 0.00 GiB already .* lower offload.activations"
    ):
        offloader.pool.acquire(5000)


def test_first_step_reads_ahead_on_the_pool_thread_without_growing_the_pool(monkeypatch) -> None:
    """With the layers' kinds the first step page-locks the next layer's buffers on the pool's thread:
    same results bit for bit, and the pool ends with exactly the buffers it has without reading ahead.
    Each layer starts once the pool's thread is done, as a GPU run's host waits between layers (ZeRO-3
    gathers the next layer's weights, kernels are queued ahead)."""
    import threading
    import time

    from longloom.offload import host_pool

    made_on: list[str] = []

    class Recorded(host_pool.HostBuffer):
        def __init__(self, capacity, pin, device=None):
            made_on.append(threading.current_thread().name)
            super().__init__(capacity, pin, device)

    monkeypatch.setattr(host_pool, "HostBuffer", Recorded)
    expected = _train_steps(plain_checkpoint, steps=2, layers=6)
    pools = {}
    for kinds in (None, ["S"] * 6):
        made_on.clear()
        offloader = ActivationOffloader(1.0, torch.device("cpu"), layer_kinds=kinds)

        def waiting_checkpoint(layer, *inputs, offloader=offloader, **options):
            deadline = time.monotonic() + 5  # the host's wait, long enough for the pool's thread
            while (offloader.pool._expected or offloader.pool._being_made) and time.monotonic() < deadline:
                time.sleep(0.001)
            return offloader.checkpoint(layer, *inputs, **options)

        _assert_bitwise(expected, _train_steps(waiting_checkpoint, steps=2, layers=6))
        pools[kinds is not None] = (offloader.pool.num_buffers, offloader.pool.total_bytes, list(made_on))
    (plain_count, plain_bytes, plain_threads), (ahead_count, ahead_bytes, ahead_threads) = (
        pools[False],
        pools[True],
    )
    assert (ahead_count, ahead_bytes) == (
        plain_count,
        plain_bytes,
    ) and plain_count == 5  # all but the last layer
    assert set(plain_threads) == {"MainThread"}
    # Layer 0 makes its own; layers 1-4 were made ahead with layer 0's sizes (layer 5, the last, stores
    # nothing on the host).
    assert ahead_threads == ["MainThread"] + ["longloom-host-pool"] * 4, ahead_threads
