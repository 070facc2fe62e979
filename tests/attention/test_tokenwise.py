"""Token-wise attention recomputation (attention/tokenwise.py) with activation offload, through the real model: same loss and gradients as plain
checkpointing, and backward recomputes attention for the unkept queries only.

fp64, so that "same" can be tight: the recomputed path runs attention through attention/blocks.py while
plain checkpointing uses torch SDPA, which differ by rounding only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from longloom.attention.tokenwise import LocalCausalSchedule
from longloom.models import llama
from longloom.models.llama import LlamaModel, plain_checkpoint
from longloom.offload.activations import ActivationOffloader, HostCopy
from longloom.parallel import ParallelDims
from longloom.parallel.tokenring import TokenRingSchedule
from tests.models.tiny import tiny_model_config

SEQ = 32


def _batch(dims: ParallelDims | None, documents: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 61, (2, SEQ), generator=generator)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    batch = {"tokens": tokens, "position_ids": torch.arange(SEQ).repeat(2, 1), "labels": labels}
    if documents:  # packed documents: 3, 1, 13 and 15 tokens (boundaries inside shards and on none)
        batch["document_ids"] = torch.tensor([0] * 3 + [1] + [2] * 13 + [3] * 15).repeat(2, 1)
    return dims.shard_batch(batch) if dims is not None else batch


def _loss_and_grads(
    pattern: str,
    checkpoint_fn,
    dims: ParallelDims | None = None,
    steps: int = 2,
    mlp_tiles: int = 1,
    documents: bool = False,
):
    """Per step: the loss and every parameter gradient (two steps: the pool's buffers get reused)."""
    torch.manual_seed(0)
    model = LlamaModel(
        tiny_model_config(pattern, mlp_tiles=mlp_tiles), dims, checkpoint_fn=checkpoint_fn
    ).double()
    group = dims.sp_group if dims is not None else None
    results = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        batch = _batch(dims, documents)
        loss, _ = model(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            loss_group=group,
            document_ids=batch.get("document_ids"),
        )
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    return results


def _assert_same(expected, actual, fp32_merges: bool = False) -> None:
    """Equal to fp64 rounding; `fp32_merges`: to the rounding of the ring's fp32 accumulators, which with
    documents see recomputed blocks of other shapes (a masked row's extra -inf scores change the fp64
    reduction order, and an fp32 cast can round the other way)."""
    rtol, atol = (1e-5, 1e-8) if fp32_merges else (1e-9, 1e-12)
    for (want_loss, want_grads), (got_loss, got_grads) in zip(expected, actual, strict=True):
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-7 if fp32_merges else 1e-12, atol=0)
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=rtol, atol=atol, msg=name)


def _spy_on_schedules() -> tuple[list[tuple[str, int]], Callable[[], None]]:
    """(calls, undo): every schedule forward the token-wise path runs, as (schedule, query rows)."""
    calls: list[tuple[str, int]] = []
    originals = {schedule: schedule.forward for schedule in (LocalCausalSchedule, TokenRingSchedule)}

    def spying(schedule, original):
        def forward(self, q, k, v, query_rows):
            calls.append((schedule.__name__, query_rows))
            return original(self, q, k, v, query_rows)

        return forward

    for schedule, original in originals.items():
        schedule.forward = spying(schedule, original)

    def undo() -> None:
        for schedule, original in originals.items():
            schedule.forward = original

    return calls, undo


@pytest.fixture
def schedule_calls() -> list[tuple[str, int]]:
    """Every schedule forward of the token-wise path (first passes and recomputations) in this test."""
    calls, undo = _spy_on_schedules()
    yield calls
    undo()


