import numpy as np
import pytest
import torch

from longloom.config import DataConfig
from longloom.data.packing import PackedTokenDataset, document_ids, document_position_ids
from longloom.data.prepare import prepare_dataset
from longloom.data.synthetic import build_dataset
from longloom.data.tokenize import EOS_ID

EOS = 9


def _naive_positions(tokens, eos_id):
    positions, current = [], 0
    for token in tokens:
        positions.append(current)
        current = 0 if token == eos_id else current + 1
    return positions


def test_position_ids_restart_after_each_eos():
    tokens = np.array([1, 2, EOS, 3, EOS, EOS, 4, 5, 6])
    assert document_position_ids(tokens, EOS).tolist() == [0, 1, 2, 0, 1, 0, 0, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens = rng.integers(0, EOS + 1, size=int(rng.integers(1, 60)))
        assert document_position_ids(tokens, EOS).tolist() == _naive_positions(tokens, EOS)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    (root / "src").mkdir()
    texts = [f"document number {i} " * (i + 1) for i in range(12)]
    for i, text in enumerate(texts):
        (root / "src" / f"{i:02d}.txt").write_text(text)
    # Tiny shards: sample windows cross record batches and shard files.
    prepare_dataset(root / "src", root / "out", shard_tokens=50, progress=False)
    stream = [t for text in texts for t in [*text.encode(), EOS_ID]]
    return root / "out", stream


@pytest.mark.parametrize("seq_len", [7, 64, 200])
def test_samples_are_overlapping_windows_of_the_stream(prepared, seq_len):
    folder, stream = prepared
    dataset = build_dataset(DataConfig(source=str(folder), seq_len=seq_len), seed=0)
    assert isinstance(dataset, PackedTokenDataset)
    assert len(dataset) == (len(stream) - 1) // seq_len
    for index in range(len(dataset)):
        sample = dataset[index]
        window = stream[index * seq_len : index * seq_len + seq_len + 1]
        assert all(t.dtype == torch.int64 and t.shape == (seq_len,) for t in sample.values())
        assert sample["tokens"].tolist() == window[:-1]
        assert sample["labels"].tolist() == window[1:]  # pre-shifted, nothing masked
        assert sample["position_ids"].tolist() == _naive_positions(window[:-1], EOS_ID)
        # A new document right after each EOS: the ids count document starts (position 0 but the first).
        starts = [0] + [int(p == 0) for p in sample["position_ids"].tolist()[1:]]
        assert sample["document_ids"].tolist() == np.cumsum(starts).tolist()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_document_ids_follow_eos_and_can_be_switched_off(prepared):
    tokens = np.array([1, 2, EOS, 3, EOS, EOS, 4, 5, 6])
    assert document_ids(tokens, EOS).tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3]
    folder, _ = prepared
    config = DataConfig(source=str(folder), seq_len=64, document_masking=False)
    assert set(build_dataset(config, seed=0)[0]) == {"tokens", "position_ids", "labels"}


def test_too_little_data_and_vocabulary_mismatch(prepared):
    folder, stream = prepared
    with pytest.raises(ValueError, match=rf"holds {len(stream)} tokens.*data.seq_len"):
        build_dataset(DataConfig(source=str(folder), seq_len=len(stream)), seed=0)
    with pytest.raises(ValueError, match="set model.vocab_size=259"):
        build_dataset(DataConfig(source=str(folder), seq_len=8), seed=0, vocab_size=200)


def test_missing_or_empty_folder_names_path_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nowhere' does not exist.*longloom data prepare"):
        build_dataset(DataConfig(source=str(tmp_path / "nowhere"), seq_len=8), seed=0)
    with pytest.raises(ValueError, match=r"holds no index.json \(no shards\).*longloom data prepare"):
        build_dataset(DataConfig(source=str(tmp_path), seq_len=8), seed=0)


def test_missing_shard_is_reported(prepared, tmp_path):
    folder, _ = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        if path.name != "shard-00001.arrow":
            (copy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="shard-00001.arrow.*is missing"):
        build_dataset(DataConfig(source=str(copy), seq_len=8), seed=0)
