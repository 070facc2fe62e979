import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longloom.data import output_folder
from longloom.data.arrow import INDEX_FILE, TokenShards
from longloom.data.prepare import prepare_dataset
from longloom.data.tokenize import EOS_ID, ByteTokenizer

DOCUMENTS = [
    "The first document.\nIt has two lines.",
    "Zweites Dokument: ünïcödé 汉字 🧶",
    "x",
    "a longer one " * 40,
]


def _decoded_documents(folder):
    shards = TokenShards(folder)
    tokenizer = ByteTokenizer()
    documents = []
    for i in range(shards.num_documents):
        ids = shards.document(i)
        assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
        documents.append(tokenizer.decode(ids))
    return shards, documents


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_text_files_round_trip_one_document_per_file(tmp_path):
    source = tmp_path / "texts"
    (source / "nested").mkdir(parents=True)
    for i, text in enumerate(DOCUMENTS):
        # Byte-exact: "\r\n" stays "\r\n" (no newline translation).
        (source / ("nested" if i % 2 else ".") / f"{i:02d}.txt").write_bytes(
            text.replace("\n", "\r\n").encode()
        )
    (source / "notes.csv").write_text("ignored,file")
    summary = prepare_dataset(source, tmp_path / "out", shard_tokens=64, progress=False)
    shards, documents = _decoded_documents(tmp_path / "out")
    # Sorted path order: 00, 02 at the top level come before nested/01, nested/03.
    expected = [DOCUMENTS[i].replace("\n", "\r\n") for i in (0, 2, 1, 3)]
    assert documents == expected
    total = sum(len(text.encode()) + 1 for text in expected)
    assert summary["tokens"] == shards.num_tokens == total
    assert summary["documents"] == 4 and summary["files"] == 4
    assert summary["shards"] > 1  # 64-token shards: the stream spans several files
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["eos_id"] == EOS_ID and index["tokenizer"] == "bytes" and index["vocab_size"] == 259
    assert sum(shard["tokens"] for shard in index["shards"]) == total
    assert _leftovers(tmp_path, "out") == []


def test_jsonl_round_trip_skips_empty_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "body": text}) for i, text in enumerate(DOCUMENTS)]
    lines.insert(2, json.dumps({"id": 99, "body": ""}))
    lines.insert(3, "")
    path.write_text("\n".join(lines) + "\n")
    summary = prepare_dataset(path, tmp_path / "out", text_column="body", progress=False)
    _, documents = _decoded_documents(tmp_path / "out")
    assert documents == DOCUMENTS
    assert summary["skipped_empty"] == 2 and summary["shards"] == 1


