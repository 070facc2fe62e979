"""Arrow IPC token shards: the on-disk format of prepared data, written in pieces, read memory-mapped.

A prepared folder holds `index.json` and `shard-00000.arrow`, `shard-00001.arrow`, ... Each shard is an
Arrow IPC file with one column `tokens: large_list<int32>`, one row per document, every document ending
with EOS. Chat data (`data prepare --format chat`) has a second column `label_mask: large_list<uint8>`
with the same offsets: 1 where the token is trained on (assistant turns), 0 where its label is -100
(prompts, system turns, template tokens); index.json says `"label_mask": true`. Folders without it (plain
text, and every folder prepared before it existed) train on every token as before. The list's values buffer is the flat token stream and its offsets are the document
boundaries, so a memory-mapped read (`pyarrow.memory_map` + `pyarrow.ipc.open_file`) hands out numpy
views of the file without copying or loading it: a multi-terabyte corpus costs page cache, not RAM.

Damaged data is refused where it is opened, naming the file and the fix: a malformed index, an
unreadable Arrow file, token counts that disagree with the index, and token ids outside the vocabulary.
The index records each shard's smallest and largest token id, so the vocabulary check costs nothing:
every id must lie in [0, vocab_size of the index), and `build_dataset` refuses an index vocab_size above
model.vocab_size, so no id reaches the embedding out of range (it used to fail as an IndexError in a
worker, a minute into training). Folders prepared before the ranges were recorded get them computed
on open (pyarrow.compute.min_max, one vectorised pass over the memory-mapped values) rather than
refused: old data keeps working, and a log line says how to record them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.ipc
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

logger = logging.getLogger(__name__)

FORMAT = "longloom-token-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENS_COLUMN = "tokens"
LABEL_MASK_COLUMN = "label_mask"
SCHEMA = pa.schema([pa.field(TOKENS_COLUMN, pa.large_list(pa.int32()))])
# uint8 rather than Arrow's bit-packed bool: numpy views of the memory-mapped file need whole bytes.
MASKED_SCHEMA = pa.schema(
    [
        pa.field(TOKENS_COLUMN, pa.large_list(pa.int32())),
        pa.field(LABEL_MASK_COLUMN, pa.large_list(pa.uint8())),
    ]
)
# A record batch bounds the writer's memory; a shard bounds the size of one file.
DEFAULT_BATCH_TOKENS = 1 << 20
DEFAULT_SHARD_TOKENS = 1 << 26


def _prepare_hint(folder: Path) -> str:
    return f"run `longloom data prepare SOURCE {folder}` to turn .txt / .jsonl / .parquet files into shards"


def _prepare_again(folder: Path) -> str:
    return f"prepare it again with `longloom data prepare SOURCE {folder} --overwrite`"


def _replace_by_hand(folder: Path) -> str:
    # Without a readable index of ours, --overwrite cannot tell the folder is ours and refuses it.
    return (
        f"if it holds only {INDEX_FILE} and shard-*.arrow files, delete it and run "
        f"`longloom data prepare SOURCE {folder}`"
    )


# How prepare names shards; with an index of our format, files named so are ours (data/output_folder.py).
SHARD_FILE_PATTERN = r"^shard-[0-9]+\.arrow$"


class ShardEntry(BaseModel):
    """One shard of index.json. Token ids are absent in folders of older versions."""

    model_config = ConfigDict(extra="allow")
    # A plain file name: an index never points outside its folder.
    file: str = Field(pattern=SHARD_FILE_PATTERN)
    documents: StrictInt = Field(ge=0)
    tokens: StrictInt = Field(ge=0)
    min_token_id: StrictInt | None = None
    max_token_id: StrictInt | None = None


class IndexFile(BaseModel):
    """What training needs from index.json; prepare's summary keys are kept as they are."""

    model_config = ConfigDict(extra="allow")
    format: str
    version: StrictInt
    eos_id: StrictInt = Field(ge=0)
    vocab_size: StrictInt = Field(ge=1)
    label_mask: StrictBool = False
    shards: list[ShardEntry] = Field(min_length=1)


