"""Damaged prepared data is refused where it is opened, naming the file and the fix."""

import json

import numpy as np
import pytest

from longloom.config import DataConfig
from longloom.data.arrow import INDEX_FILE, ShardWriter, TokenShards, write_index
from longloom.data.prepare import prepare_dataset
from longloom.data.synthetic import build_dataset
from longloom.data.tokenize import BYTE_VOCAB_SIZE, EOS_ID

FIX = "longloom data prepare SOURCE .* --overwrite"


@pytest.fixture
def prepared(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(f"document {i} " * 20)
    prepare_dataset(tmp_path / "src", tmp_path / "out", shard_tokens=150, progress=False)
    return tmp_path / "out"


def _write_folder(folder, documents, vocab_size=BYTE_VOCAB_SIZE):
    """A folder as prepare writes it, from raw id lists (ids the tokenizer would never produce)."""
    folder.mkdir()
    writer = ShardWriter(folder, shard_tokens=1000)
    for ids in documents:
        writer.add(np.asarray(ids, dtype=np.int32))
    shards = writer.close()
    write_index(folder, {"eos_id": EOS_ID, "vocab_size": vocab_size, "tokenizer": "bytes", "shards": shards})


def test_out_of_vocabulary_ids_are_refused_at_open_naming_the_shard(tmp_path):
    _write_folder(tmp_path / "oov", [[1, 2, 3, EOS_ID], [5, 300, EOS_ID]])
    message = (
        rf"shard '.*oov/shard-00000.arrow' holds token id 300, outside the vocabulary .*vocab_size=259.*{FIX}"
    )
    with pytest.raises(ValueError, match=message):
        TokenShards(tmp_path / "oov")
    # What a worker and the CLI open: refused before any sample is drawn.
    with pytest.raises(ValueError, match=message):
        build_dataset(DataConfig(source=str(tmp_path / "oov"), seq_len=4), seed=0, vocab_size=259)
    _write_folder(tmp_path / "negative", [[1, -7, EOS_ID]])
    with pytest.raises(ValueError, match="holds token id -7"):
        TokenShards(tmp_path / "negative")


def test_folders_without_recorded_ranges_get_them_computed(prepared, tmp_path):
    recorded = TokenShards(prepared).token_id_ranges
    index = json.loads((prepared / INDEX_FILE).read_text())
    for shard in index["shards"]:
        del shard["min_token_id"], shard["max_token_id"]
    (prepared / INDEX_FILE).write_text(json.dumps(index))
    assert TokenShards(prepared).token_id_ranges == recorded
    # An old folder with an id out of range is refused all the same.
    _write_folder(tmp_path / "old", [[1, 2, EOS_ID], [4, 999, EOS_ID]])
    index = json.loads((tmp_path / "old" / INDEX_FILE).read_text())
    for shard in index["shards"]:
        del shard["min_token_id"], shard["max_token_id"]
    (tmp_path / "old" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shard-00000.arrow' holds token id 999"):
        TokenShards(tmp_path / "old")


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_shard_names_the_file_and_the_fix(prepared, keep):
    shard = prepared / "shard-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(
        ValueError, match=rf"shard '.*out/shard-00001.arrow' is damaged and cannot be read.*{FIX}"
    ):
        TokenShards(prepared)
    # The fix the message gives works: --overwrite replaces the damaged folder.
    prepare_dataset(prepared.parent / "src", prepared, shard_tokens=150, progress=False, overwrite=True)
    assert TokenShards(prepared).num_documents == 3


BY_HAND = (
    r"if it holds only index.json and shard-\*.arrow files, delete it and run `longloom data prepare SOURCE "
)


@pytest.mark.parametrize(
    ("index_text", "named", "fix"),
    [
        ('{"format": "longloom-token-shards", "version": 1, "shards": [', "is not valid JSON", BY_HAND),
        ("[1, 2]", "holds list, not the index", BY_HAND),
        ("\xff\xfe", "is not valid JSON", BY_HAND),
        ('{"format": "other", "version": 1}', "is format 'other'", BY_HAND),
        ('{"format": "longloom-token-shards", "version": 0}', "version 0", FIX),
        (
            '{"format": "longloom-token-shards", "version": 1, "eos_id": 257, "vocab_size": 259}',
            r"malformed \(shards",
            FIX,
        ),
    ],
)
def test_broken_index_names_the_file_and_the_fix(prepared, index_text, named, fix):
    (prepared / INDEX_FILE).write_bytes(index_text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"out/index.json.*{named}.*{fix}"):
        TokenShards(prepared)
    # The fix works: --overwrite replaces a folder whose index is ours, and refuses one it cannot recognise.
    source = prepared.parent / "src"
    if fix == FIX:
        assert prepare_dataset(source, prepared, progress=False, overwrite=True)["documents"] == 3
        assert TokenShards(prepared).num_documents == 3
    else:
        with pytest.raises(ValueError, match="only a folder written by `longloom data prepare`"):
            prepare_dataset(source, prepared, progress=False, overwrite=True)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("tokens", "many", r"shards.0.tokens"),
        ("tokens", True, r"shards.0.tokens"),
        ("file", "../../etc/passwd", r"shards.0.file"),
        ("file", "/abs/shard-00000.arrow", r"shards.0.file"),
    ],
)
def test_malformed_shard_entries_are_refused(prepared, field, value, named):
    index = json.loads((prepared / INDEX_FILE).read_text())
    index["shards"][0][field] = value
    (prepared / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"out/index.json is malformed \({named}.*{FIX}"):
        TokenShards(prepared)


def test_token_count_disagreeing_with_the_index_is_refused(prepared):
    index = json.loads((prepared / INDEX_FILE).read_text())
    index["shards"][0]["tokens"] += 1
    (prepared / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"shard-00000.arrow' holds \d+ tokens but index.json says.*{FIX}"):
        TokenShards(prepared)
