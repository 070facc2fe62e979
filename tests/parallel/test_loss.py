import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longloom.parallel.loss import sequence_parallel_cross_entropy
from longloom.parallel.sharding import shard_sequence, unshard_tensors

BATCH, SEQ, HIDDEN, VOCAB = 2, 16, 6, 11
TOLERANCE = 1e-5  # fp32 loss vs fp64 reference, relative to the reference's largest magnitude


def _problem(world_size: int, seed: int, all_ignored: bool = False):
    """hidden [B, S, E], a shared output weight [E, V] and labels with padding; chunk 1 has none valid."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(HIDDEN, VOCAB, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[torch.rand(BATCH, SEQ, generator=g) < 0.3] = -100
    if world_size > 1:
        chunk = SEQ // world_size
        labels[:, chunk : 2 * chunk] = -100  # one rank holds only padding
    if all_ignored:
        labels[:] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = hidden @ weight
    if (labels != -100).any():
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    else:
        loss = logits.sum() * 0.0
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _loss_worker(hidden_full, weight_full, labels_full, dtype):
    group = dist.group.WORLD
    hidden = shard_sequence(hidden_full, 1, group).to(dtype).requires_grad_()
    weight = weight_full.to(dtype).requires_grad_()
    labels = shard_sequence(labels_full, 1, group)
    loss, stats = sequence_parallel_cross_entropy(hidden @ weight, labels, group, chunk_tokens=5)
    loss.backward()
    return (
        loss.detach().double(),
        stats.loss.double(),
        int(stats.tokens),
        hidden.grad.double(),
        weight.grad.double(),
    )


def _assert_close(got, want, what):
    scale = max(want.abs().max().item(), 1e-30)
    error = (got - want).abs().max().item()
    assert error <= TOLERANCE * scale, f"{what}: max abs error {error:.3e} > {TOLERANCE:.0e} x {scale:.3e}"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_averaged_gradients_equal_single_device_mean_loss(distributed, world_size):
    hidden, weight, labels = _problem(world_size, seed=world_size)
    want_loss, want_hidden_grad, want_weight_grad = _reference(hidden, weight, labels)
    results = distributed(world_size, _loss_worker, hidden, weight, labels, torch.float32)
    losses, mean_losses, tokens, hidden_grads, weight_grads = zip(*results)
    count = int((labels != -100).sum())
    assert all(t == count for t in tokens)
    for mean in mean_losses:
        _assert_close(mean, want_loss, "stats.loss")
    # The backward losses are local_sum / count * W: their mean over ranks is the global mean.
    _assert_close(torch.stack(losses).mean(), want_loss, "mean of loss_for_backward")
    # DeepSpeed averages parameter gradients over the W ranks.
    _assert_close(torch.stack(weight_grads).mean(0), want_weight_grad, "averaged weight grad")
    # An activation gradient is W x its share, so that the parameters upstream average correctly.
    _assert_close(
        unshard_tensors(list(hidden_grads), 1, "contiguous") / world_size, want_hidden_grad, "hidden grad"
    )
    if world_size > 1:
        assert losses[1] == 0 and not hidden_grads[1].any()  # the all-padding rank: zero, not NaN


def test_no_valid_label_anywhere_gives_zero_loss(distributed):
    hidden, weight, labels = _problem(2, seed=3, all_ignored=True)
    for loss, mean, tokens, hidden_grad, weight_grad in distributed(
        2, _loss_worker, hidden, weight, labels, torch.float32
    ):
        assert loss == 0 and mean == 0 and tokens == 0
        assert not hidden_grad.any() and not weight_grad.any()


def test_bf16_logits_are_reduced_in_fp32():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 40, 257, generator=g) * 4).bfloat16().requires_grad_()
    labels = torch.randint(0, 257, (3, 40), generator=g)
    labels[0, :7] = -100
    loss, stats = sequence_parallel_cross_entropy(logits, labels, None, chunk_tokens=17)
    loss.backward()
    upcast = logits.detach().float().requires_grad_()
    want = F.cross_entropy(upcast.view(-1, 257), labels.view(-1), ignore_index=-100)
    want.backward()
    # The same fp32 math summed in a different order: far closer than a bf16 reduction could be.
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    assert abs(stats.loss.item() - want.item()) <= 1e-6 * want.item() and int(stats.tokens) == 113
    assert logits.grad.dtype == torch.bfloat16
    # The fp32 gradient rounded once to bf16 (a bf16 softmax would be off by far more).
    error = (logits.grad.float() - upcast.grad).abs()
    assert (error <= upcast.grad.abs() * 2**-8 + 1e-12).all(), error.max()


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 13, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (50,), generator=g).masked_fill_(torch.rand(50, generator=g) < 0.2, -100)
    results = []
    for chunk_tokens in (1, 7, 50, 4096):
        logits.grad = None
        loss, _ = sequence_parallel_cross_entropy(logits, labels, None, chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), logits.grad.clone()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=0)
        assert torch.equal(grad, results[0][1])  # per-token gradients do not depend on the chunking


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="disagree"):
        sequence_parallel_cross_entropy(torch.randn(2, 8, 5), torch.zeros(2, 7, dtype=torch.long), None)