class ShardWriter:
    """Appends documents to shards of about `shard_tokens` tokens (a document is never split).

    With `label_mask=True` every document comes with its mask (the `label_mask` column).
    """

    def __init__(
        self,
        folder: str | Path,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        label_mask: bool = False,
    ):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens} must be positive (e.g. {DEFAULT_SHARD_TOKENS})")
        self.folder = Path(folder)
        self.shard_tokens = shard_tokens
        self.batch_tokens = min(batch_tokens, shard_tokens)
        self.shards: list[dict[str, Any]] = []
        self.label_mask = label_mask
        self.schema = MASKED_SCHEMA if label_mask else SCHEMA
        self._pending: list[np.ndarray] = []
        self._pending_masks: list[np.ndarray] = []
        self._pending_tokens = 0
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def add(self, document: np.ndarray, label_mask: np.ndarray | None = None) -> None:
        """One document of int32 token ids (EOS already appended), with its bool mask when the writer has one."""
        if (label_mask is not None) != self.label_mask or (
            label_mask is not None and len(label_mask) != len(document)
        ):
            raise ValueError(
                f"a document of {len(document)} tokens came with "
                f"{'no label mask' if label_mask is None else f'a label mask of {len(label_mask)}'} to a writer "
                f"{'with' if self.label_mask else 'without'} label masks"
            )
        if self._writer is None:
            self._open_shard()
        if label_mask is not None:
            self._pending_masks.append(np.asarray(label_mask, dtype=np.uint8))
        self._pending.append(np.asarray(document, dtype=np.int32))
        self._pending_tokens += len(document)
        shard = self.shards[-1]
        if shard["tokens"] + self._pending_tokens >= self.shard_tokens:
            self._close_shard()
        elif self._pending_tokens >= self.batch_tokens:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        """Finishes the open shard; returns one entry per shard: file, documents, tokens."""
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}.arrow"
        self._sink = pa.OSFile(str(self.folder / name), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self.shards.append(
            {"file": name, "documents": 0, "tokens": 0, "min_token_id": None, "max_token_id": None}
        )

    def _flush(self) -> None:
        if not self._pending:
            return
        lengths = np.fromiter((len(d) for d in self._pending), dtype=np.int64, count=len(self._pending))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = np.concatenate(self._pending)
        columns = [pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))]
        if self.label_mask:
            masks = np.concatenate(self._pending_masks)
            columns.append(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(masks, type=pa.uint8())))
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))
        shard = self.shards[-1]
        shard["documents"] += len(self._pending)
        shard["tokens"] += int(offsets[-1])
        if len(values):
            # The id range lets a reader check the data against a model's vocabulary without a scan.
            low, high = int(values.min()), int(values.max())
            shard["min_token_id"] = low if shard["min_token_id"] is None else min(low, shard["min_token_id"])
            shard["max_token_id"] = (
                high if shard["max_token_id"] is None else max(high, shard["max_token_id"])
            )
        self._pending, self._pending_masks, self._pending_tokens = [], [], 0

    def _close_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()
        self._writer = self._sink = None


def write_index(folder: str | Path, metadata: dict[str, Any]) -> None:
    (Path(folder) / INDEX_FILE).write_text(
        json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **metadata}, indent=2)
    )