@pytest.mark.parametrize("share,kept", [(1.0, SEQ), (0.5, SEQ // 2), (0.3, round(0.3 * SEQ))])
def test_offload_equals_plain_checkpoint_and_recomputes_unkept_queries(share, kept, schedule_calls):
    expected = _loss_and_grads("SSS", plain_checkpoint)
    offloader = ActivationOffloader(share, torch.device("cpu"))
    _assert_same(expected, _loss_and_grads("SSS", offloader.checkpoint))
    # Per step: the first two layers' full forwards, then in backward their first SEQ - kept queries.
    # The last layer (kept on the device, recomputed in full) takes plain SDPA.
    recomputed = [SEQ - kept] * 2 if kept < SEQ else []
    assert [rows for _, rows in schedule_calls] == ([SEQ] * 2 + recomputed) * 2
    # Two swapped layers, each: input [2, 32, 32] plus the kept tokens' out [2, kept, 4, 8] and lse
    # [2, 4, kept], fp64.
    assert offloader.swapped_bytes == 2 * (2 * SEQ * 32 + 2 * kept * 32 + 2 * 4 * kept) * 8
    assert offloader.pool.num_buffers == 2 * 3, "input, out and lse per swapped layer, reused in step 2"


@pytest.mark.parametrize("share,device_share", [(0.25, 0.5), (0.25, 0.75)])
def test_device_kept_outputs_equal_plain_checkpoint(share, device_share, schedule_calls, monkeypatch):
    """offload.device_activations: the kept tokens' outputs split between the device and the host; the
    loss and every gradient as plain checkpointing, and attention recomputed for the other tokens only."""
    expected = _loss_and_grads("SSS", plain_checkpoint)
    plain_attention_calls = []
    plain_attention = llama.sdpa_attention

    def counted_plain_attention(*args, **kwargs):
        plain_attention_calls.append(1)
        return plain_attention(*args, **kwargs)

    monkeypatch.setattr(llama, "sdpa_attention", counted_plain_attention)
    offloader = ActivationOffloader(share, torch.device("cpu"), device_share=device_share)
    _assert_same(expected, _loss_and_grads("SSS", offloader.checkpoint))
    kept, swapped = round((share + device_share) * SEQ), round(share * SEQ)  # exact for these shares
    # Per step: the three layers' full forwards (the last layer keeps its kept tokens on the device
    # too), then in backward the first SEQ - kept queries of each, last layer first; nothing more.
    recomputed = [SEQ - kept] * 3 if kept < SEQ else []
    assert [rows for _, rows in schedule_calls] == ([SEQ] * 3 + recomputed) * 2
    assert plain_attention_calls == [], "no layer runs (or recomputes) attention outside the token-wise path"
    # out [2, tokens, 4, 8] and lse [2, 4, tokens], fp64: the first two layers swap `swapped` tokens and
    # keep the others of `kept` on the device; the last keeps all `kept` on the device.
    per_token = 2 * 4 * (8 + 1) * 8
    assert offloader.swapped_bytes == 2 * (2 * SEQ * 32 * 8 + swapped * per_token)
    assert offloader.device_kept_bytes == (2 * (kept - swapped) + kept) * per_token


def test_linear_attention_layers_swap_their_input_and_recompute_in_full(schedule_calls):
    expected = _loss_and_grads("LSL", plain_checkpoint)
    offloader = ActivationOffloader(0.5, torch.device("cpu"))
    _assert_same(expected, _loss_and_grads("LSL", offloader.checkpoint))
    assert [rows for _, rows in schedule_calls] == [SEQ, SEQ // 2] * 2, "only the softmax layer is token-wise"


def test_offload_with_the_tiled_mlp(schedule_calls):
    expected = _loss_and_grads("SS", plain_checkpoint, mlp_tiles=1)
    offloader = ActivationOffloader(0.5, torch.device("cpu"))
    _assert_same(expected, _loss_and_grads("SS", offloader.checkpoint, mlp_tiles=3))
    assert [rows for _, rows in schedule_calls] == [SEQ, SEQ // 2] * 2


def _sharded_worker(
    pattern: str, ulysses: int, ring: int, share: float, documents: bool = False, device_share: float = 0.0
):
    """Asserts the same results as plain checkpointing under this split; returns the schedule calls."""
    dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    expected = _loss_and_grads(pattern, plain_checkpoint, dims, documents=documents)
    calls, undo = _spy_on_schedules()
    try:
        offloader = ActivationOffloader(share, torch.device("cpu"), device_share=device_share)
        got = _loss_and_grads(pattern, offloader.checkpoint, dims, documents=documents)
        _assert_same(expected, got, fp32_merges=documents and ring > 1)
    finally:
        undo()
    return calls


@pytest.mark.parametrize(
    "world,ulysses,ring,device_share",
    [(2, 2, 1, 0.25), (4, 4, 1, 0.0), (2, 1, 2, 0.25), (4, 2, 2, 0.0), (4, 1, 4, 0.0)],
)
def test_offload_under_sequence_parallelism(distributed, world, ulysses, ring, device_share):
    """Half of the tokens kept: all on the host, or (offload.device_activations) half of those on the device."""
    results = distributed(
        world, _sharded_worker, "SS", ulysses, ring, 0.5 - device_share, False, device_share
    )
    # Token-wise where the attention runs: on the whole sequence after Ulysses' all-to-all (SEQ tokens,
    # this rank's heads), or round the ring on this rank's SEQ / ring tokens, half of them recomputed.
    # With a device share the last layer is token-wise too (its kept tokens stay on the device).
    tokens = SEQ // ring
    schedule = "LocalCausalSchedule" if ring == 1 else "TokenRingSchedule"
    layers = 2 if device_share else 1
    step = [(schedule, tokens)] * layers + [(schedule, tokens // 2)] * layers
    assert results == [step * 2] * world


@pytest.mark.parametrize("world,ulysses,ring", [(2, 2, 1), (4, 2, 2)])
def test_offload_with_packed_documents_recomputes_within_documents(distributed, world, ulysses, ring):
    """The recomputed queries see their own documents only, as on the first pass (Ulysses, 2D)."""
    results = distributed(world, _sharded_worker, "SS", ulysses, ring, 0.5, True)
    schedule = "LocalCausalSchedule" if ring == 1 else "TokenRingSchedule"
    assert results == [[(schedule, SEQ // ring), (schedule, SEQ // ring // 2)] * 2] * world
    # And the documents changed the result: equal only to itself, not to unmasked attention.
    assert not torch.allclose(_loss_and_grads("SS", plain_checkpoint, documents=True)[0][0],
                              _loss_and_grads("SS", plain_checkpoint)[0][0])  # fmt: skip


class LoadRecordingOffloader(ActivationOffloader):
    """Notes, for every swapped tensor, whether its copy back had started before backward needed it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready_when_needed: list[bool] = []

    def _load(self, stored):
        if isinstance(stored, HostCopy):
            self.ready_when_needed.append(stored.prefetch.tensor is not None)
        return super()._load(stored)


def test_every_swapped_tensor_is_prefetched_before_it_is_needed():
    offloader = LoadRecordingOffloader(0.5, torch.device("cpu"))
    _loss_and_grads("SSSS", offloader.checkpoint)
    # 3 swapped layers x (input, out, lse) x 2 steps; the earlier layers' copies start during the
    # attention backward of the layer above, the first one's when the last layer's recomputation begins.
    assert offloader.ready_when_needed == [True] * 3 * 3 * 2
