"""Packed documents through the model: a packed sample's per-token losses equal each document run alone."""

import pytest
import torch

from longloom.models.llama import LlamaModel
from longloom.offload.activations import ActivationOffloader
from longloom.parallel import ParallelDims
from longloom.parallel.loss import sequence_parallel_cross_entropy
from tests.models.tiny import tiny_model_config
from tests.parallel.documents import packed_batch

LENGTHS = [[5, 1, 12, 14], [20, 3, 9]]  # two packed samples of 32 tokens; a one-token document


def _packed_batch():
    return packed_batch(LENGTHS)


def _token_losses(logits, labels):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")


def _model(pattern, checkpoint_fn=None, **overrides):
    torch.manual_seed(0)
    return LlamaModel(tiny_model_config(pattern, **overrides), checkpoint_fn=checkpoint_fn)


@pytest.mark.parametrize("pattern", ["SL", "LS"])
def test_packed_losses_equal_each_document_alone(pattern):
    model = _model(pattern).eval()
    batch = _packed_batch()
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], document_ids=batch["document_ids"])
        packed_losses = _token_losses(packed, batch["labels"]).view(2, 32)
        without_ids = model(batch["tokens"], batch["position_ids"])
        for row, lengths in enumerate(LENGTHS):
            start = 0
            for length in lengths:
                piece = slice(start, start + length)
                alone = model(batch["tokens"][row : row + 1, piece], torch.arange(length)[None])
                alone_losses = _token_losses(alone, batch["labels"][row : row + 1, piece])
                torch.testing.assert_close(packed_losses[row, piece], alone_losses, rtol=0, atol=1e-5)
                start += length
    # Without ids the later documents see the earlier ones: the check above can fail.
    assert not torch.allclose(packed[0, 6:], without_ids[0, 6:], atol=1e-3)


def _train_grads(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], document_ids=batch["document_ids"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_activation_offload_tokenwise_recompute_keeps_documents():
    """Checkpointed layers with token-wise recomputation replay attention with the same documents."""
    batch = _packed_batch()
    plain_loss, plain = _train_grads(_model("SL", activation_checkpointing=False).train(), batch)
    offloader = ActivationOffloader(0.5, torch.device("cpu"))
    loss, grads = _train_grads(
        _model("SL", offloader.checkpoint, activation_checkpointing=True).train(), batch
    )
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=0, atol=1e-6, msg=name)


def _sharded_worker(pattern, ulysses, ring):
    dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(pattern), dims)
    # As the trainer does: documents reordered for the zigzag layout (under a ring), then sharded.
    batch = dims.shard_batch(dims.balance_documents(_packed_batch()))
    logits = model(batch["tokens"], batch["position_ids"], document_ids=batch["document_ids"])
    loss, stats = sequence_parallel_cross_entropy(logits, batch["labels"], group=dims.sp_group)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        torch.distributed.all_reduce(p.grad, group=dims.sp_group)
        grads[name] = p.grad / dims.sp
    return float(stats.loss), grads


@pytest.mark.parametrize("pattern, ulysses, ring", [("LS", 2, 2), ("SL", 1, 4), ("LS", 4, 1)])
def test_sequence_parallel_model_with_documents_equals_single_device(distributed, pattern, ulysses, ring):
    loss, grads = _train_grads(_model(pattern).train(), _packed_batch())
    for rank_loss, rank_grads in distributed(ulysses * ring, _sharded_worker, pattern, ulysses, ring):
        torch.testing.assert_close(torch.tensor(rank_loss), loss, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            scale = grad.abs().max().clamp(min=1e-6)
            torch.testing.assert_close(rank_grads[name] / scale, grad / scale, rtol=0, atol=2e-5, msg=name)


def _arrow_batch(folder, document_masking: bool):
    from longloom.config import DataConfig
    from longloom.data.loader import GlobalBatchLoader
    from longloom.data.synthetic import build_dataset

    dataset = build_dataset(
        DataConfig(source=str(folder), seq_len=64, document_masking=document_masking), seed=0
    )
    return GlobalBatchLoader(dataset, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0).batch(0)


def _arrow_loss_worker(folder, ulysses, ring):
    dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config("LS").model_copy(update={"vocab_size": 300}), dims)
    batch = dims.shard_batch(dims.balance_documents(_arrow_batch(folder, True)))
    assert "document_ids" in batch
    _, stats = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], loss_group=dims.sp_group,
                     document_ids=batch["document_ids"])  # fmt: skip
    return float(stats.loss)


def test_prepared_arrow_data_gives_the_same_loss_under_every_split(distributed, tmp_path):
    """Prepared shards -> packed samples with ids -> loader -> shard_batch -> model: one loss per split."""
    from longloom.data.prepare import prepare_dataset

    (tmp_path / "src").mkdir()
    for i in range(40):
        (tmp_path / "src" / f"{i:02d}.txt").write_text(f"doc {i} " * (i % 3 + 1))  # 6 to 21 bytes
    prepare_dataset(tmp_path / "src", tmp_path / "out", shard_tokens=50, progress=False)
    losses = {}
    for document_masking in (True, False):
        batch = _arrow_batch(tmp_path / "out", document_masking)
        torch.manual_seed(0)
        model = LlamaModel(tiny_model_config("LS").model_copy(update={"vocab_size": 300}))
        _, stats = model(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                         document_ids=batch.get("document_ids"))  # fmt: skip
        losses[document_masking] = float(stats.loss)
    # These samples hold several documents each, and masking them changes the loss (a little: a tiny
    # freshly initialised model attends almost uniformly), more than the splits below may differ.
    assert bool((_arrow_batch(tmp_path / "out", True)["document_ids"][:, -1] >= 2).all())
    assert abs(losses[True] - losses[False]) > 10 * 2e-6 * losses[True]
    for ulysses, ring in ((2, 1), (1, 2), (2, 2)):
        for loss in distributed(ulysses * ring, _arrow_loss_worker, tmp_path / "out", ulysses, ring):
            assert loss == pytest.approx(losses[True], rel=2e-6), (ulysses, ring)
