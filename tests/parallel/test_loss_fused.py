"""Fused LM head + loss (sequence_parallel_linear_cross_entropy) against the logits path it replaces."""

import pytest
import torch
import torch.distributed as dist

from longloom.models.llama import LlamaModel
from longloom.parallel.loss import sequence_parallel_cross_entropy, sequence_parallel_linear_cross_entropy
from longloom.parallel.sharding import shard_sequence, unshard_tensors
from tests.models.tiny import tiny_model_config

BATCH, SEQ, HIDDEN, VOCAB = 2, 16, 6, 11


def _problem(world_size: int, seed: int, all_ignored: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[torch.rand(BATCH, SEQ, generator=g) < 0.3] = -100
    if world_size > 1:
        labels[:, : SEQ // world_size] = -100  # rank 0 holds only padding
    if all_ignored:
        labels[:] = -100
    return hidden, weight, labels


def _both_paths(hidden, weight, labels, group, chunk_tokens):
    """(loss, stats, hidden grad, weight grad) of the fused path, then of logits + cross entropy."""
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss, stats = sequence_parallel_linear_cross_entropy(
                h, w, labels, group, chunk_tokens=chunk_tokens
            )
        else:
            loss, stats = sequence_parallel_cross_entropy(h @ w.t(), labels, group)
        loss.backward()
        results.append((loss.detach(), stats, h.grad, w.grad))
    return results


def _assert_same(got, want, rtol=1e-6):
    scale = want.abs().max().clamp(min=1e-30)
    assert (got - want).abs().max() <= rtol * scale, ((got - want).abs().max() / scale).item()


def _fused_worker(hidden_full, weight, labels_full, chunk_tokens):
    group = dist.group.WORLD
    hidden = shard_sequence(hidden_full, 1, group)
    labels = shard_sequence(labels_full, 1, group)
    return _both_paths(hidden, weight, labels, group, chunk_tokens)


@pytest.mark.parametrize("world_size,chunk_tokens", [(1, 5), (1, 4096), (2, 3), (4, 1)])
def test_fused_equals_logits_path_over_ranks(distributed, world_size, chunk_tokens):
    hidden, weight, labels = _problem(world_size, seed=world_size)
    results = distributed(world_size, _fused_worker, hidden, weight, labels, chunk_tokens)
    for fused, unfused in results:
        _assert_same(fused[0], unfused[0])
        assert torch.equal(fused[1].tokens, unfused[1].tokens)
        _assert_same(fused[1].loss, unfused[1].loss)
        _assert_same(fused[2], unfused[2])
        _assert_same(fused[3], unfused[3])
    # what DeepSpeed's averaging makes of the weight grads, and the whole hidden grad, agree as well
    _assert_same(
        torch.stack([r[0][3] for r in results]).mean(0), torch.stack([r[1][3] for r in results]).mean(0)
    )
    fused_hidden = unshard_tensors([r[0][2] for r in results], 1, "contiguous")
    _assert_same(fused_hidden, unshard_tensors([r[1][2] for r in results], 1, "contiguous"))
    if world_size > 1:
        assert results[0][0][0] == 0 and not results[0][0][2].any()  # the all-padding rank: zero, not NaN


def test_no_valid_label_gives_zero_loss_and_grads():
    hidden, weight, labels = _problem(1, seed=3, all_ignored=True)
    (loss, stats, hidden_grad, weight_grad), _ = _both_paths(hidden, weight, labels, None, 4)
    assert loss == 0 and stats.loss == 0 and stats.tokens == 0
    assert not hidden_grad.any() and not weight_grad.any()


def test_chunking_does_not_change_the_result():
    hidden, weight, labels = _problem(1, seed=5)
    hidden, weight = hidden.double(), weight.double()
    results = [_both_paths(hidden, weight, labels, None, chunk)[0] for chunk in (1, 7, 32, 4096)]
    for loss, _, hidden_grad, weight_grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(hidden_grad, results[0][2], rtol=1e-12, atol=0)
        torch.testing.assert_close(weight_grad, results[0][3], rtol=1e-12, atol=1e-15)


def test_bf16_is_reduced_in_fp32():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 40, 32, generator=g)
    weight = torch.randn(257, 32, generator=g) * 0.5
    labels = torch.randint(0, 257, (3, 40), generator=g)
    labels[0, :7] = -100
    (loss, stats, hidden_grad, weight_grad), _ = _both_paths(
        hidden.bfloat16(), weight.bfloat16(), labels, None, 17
    )
    (_, want_stats, want_hidden, want_weight), _ = _both_paths(hidden, weight, labels, None, 17)
    assert hidden_grad.dtype == torch.bfloat16 and weight_grad.dtype == torch.bfloat16
    assert int(stats.tokens) == int(want_stats.tokens) == 113
    assert abs(stats.loss.item() - want_stats.loss.item()) <= 2e-2 * want_stats.loss.item()
    _assert_same(hidden_grad.float(), want_hidden, 3e-2)
    _assert_same(weight_grad.float(), want_weight, 3e-2)
    # bf16 logits, fp32 reduction: the same result as the unfused head in bf16, up to summation order
    (unfused_loss, _, unfused_hidden, _) = _both_paths(
        hidden.bfloat16(), weight.bfloat16(), labels, None, 17
    )[1]
    assert abs(loss.item() - unfused_loss.item()) <= 1e-6 * unfused_loss.item()
    assert torch.equal(hidden_grad, unfused_hidden)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="disagree"):
        sequence_parallel_linear_cross_entropy(
            torch.randn(2, 8, 5), torch.randn(7, 5), torch.zeros(2, 7, dtype=torch.long), None
        )
    with pytest.raises(ValueError, match="disagree"):
        sequence_parallel_linear_cross_entropy(
            torch.randn(2, 8, 5), torch.randn(7, 4), torch.zeros(2, 8, dtype=torch.long), None
        )
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        sequence_parallel_linear_cross_entropy(
            torch.randn(2, 8, 5), torch.randn(7, 5), torch.zeros(2, 8, dtype=torch.long), None, chunk_tokens=0
        )


def test_model_loss_call_equals_logits_then_loss():
    cfg = tiny_model_config("LS")
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 61, (2, 24), generator=g)
    positions = torch.arange(24).expand(2, 24)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = LlamaModel(cfg)
        if fused:
            loss, stats = model(tokens, positions, labels=labels)
        else:
            loss, stats = sequence_parallel_cross_entropy(model(tokens, positions), labels, None)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad for n, p in model.named_parameters()}))
    (loss, stats, grads), (want_loss, want_stats, want_grads) = results
    _assert_same(loss, want_loss)
    _assert_same(stats.loss, want_stats.loss)
    for name, grad in want_grads.items():
        _assert_same(grads[name], grad)