def read_index(folder: str | Path) -> dict[str, Any]:
    """The metadata of a prepared folder; ValueError naming the file and the fix if it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {str(folder)!r} does not exist: {_prepare_hint(folder)}")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ValueError(
            f"data folder {str(folder)!r} holds no {INDEX_FILE} (no shards): {_prepare_hint(folder)}"
        )
    try:
        index = json.loads(index_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{index_path} is not valid JSON ({error}): the folder is damaged; {_replace_by_hand(folder)}"
        ) from None
    if not isinstance(index, dict):
        raise ValueError(  # noqa: TRY004 - a damaged file, reported to the user like every other one
            f"{index_path} holds {type(index).__name__}, not the index of a prepared folder; "
            f"{_replace_by_hand(folder)}"
        )
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{index_path} is format {index.get('format')!r} version {index.get('version')!r}, expected "
            f"{FORMAT!r} version {FORMAT_VERSION}: "
            f"{_prepare_again(folder) if index.get('format') == FORMAT else _replace_by_hand(folder)}"
        )
    try:
        IndexFile.model_validate(index)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']} (got {item.get('input')!r})"
            for item in error.errors()[:3]
        )
        raise ValueError(f"{index_path} is malformed ({problems}): {_prepare_again(folder)}") from None
    return index


class TokenShards:
    """Every shard of a prepared folder as one memory-mapped token stream (documents back to back)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.metadata = read_index(self.folder)
        self.eos_id: int = self.metadata["eos_id"]
        self.vocab_size: int = self.metadata["vocab_size"]
        self.has_label_mask: bool = self.metadata.get("label_mask", False)
        self.schema = MASKED_SCHEMA if self.has_label_mask else SCHEMA
        # One segment per record batch: a contiguous int32 view of the file and its document offsets
        # (and a uint8 view of the label mask, for chat data).
        self._values: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._document_offsets: list[np.ndarray] = []
        # (shard file, smallest id, largest id) per shard, checked against the index's vocab_size here.
        self.token_id_ranges: list[tuple[str, int, int]] = []
        for shard in self.metadata["shards"]:
            segments = self._map_shard(shard)
            self.token_id_ranges.append((shard["file"], *self._token_id_range(shard, segments)))
        self._check_token_ids()
        lengths = [len(values) for values in self._values]
        self._token_starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])
        counts = [len(offsets) - 1 for offsets in self._document_offsets]
        self._document_starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts, dtype=np.int64)])
        self.num_tokens = int(self._token_starts[-1])
        self.num_documents = int(self._document_starts[-1])

    def _map_shard(self, shard: dict[str, Any]) -> list[np.ndarray]:
        """Maps one shard's record batches; returns their token values. Damage is named with the fix."""
        path = self.folder / shard["file"]
        if not path.is_file():
            raise ValueError(
                f"shard {str(path)!r} listed in {INDEX_FILE} is missing: the folder is incomplete, "
                f"{_prepare_again(self.folder)}"
            )
        segments = []
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            if not reader.schema.equals(self.schema):
                raise ValueError(
                    f"shard {str(path)!r} has schema {reader.schema}, expected {self.schema} (its {INDEX_FILE} "
                    f"says label_mask={self.has_label_mask}): {_prepare_again(self.folder)}"
                )
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                column = batch.column(0)
                offsets = column.offsets.to_numpy()
                # Slice by the offsets: a list array's values buffer may extend past its own rows.
                values = column.values.to_numpy(zero_copy_only=True)[offsets[0] : offsets[-1]]
                segments.append(values)
                self._document_offsets.append(offsets - offsets[0])
                if self.has_label_mask:
                    masks = batch.column(1)
                    mask_offsets = masks.offsets.to_numpy()
                    if not np.array_equal(mask_offsets - mask_offsets[0], offsets - offsets[0]):
                        raise ValueError(
                            f"shard {str(path)!r}: its label masks do not line up with its documents (batch {i}): "
                            f"{_prepare_again(self.folder)}"
                        )
                    self._masks.append(
                        masks.values.to_numpy(zero_copy_only=True)[mask_offsets[0] : mask_offsets[-1]]
                    )
        except (pa.ArrowException, OSError) as error:
            # A truncated file has no footer; overwritten bytes break a batch: either way the file is lost.
            raise ValueError(
                f"shard {str(path)!r} is damaged and cannot be read (Arrow: {error}): {_prepare_again(self.folder)}"
            ) from None
        self._values.extend(segments)
        tokens = sum(len(values) for values in segments)
        if tokens != shard["tokens"]:
            raise ValueError(
                f"shard {str(path)!r} holds {tokens} tokens but {INDEX_FILE} says {shard['tokens']}: "
                f"the folder is corrupt, {_prepare_again(self.folder)}"
            )
        return segments

    def _token_id_range(self, shard: dict[str, Any], segments: list[np.ndarray]) -> tuple[int, int]:
        """(smallest, largest) token id of a shard: from the index, or computed for older folders."""
        if shard.get("min_token_id") is not None and shard.get("max_token_id") is not None:
            return shard["min_token_id"], shard["max_token_id"]
        started = time.perf_counter()
        ranges = [pa.compute.min_max(pa.array(values, type=pa.int32())) for values in segments if len(values)]
        low = min((r["min"].as_py() for r in ranges), default=0)
        high = max((r["max"].as_py() for r in ranges), default=0)
        logger.info(
            "%s: token id range computed on open (%.1f s; this folder was prepared before the index recorded "
            "it): prepare it again to skip this",
            self.folder / shard["file"],
            time.perf_counter() - started,
        )
        return low, high

    def _check_token_ids(self) -> None:
        """Every id below the index's vocab_size, which build_dataset holds against model.vocab_size."""
        for file, low, high in self.token_id_ranges:
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"shard {str(self.folder / file)!r} holds token id {low if low < 0 else high}, outside the "
                    f"vocabulary of its {INDEX_FILE} (vocab_size={self.vocab_size}; a model would fail on it "
                    f"mid-run): the shard is damaged or was not written by this tokenizer, "
                    f"{_prepare_again(self.folder)}"
                )

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole stream as int64 (a copy; crosses batch and shard ends)."""
        return self._stream_range(self._values, start, stop).astype(np.int64)

    def label_mask(self, start: int, stop: int) -> np.ndarray:
        """Label mask [start, stop) of the stream as bool: True where the token is trained on.

        All True for a folder without masks (plain text trains on every token).
        """
        if not self.has_label_mask:
            self._check_range(start, stop)
            return np.ones(stop - start, dtype=bool)
        return self._stream_range(self._masks, start, stop).astype(bool)

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(
                f"token range [{start}, {stop}) is outside the stream of {self.num_tokens} tokens"
            )

    def _stream_range(self, segments: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of per-token `segments` (values or masks), copied across segment ends."""
        self._check_range(start, stop)
        pieces = []
        segment = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        position = start
        while position < stop:
            local = position - self._token_starts[segment]
            take = min(stop - position, len(segments[segment]) - local)
            pieces.append(segments[segment][local : local + take])
            position += take
            segment += 1
        return (
            np.concatenate(pieces)
            if pieces
            else np.zeros(0, dtype=segments[0].dtype if segments else np.int64)
        )

    def document(self, index: int) -> np.ndarray:
        """Document `index` (ending with EOS) as an int32 view of the file."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} is outside the {self.num_documents} documents")
        segment = int(np.searchsorted(self._document_starts, index, side="right")) - 1
        offsets = self._document_offsets[segment]
        local = index - self._document_starts[segment]
        return self._values[segment][offsets[local] : offsets[local + 1]]

    def document_label_mask(self, index: int) -> np.ndarray:
        """The label mask of document `index` as bool (all True without masks)."""
        ids = self.document(index)
        if not self.has_label_mask:
            return np.ones(len(ids), dtype=bool)
        segment = int(np.searchsorted(self._document_starts, index, side="right")) - 1
        offsets = self._document_offsets[segment]
        local = index - self._document_starts[segment]
        return self._masks[segment][offsets[local] : offsets[local + 1]].astype(bool)
