import re

import numpy as np
import pytest
import torch

from longloom.config import DataConfig
from longloom.data.synthetic import IGNORE_INDEX, build_dataset
from longloom.data.tokenize import BOS_ID, ByteTokenizer

decode = ByteTokenizer().decode


@pytest.mark.parametrize("task", ["passkey", "recall"])
@pytest.mark.parametrize("seq_len", [32, 257, 4096])
def test_samples_fill_seq_len_and_are_deterministic(task, seq_len):
    dataset = build_dataset(DataConfig(source=f"synthetic:{task}", seq_len=seq_len), seed=3)
    again = build_dataset(DataConfig(source=f"synthetic:{task}", seq_len=seq_len), seed=3)
    other_seed = build_dataset(DataConfig(source=f"synthetic:{task}", seq_len=seq_len), seed=4)
    sample = dataset[7]
    assert all(t.dtype == torch.int64 and t.shape == (seq_len,) for t in sample.values())
    assert sample["tokens"][0] == BOS_ID
    assert torch.equal(sample["position_ids"], torch.arange(seq_len))
    assert torch.equal(sample["document_ids"], torch.zeros(seq_len, dtype=torch.int64))  # one document
    # Labels are the shifted tokens where they count and -100 elsewhere.
    counted = sample["labels"] != IGNORE_INDEX
    assert counted.any()
    assert torch.equal(sample["labels"][:-1][counted[:-1]], sample["tokens"][1:][counted[:-1]])
    for name in sample:
        assert torch.equal(sample[name], again[7][name])
    assert not torch.equal(sample["tokens"], dataset[8]["tokens"])
    assert not torch.equal(sample["tokens"], other_seed[7]["tokens"])


def test_passkey_answer_is_in_the_labels_and_hidden_earlier():
    dataset = build_dataset(DataConfig(source="synthetic:passkey", seq_len=300), seed=0)
    depths = set()
    for index in range(20):
        sample = dataset[index]
        text = decode(sample["tokens"])
        needles = re.findall(r"key: (\d{5})\. ", text)
        assert len(needles) == 1
        answer = sample["labels"][sample["labels"] != IGNORE_INDEX]
        assert decode(answer) == needles[0]
        # The answer is the end of the sample: tokens end with "key: " + its first four digits.
        assert sample["labels"][-5:].tolist() == answer.tolist()
        assert text.endswith("key: " + needles[0][:4])
        depths.add(text.index("key: "))
    assert len(depths) > 3  # hidden at varying depths


def test_recall_labels_are_the_values_of_the_queried_keys():
    dataset = build_dataset(DataConfig(source="synthetic:recall", seq_len=1000), seed=1)
    sample = dataset[0]
    window, _ = dataset.window(0)
    assert sample["tokens"].tolist() == window[:-1].tolist()
    pairs_text, queries_text = decode(window).split("\n")
    pair_list = re.findall(r"([a-z]+):(\d{4}) ", pairs_text)
    pairs = dict(pair_list)
    queries = re.findall(r"([a-z]+)\?(\d{4}) ", queries_text)
    assert len(pairs) == len(pair_list) >= 2 * len(queries) >= 2  # unique keys; two pairs per query
    assert len({key for key, _ in queries}) == len(queries)
    assert all(pairs[key] == value for key, value in queries)
    answer = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert decode(answer) == "".join(value for _, value in queries)


def test_bad_synthetic_sources():
    with pytest.raises(ValueError, match="synthetic:passkey, synthetic:recall"):
        build_dataset(DataConfig(source="synthetic:copy", seq_len=64), seed=0)
    with pytest.raises(ValueError, match=r"data.seq_len=16 is too short for synthetic:passkey.*>= 22"):
        build_dataset(DataConfig(source="synthetic:passkey", seq_len=16), seed=0)
    with pytest.raises(ValueError, match=r"data.seq_len=16 is too short for synthetic:recall.*>= 17"):
        build_dataset(DataConfig(source="synthetic:recall", seq_len=16), seed=0)
    assert build_dataset(DataConfig(source="synthetic:recall", seq_len=17), seed=0)[0]["tokens"].shape == (
        17,
    )
    assert build_dataset(DataConfig(source="synthetic:passkey", seq_len=22), seed=0)[0]["tokens"].shape == (
        22,
    )


def test_long_samples_are_cheap():
    dataset = build_dataset(DataConfig(source="synthetic:recall", seq_len=1 << 20), seed=0)
    sample = dataset[0]
    assert sample["tokens"].shape == (1 << 20,)
    assert np.unique(sample["labels"].numpy()).size > 2


def test_document_masking_off_emits_no_document_ids():
    config = DataConfig(source="synthetic:passkey", seq_len=64, document_masking=False)
    assert "document_ids" not in build_dataset(config, seed=0)[0]
