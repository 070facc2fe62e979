"""Eval loss: forward only, token-weighted over the whole world, the same on every split as on one process."""

import pytest
import torch
import torch.nn.functional as F

from longloom.config import ConfigError, load_config
from longloom.models.llama import LlamaModel
from longloom.parallel import ParallelDims
from longloom.training.evaluation import eval_batches, eval_dataset, evaluate_loss
from tests.models.tiny import tiny_model_config

SEQ = 16
SAMPLES = 5  # not a multiple of dp x micro batch: the last global batch is filled with ignored labels


class _Samples:
    """Five samples with uneven ignored labels and two documents in some of them (with document ids)."""

    shuffle = False

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.samples = []
        for index in range(SAMPLES):
            tokens = torch.randint(0, 61, (SEQ,), generator=g)
            labels = torch.roll(tokens, -1)
            labels[: index * 3] = -100
            positions = torch.arange(SEQ)
            documents = torch.zeros(SEQ, dtype=torch.int64)
            if index % 2:  # two packed documents: attention stays inside each (document_ids reach the model)
                split = SEQ // 4 * (index % 3 + 1)
                positions[split:] -= split
                documents[split:] = 1
            sample = {
                "tokens": tokens,
                "position_ids": positions,
                "labels": labels,
                "document_ids": documents,
            }
            self.samples.append(sample)

    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        return self.samples[index]


def _tiny_model(pattern: str, dims=None) -> LlamaModel:
    """The tiny Llama with 8x its initial projections: sharper attention, so that a lost document mask
    would move the loss well beyond the tolerance (6e-4 relative here, against rtol 1e-4)."""
    torch.manual_seed(0)
    model = LlamaModel(tiny_model_config(pattern), dims)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj" in name or "embed" in name:
                parameter.mul_(8)
    return model


def _reference_loss(pattern: str) -> float:
    """Mean cross entropy over every valid label of the eval set, one process, whole sequences."""
    model = _tiny_model(pattern).eval()
    data = _Samples()
    with torch.no_grad():
        tokens = torch.stack([s["tokens"] for s in data.samples])
        positions = torch.stack([s["position_ids"] for s in data.samples])
        labels = torch.stack([s["labels"] for s in data.samples])
        documents = torch.stack([s["document_ids"] for s in data.samples])
        logits = model(tokens, positions, document_ids=documents)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()


def _evaluate_worker(pattern: str, dp: int, ulysses: int, ring: int, micro: int):
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    model = _tiny_model(pattern, dims).train()
    batches = list(eval_batches(_Samples(), micro, dims))
    loss = evaluate_loss(model, batches, dims)
    # Forward only: no gradient anywhere, and the module's mode is restored.
    assert all(p.grad is None for p in model.parameters()) and model.training
    return loss, len(batches)


def test_single_process_equals_the_plain_cross_entropy():
    dims = ParallelDims(dp=1, ulysses=1, ring=1, rank=0, world_size=1)
    model = _tiny_model("S")
    loss = evaluate_loss(model, eval_batches(_Samples(), 2, dims), dims)
    torch.testing.assert_close(loss, _reference_loss("S"), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "world, dp, ulysses, ring, micro",
    [(2, 2, 1, 1, 2), (2, 1, 2, 1, 1), (2, 1, 1, 2, 3), (4, 2, 2, 1, 1), (4, 1, 2, 2, 2)],
)
def test_every_split_gives_the_single_process_loss(distributed, world, dp, ulysses, ring, micro):
    expected = _reference_loss("S")
    results = distributed(world, _evaluate_worker, "S", dp, ulysses, ring, micro)
    losses = [loss for loss, _ in results]
    assert len(set(losses)) == 1  # the same value on every rank
    torch.testing.assert_close(losses[0], expected, rtol=1e-4, atol=0)
    assert results[0][1] == -(-SAMPLES // (dp * micro))  # every sample is evaluated once


def test_linear_attention_layers_too(distributed):
    expected = _reference_loss("LS")
    results = distributed(2, _evaluate_worker, "LS", 1, 2, 1, 2)
    torch.testing.assert_close(results[0][0], expected, rtol=1e-4, atol=0)


def test_eval_source_keys_and_the_held_out_synthetic_default(tmp_path):
    cfg = load_config(None, ["train.eval_every=5", "data.seq_len=64"])
    held_out = eval_dataset(cfg)
    train_first = eval_dataset(load_config(None, ["data.seq_len=64", f"data.eval_source={cfg.data.source}"]))
    assert not torch.equal(held_out[0]["tokens"], train_first[0]["tokens"])  # other draws than training's
    single = ParallelDims(dp=1, ulysses=1, ring=1, rank=0, world_size=1)
    batches = list(eval_batches(held_out, 5, single))  # an endless task: its first 64 samples
    assert len(batches) == 13 and (batches[-1]["labels"][4:] == -100).all()
    assert torch.equal(batches[1]["tokens"][0], held_out[5]["tokens"])
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(None, ["train.eval_every=-1"])
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(None, ["train.eval_every=true"])
    with pytest.raises(ConfigError, match="data.eval_source"):
        load_config(None, ["data.eval_source=''"])
    folder = load_config(None, [f"data.source={tmp_path}", "train.eval_every=5"])
    with pytest.raises(ConfigError, match="set data.eval_source"):
        eval_dataset(folder)


def test_trainer_logs_the_same_eval_loss_under_every_split(distributed, tmp_path):
    """train.eval_every through the trainer: eval_loss in metrics.jsonl, the same on 1 and 2 workers."""
    import json

    from tests.training.test_trainer import _losses

    logged = {}
    for name, workers, split in (
        ("one", 1, []),
        ("ulysses2", 2, ["parallel.ulysses=2"]),
        ("ring2", 2, ["parallel.ring=2"]),
    ):
        _losses(
            distributed, workers, tmp_path, name, "train.eval_every=2", "train.micro_batch_size=2", *split
        )
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logged[name] = {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}
    assert sorted(logged["one"]) == [2, 4]
    for name in ("ulysses2", "ring2"):
        assert sorted(logged[name]) == [2, 4]
        assert [logged[name][s] for s in (2, 4)] == pytest.approx(
            [logged["one"][s] for s in (2, 4)], rel=1e-4
        )
    # Training changes the model between the two evaluations.
    assert logged["one"][2] != logged["one"][4]