def test_parquet_round_trip_with_nulls_and_several_row_groups(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"id": list(range(5)), "content": [DOCUMENTS[0], None, *DOCUMENTS[1:]]})
    pq.write_table(table, path, row_group_size=2)
    summary = prepare_dataset(path, tmp_path / "out", text_column="content", shard_tokens=100, progress=False)
    shards, documents = _decoded_documents(tmp_path / "out")
    assert documents == DOCUMENTS
    assert summary["skipped_empty"] == 1
    # The whole stream reads back across record batches and shards.
    stream = shards.tokens(0, shards.num_tokens)
    assert stream.dtype == np.int64
    assert stream.tolist() == [t for text in DOCUMENTS for t in [*text.encode(), EOS_ID]]
    assert shards.tokens(30, 130).tolist() == stream[30:130].tolist()


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_dataset(tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_missing_parquet_column_names_existing_columns(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["hello"]}), path)
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: id, body\).*--text-column"):
        prepare_dataset(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_missing_jsonl_field_names_line_and_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2 has no field 'text' \(it has: 'body'\)"):
        prepare_dataset(path, tmp_path / "out", progress=False)


def test_empty_inputs_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt, .jsonl, .parquet files"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r"no non-empty documents \(2 files, 2 empty"):
        prepare_dataset(tmp_path / "blank", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_failure_midway_leaves_nothing_and_keeps_the_old_output(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("good document")
    prepare_dataset(source, tmp_path / "out", progress=False)
    before = TokenShards(tmp_path / "out").num_tokens
    (source / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match="already exists"):
        prepare_dataset(source, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="b.txt is not UTF-8"):
        prepare_dataset(source, tmp_path / "out", progress=False, overwrite=True)
    assert TokenShards(tmp_path / "out").num_tokens == before
    assert _leftovers(tmp_path, "out") == []
    (source / "b.txt").write_text("second")
    summary = prepare_dataset(source, tmp_path / "out", progress=False, overwrite=True)
    assert summary["documents"] == 2 and _leftovers(tmp_path, "out") == []


def _snapshot(root):
    """Every file's bytes and every folder under `root`: equal snapshots = nothing touched."""
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


def _source_tree(root):
    raw = root / "project" / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.txt").write_text("first source document")
    (raw / "sub" / "b.jsonl").write_text('{"text": "second"}\n')
    (root / "project" / "notes.md").write_text("unrelated file next to the data")
    (root / "project" / "code").mkdir()
    (root / "project" / "code" / "train.py").write_text("print('keep me')")
    return raw


@pytest.mark.parametrize(
    ("destination", "relation"),
    [
        ("project/raw", "is the data source itself"),
        ("project", "contains the data source"),
        (".", "contains the data source"),
        ("project/raw/shards", "is inside the data source"),
        ("project/raw/sub", "is inside the data source"),
    ],
)
def test_destination_overlapping_the_source_is_refused_and_nothing_changes(tmp_path, destination, relation):
    raw = _source_tree(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError, match=rf"{relation}.*Nothing was changed: choose another output folder, e\.g\."
    ):
        prepare_dataset(raw, tmp_path / destination, progress=False, overwrite=True)
    assert _snapshot(tmp_path) == before
    # A single source file counts as well: its own folder contains it.
    with pytest.raises(ValueError, match="contains the data source"):
        prepare_dataset(raw / "a.txt", raw, progress=False, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_folder_that_prepare_wrote(tmp_path):
    raw = _source_tree(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError, match=r"only a folder written by `longloom data prepare`.*Nothing was changed"
    ):
        prepare_dataset(raw, other, progress=False, overwrite=True)
    assert _snapshot(tmp_path) == before

    out = tmp_path / "shards"
    prepare_dataset(raw, out, progress=False)
    (out / "my-notes.txt").write_text("added by the user")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"files it did not write \(my-notes.txt\).*Nothing was changed"):
        prepare_dataset(raw, out, progress=False, overwrite=True)
    assert _snapshot(tmp_path) == before

    (out / "my-notes.txt").unlink()
    (raw / "c.txt").write_text("third")
    summary = prepare_dataset(raw, out, progress=False, overwrite=True)
    assert summary["documents"] == 3 and TokenShards(out).num_documents == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "project", "shards"]  # nothing left aside


def test_destination_that_is_a_file_or_under_one_is_refused(tmp_path):
    raw = _source_tree(tmp_path)
    (tmp_path / "out.arrow").write_text("a file")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare_dataset(raw, tmp_path / "out.arrow", progress=False, overwrite=True)
    with pytest.raises(ValueError, match="it is a file, not a folder"):
        prepare_dataset(raw, tmp_path / "out.arrow" / "deeper" / "shards", progress=False)
    assert _snapshot(tmp_path) == before


def test_failure_midway_into_a_new_folder_leaves_no_destination_and_no_parents(tmp_path):
    raw = _source_tree(tmp_path)
    (raw / "z.txt").write_bytes(b"\xff\xfe not utf-8")  # sorted after the good files
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="z.txt is not UTF-8"):
        prepare_dataset(raw, tmp_path / "new" / "nested" / "shards", progress=False)
    assert _snapshot(tmp_path) == before  # no shards, no temporary folder, no created parents


def test_unwritable_parent_names_the_folder(tmp_path, monkeypatch):
    raw = _source_tree(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()

    def permission_denied(prefix, dir):  # what mkdtemp raises in a folder without write permission
        raise PermissionError(13, "Permission denied", str(Path(dir) / prefix))

    monkeypatch.setattr(output_folder.tempfile, "mkdtemp", permission_denied)
    with pytest.raises(
        ValueError, match=r"cannot write in '.*locked/new' \(Permission denied\): choose an output"
    ):
        prepare_dataset(raw, locked / "new" / "shards", progress=False)
    assert list(locked.iterdir()) == []  # the parent it made is gone again


def test_index_records_each_shards_token_id_range(tmp_path):
    (tmp_path / "a.txt").write_text("AAAA" + "z" * 80)
    summary = prepare_dataset(tmp_path / "a.txt", tmp_path / "out", shard_tokens=40, progress=False)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert summary["min_token_id"] == ord("A") and summary["max_token_id"] == EOS_ID
    for entry in index["shards"]:
        ids = TokenShards(tmp_path / "out")  # the reader keeps them per shard too
        assert (entry["file"], entry["min_token_id"], entry["max_token_id"]) in ids.token_id_ranges
    assert index["shards"][0]["min_token_id"] == ord("A") and index["shards"][-1]["max_token_id"] == EOS_ID


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("longloom.data.prepare.LOG_PROGRESS_EVERY_S", 0.0)
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000))
    )
    with caplog.at_level("INFO", logger="longloom.data.prepare"):
        prepare_dataset(tmp_path / "docs.jsonl", tmp_path / "out", progress=True)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("prepare: 1 files") and any("2000 documents" in line for line in lines)


def test_output_folder_gets_the_permissions_mkdir_would_give(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    prepare_dataset(tmp_path / "a.txt", tmp_path / "out", progress=False)
    (tmp_path / "reference").mkdir()
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "reference").stat().st_mode
