"""The model on one device, and sharded over SP ranks: same loss and same gradients as P=1."""

import pytest
import torch

from longloom.models.llama import LlamaModel
from longloom.parallel import ParallelDims
from longloom.parallel.loss import sequence_parallel_cross_entropy
from tests.models.tiny import tiny_model_config


def _batch(seq: int = 32, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (batch, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # some ignored labels, unevenly spread over shards
    # two documents in the second sample: positions restart
    positions = torch.arange(seq).repeat(batch, 1)
    positions[1, seq // 3 :] -= seq // 3
    return {"tokens": tokens, "position_ids": positions, "labels": labels}


def _single_device(pattern: str, checkpointing: bool = True):
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(pattern, activation_checkpointing=checkpointing))
    batch = _batch()
    logits = model(batch["tokens"], batch["position_ids"])
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100
    )
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("pattern", ["S", "L", "LS"])
def test_forward_backward_and_checkpointing_agree(pattern):
    loss, grads = _single_device(pattern, checkpointing=True)
    loss_plain, grads_plain = _single_device(pattern, checkpointing=False)
    assert torch.isfinite(loss) and loss > 0
    assert torch.equal(loss, loss_plain)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, grads_plain[name], rtol=0, atol=1e-7)


def test_model_is_causal():
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config("LS")).eval()
    batch = _batch()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"])
        tokens = batch["tokens"].clone()
        tokens[:, 20:] = (tokens[:, 20:] + 1) % 61
        changed = model(tokens, batch["position_ids"])
    assert torch.equal(logits[:, :20], changed[:, :20])
    assert not torch.equal(logits[:, 20:], changed[:, 20:])


def _sharded_worker(pattern: str, dp: int, ulysses: int, ring: int):
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(pattern), dims)
    batch = dims.shard_batch(_batch())
    logits = model(batch["tokens"], batch["position_ids"])
    loss, stats = sequence_parallel_cross_entropy(logits, batch["labels"], group=dims.sp_group)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        torch.distributed.all_reduce(p.grad, group=dims.sp_group)
        grads[name] = p.grad / dims.sp  # what DeepSpeed's averaging over the SP ranks gives
    return float(stats.loss), grads


@pytest.mark.parametrize(
    "pattern,world,ulysses,ring",
    [
        ("S", 2, 2, 1),
        ("S", 4, 4, 1),
        ("S", 2, 1, 2),
        ("S", 4, 2, 2),
        ("LS", 2, 2, 1),
        ("LS", 4, 2, 2),
        ("L", 4, 1, 4),
    ],
)
def test_sequence_parallel_model_equals_single_device(distributed, pattern, world, ulysses, ring):
    loss, grads = _single_device(pattern)
    results = distributed(world, _sharded_worker, pattern, 1, ulysses, ring)
    for rank_loss, rank_grads in results:
        torch.testing.assert_close(torch.tensor(rank_loss), loss, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            scale = grad.abs().max().clamp(min=1e-6)
            torch.testing.assert_close(rank_grads[name] / scale, grad / scale, rtol=0, atol=2e-5, msg=name)
