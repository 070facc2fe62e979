"""Chat shards in training: packed samples take their labels from the label mask (-100 off the assistant
turns) and number one document per conversation."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from longloom.data.arrow import TokenShards
from longloom.data.loader import GlobalBatchLoader
from longloom.data.packing import PackedTokenDataset
from longloom.data.prepare import prepare_dataset
from tests.data.test_chat import CONVERSATION, PLAIN_TEMPLATE, _save_tokenizer

IGNORE_INDEX = -100


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-packing")
    _save_tokenizer(root / "tokenizer", PLAIN_TEMPLATE)
    short = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    lines = [{"messages": CONVERSATION}, {"messages": short}] * 5
    (root / "chats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepare_dataset(
        root / "chats.jsonl",
        root / "shards",
        tokenizer=str(root / "tokenizer"),
        format="chat",
        progress=False,
    )
    return root / "shards"


def test_packed_labels_follow_the_assistant_mask(chat_folder):
    shards = TokenShards(chat_folder)
    seq_len = 24
    dataset = PackedTokenDataset(shards, seq_len)
    stream = shards.tokens(0, shards.num_tokens)
    mask = shards.label_mask(0, shards.num_tokens)
    trained = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        start = index * seq_len
        window = stream[start : start + seq_len + 1]
        expected = np.where(mask[start + 1 : start + seq_len + 1], window[1:], IGNORE_INDEX)
        assert sample["labels"].tolist() == expected.tolist()
        assert sample["tokens"].tolist() == window[:-1].tolist()
        trained += int((sample["labels"] != IGNORE_INDEX).sum())
    assert 0 < trained < len(dataset) * seq_len  # prompts are masked, answers are not


def test_one_document_per_conversation_in_packed_samples(chat_folder):
    shards = TokenShards(chat_folder)
    dataset = PackedTokenDataset(shards, 48)
    sample = dataset[1]
    tokens, documents = sample["tokens"], sample["document_ids"]
    ends = (tokens[:-1] == shards.eos_id).nonzero().flatten() + 1
    assert len(ends) >= 1  # a window of 48 tokens spans more than one conversation
    expected = torch.zeros_like(documents)
    for end in ends.tolist():
        expected[end:] += 1
    assert torch.equal(documents, expected)
    # Positions restart with each conversation.
    assert (sample["position_ids"][ends] == 0).all()


def test_loader_batches_carry_the_masked_labels(chat_folder):
    dataset = PackedTokenDataset(TokenShards(chat_folder), 24)
    loader = GlobalBatchLoader(dataset, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    batch = loader.batch(0)
    indices = loader.global_sample_indices(0)
    for row, index in enumerate(indices):
        assert torch.equal(batch["labels"][row], dataset[index]["labels"])
    assert (batch["labels"] == IGNORE_INDEX).any() and (batch["labels"] != IGNORE_INDEX).any()


def _train_worker(overrides: list[str]) -> list[float]:
    from longloom.config import load_config
    from longloom.training.trainer import run_training

    return run_training(load_config(None, overrides))["losses"]


def test_training_counts_only_the_assistant_labels(distributed, chat_folder, tmp_path):
    shards = TokenShards(chat_folder)
    seq_len, micro = 24, 2
    overrides = [
        f"data.source={chat_folder}",
        f"data.seq_len={seq_len}",
        f"model.vocab_size={shards.vocab_size}",
        "model.hidden=32",
        "model.heads=4",
        "model.kv_heads=2",
        f"train.micro_batch_size={micro}",
        "train.steps=2",
        "train.dtype=fp32",
        f"train.output_dir={tmp_path}",
        "launch.workers=1",
        "parallel.ulysses=1",
    ]
    losses = distributed(1, _train_worker, overrides)[0]
    assert len(losses) == 2 and all(np.isfinite(losses))
    loader = GlobalBatchLoader(PackedTokenDataset(shards, seq_len), micro, dp_rank=0, dp_size=1, seed=0)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for step, record in enumerate(metrics):
        assert record["valid_tokens"] == int((loader.batch(step)["labels"] != IGNORE_INDEX).sum())
        assert 0 < record["valid_tokens"] < micro * seq_len  # prompts were not trained on
