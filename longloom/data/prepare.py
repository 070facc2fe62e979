"""`longloom data prepare`: text, JSONL or Parquet files -> Arrow IPC token shards plus `index.json`.

Inputs, a file or a folder searched recursively in sorted path order (so the output is reproducible):
- `.txt`: one document per file. A book or a source file stays whole, which is what long-context
  training wants; split text into several files to get several documents. Read as UTF-8, byte-exact
  (no newline translation), so decoding the tokens gives the file back.
- `.jsonl`: one JSON object per line; the document is its field `text_column`.
- `.parquet`: the column `text_column`, streamed in record batches with pyarrow.
Empty documents (and nulls) are skipped and counted. A document is stored as its tokens followed by EOS.

`--format chat` (`.jsonl` only): one conversation per line, OpenAI `messages` or ShareGPT `conversations`,
rendered with the tokenizer's chat template (data/chat.py); one document per conversation, stored with a
label mask that is on for assistant tokens only. `--max-tokens N` (say data.seq_len) bounds a
conversation's length with its EOS; a longer one is an error naming its line (`--overlong error`, the
default), skipped (`skip`) or cut to its first N tokens (`truncate`); the summary counts each case.

Everything is written to a temporary sibling of `out_dir` that is renamed to `out_dir` only at the end:
a failure or an interrupt never leaves a half-written dataset where training would read it, and nothing
this command did not write is ever replaced (data/output_folder.py says what is refused).
The index records each shard's token id range, which training checks against model.vocab_size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from longloom.data.arrow import DEFAULT_SHARD_TOKENS, ShardWriter, write_index
from longloom.data.chat import ChatRenderer, conversation_messages
from longloom.data.output_folder import check_output_folder, staged_output_folder
from longloom.data.tokenize import load_tokenizer

logger = logging.getLogger(__name__)
# Without a terminal (a job log) progress is one line this often instead of a bar.
LOG_PROGRESS_EVERY_S = 30.0

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
INPUT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
FORMATS = ("text", "chat")
OVERLONG_CHOICES = ("error", "skip", "truncate")


def find_input_files(source: str | Path, suffixes: tuple[str, ...] = INPUT_SUFFIXES) -> list[Path]:
    """The input files of `source` (a file, or a folder searched recursively), sorted."""
    source = Path(source)
    if not source.exists():
        raise ValueError(
            f"data source {str(source)!r} does not exist: pass a file or folder of {_kinds(suffixes)}"
        )
    if source.is_file():
        if source.suffix.lower() not in suffixes:
            raise ValueError(
                f"data source {str(source)!r} is not one of {_kinds(suffixes)}: convert it or rename it"
            )
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(
            f"data source folder {str(source)!r} holds no {_kinds(suffixes)} files: add some or fix the path"
        )
    return files


def _kinds(suffixes: tuple[str, ...] = INPUT_SUFFIXES) -> str:
    return ", ".join(suffixes)


def _text_documents(path: Path) -> Iterator[tuple[str | None, int]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}): convert it, e.g. `iconv -t utf-8`"
        ) from None
    yield text, len(data)


def _jsonl_documents(path: Path, text_column: str) -> Iterator[tuple[str | None, int]]:
    with path.open("rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                yield None, len(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or text_column not in record:
                keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{line_number} has no field {text_column!r} (it has: {keys}): "
                    "pass the field with the text as --text-column / text_column"
                )
            text = record[text_column]
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number} field {text_column!r} is {type(text).__name__}, not text: "
                    "pass the field with the text as --text-column / text_column"
                )
            yield text, len(line)


def _parquet_documents(path: Path, text_column: str) -> Iterator[tuple[str | None, int]]:
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_column not in names:
        raise ValueError(
            f"Parquet file {str(path)!r} has no column {text_column!r} (columns: {', '.join(names)}): "
            "pass one of them as --text-column / text_column"
        )
    column_type = parquet.schema_arrow.field(text_column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(
            f"Parquet column {text_column!r} of {str(path)!r} is {column_type}, not text: "
            f"pass a string column as --text-column / text_column (columns: {', '.join(names)})"
        )
    rows = max(parquet.metadata.num_rows, 1)
    bytes_per_row = path.stat().st_size / rows  # for the progress bar only
    for batch in parquet.iter_batches(columns=[text_column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield text, bytes_per_row


def iter_documents(path: Path, text_column: str = "text") -> Iterator[tuple[str | None, float]]:
    """(document text or None when empty/null, input bytes it covers) for one input file."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _text_documents(path)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path, text_column)
    return _parquet_documents(path, text_column)


def _chat_documents(
    path: Path, renderer: ChatRenderer, max_tokens: int | None, overlong: str, skipped: dict[str, int]
) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, float]]:
    """(ids with EOS, label mask, input bytes) per conversation line; (None, None, bytes) when skipped.

    `skipped` counts why: empty lines, conversations without an assistant token, overlong ones.
    """
    with path.open("rb") as file:
        for line_number, line in enumerate(file, start=1):
            where = f"{path}:{line_number}"
            if not line.strip():
                skipped["empty"] += 1
                yield None, None, len(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error.msg})") from None
            rendered = renderer.render(conversation_messages(record, where), where)
            ids, mask = rendered.ids, rendered.assistant_mask
            if not len(ids) or ids[-1] != renderer.eos_id:  # the template may end with EOS already
                ids, mask = _with_eos(ids, renderer.eos_id), np.append(mask, False)
            truncated = max_tokens is not None and len(ids) > max_tokens
            if truncated:
                if overlong == "error":
                    raise ValueError(
                        f"{where}: the conversation is {len(ids)} tokens with its EOS, more than --max-tokens="
                        f"{max_tokens}: pass --overlong skip or --overlong truncate, or a larger --max-tokens"
                    )
                if overlong == "skip":
                    skipped["overlong"] += 1
                    yield None, None, len(line)
                    continue
                ids = _with_eos(ids[: max_tokens - 1], renderer.eos_id)
                mask = np.append(mask[: max_tokens - 1], False)
            if not mask.any():  # nothing to train on (also when truncation cut every answer)
                skipped["no_assistant_tokens"] += 1
                yield None, None, len(line)
                continue
            skipped["truncated"] += truncated  # kept, and counted
            yield ids, mask, len(line)


def _text_documents_tokenized(
    path: Path, text_column: str, tokenizer, skipped: dict[str, int]
) -> Iterator[tuple[np.ndarray | None, None, float]]:
    for text, size in iter_documents(path, text_column):
        if not text:
            skipped["empty"] += 1
            yield None, None, size
            continue
        yield _with_eos(tokenizer.encode(text), tokenizer.eos_id), None, size


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    text_column: str = "text",
    tokenizer: str = "bytes",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    overwrite: bool = False,
    format: str = "text",
    max_tokens: int | None = None,
    overlong: str | None = None,
) -> dict[str, Any]:
    """Tokenizes `source` into Arrow shards under `out_dir`; returns a summary (also in index.json).

    `progress` shows a bar when stderr is a terminal, else a log line every 30 s. A non-empty `out_dir`
    is replaced only with `overwrite=True` and only when an earlier `prepare_dataset` wrote it.
    `format="chat"`: conversations with assistant-only label masks (module docstring); `max_tokens` and
    `overlong` (error when None) say what happens to a longer conversation.
    """
    started = time.perf_counter()
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens={shard_tokens} must be positive (e.g. {DEFAULT_SHARD_TOKENS})")
    if format not in FORMATS:
        raise ValueError(f"--format={format!r} is not one of {', '.join(FORMATS)}")
    if overlong is not None and overlong not in OVERLONG_CHOICES:
        raise ValueError(f"--overlong={overlong!r} is not one of {', '.join(OVERLONG_CHOICES)}")
    if overlong is not None and max_tokens is None:
        raise ValueError(
            f"--overlong {overlong} says what to do with conversations longer than --max-tokens, which is not "
            "set: pass --max-tokens N (e.g. data.seq_len)"
        )
    overlong = overlong or "error"
    if max_tokens is not None and (format != "chat" or max_tokens < 2):
        raise ValueError(
            f"--max-tokens={max_tokens}: it bounds conversations of --format chat and must be at least 2 "
            "(a token and EOS); text documents are kept whole (long-context data)"
        )
    chat = format == "chat"
    files = find_input_files(source, JSONL_SUFFIXES if chat else INPUT_SUFFIXES)
    out_dir = Path(os.path.abspath(out_dir))  # "." or "x/.." get a real name and parent for the staging
    check_output_folder(Path(source), out_dir, overwrite)
    renderer = ChatRenderer(tokenizer) if chat else None
    text_tokenizer = renderer.tokenizer if chat else load_tokenizer(tokenizer)
    skipped_by_reason = {"empty": 0, "overlong": 0, "no_assistant_tokens": 0, "truncated": 0}

    def documents_of(path: Path):
        if chat:
            return _chat_documents(path, renderer, max_tokens, overlong, skipped_by_reason)
        return _text_documents_tokenized(path, text_column, text_tokenizer, skipped_by_reason)

    total_bytes = sum(path.stat().st_size for path in files)
    if progress:
        logger.info(
            "prepare: %d files, %.1f MB from %s -> %s", len(files), total_bytes / 1e6, source, out_dir
        )
    with staged_output_folder(out_dir) as staged:
        writer = ShardWriter(staged, shard_tokens=shard_tokens, label_mask=chat)
        documents = tokens = trained_tokens = 0
        on_terminal = progress and sys.stderr.isatty()
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not on_terminal)
        next_log = time.monotonic() + LOG_PROGRESS_EVERY_S
        with bar:
            for path in files:
                for ids, mask, size in documents_of(path):
                    bar.update(size)
                    if ids is None:
                        continue
                    writer.add(ids, mask)
                    documents += 1
                    tokens += len(ids)
                    trained_tokens += int(mask.sum()) if mask is not None else len(ids)
                    if documents % 1000 == 0:
                        bar.set_postfix(documents=documents, tokens=tokens, refresh=False)
                        if progress and not on_terminal and time.monotonic() >= next_log:
                            next_log = time.monotonic() + LOG_PROGRESS_EVERY_S
                            logger.info(
                                "prepare: %.0f%% of the input, %d documents, %d tokens, %s",
                                100 * bar.n / max(total_bytes, 1),
                                documents,
                                tokens,
                                path,
                            )
        shards = writer.close()
        skipped = skipped_by_reason["empty"]
        if documents == 0:
            what = (
                f"conversations with an assistant token (skipped: {skipped_by_reason})"
                if chat
                else f"non-empty documents ({len(files)} files, {skipped} empty documents skipped)"
            )
            fix = (
                "check the files and --max-tokens / --overlong"
                if chat
                else (f"check the files, or --text-column / text_column={text_column!r}")
            )
            raise ValueError(f"data source {str(source)!r} holds no {what}: {fix}")
        summary = {
            "out_dir": str(out_dir),
            "source": str(source),
            "input_format": format,
            "files": len(files),
            "documents": documents,
            "tokens": tokens,
            "skipped_empty": skipped,
            "shards": len(shards),
            "tokenizer": text_tokenizer.name,
            "vocab_size": text_tokenizer.vocab_size,
            "min_token_id": min(shard["min_token_id"] for shard in shards),
            "max_token_id": max(shard["max_token_id"] for shard in shards),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if chat:
            summary |= {
                "trained_tokens": trained_tokens,
                "skipped_overlong": skipped_by_reason["overlong"],
                "truncated_overlong": skipped_by_reason["truncated"],
                "skipped_no_assistant_tokens": skipped_by_reason["no_assistant_tokens"],
                "max_tokens": max_tokens,
                "assistant_mask_from": "template generation tags"
                if renderer.uses_generation_tags
                else "template prefixes",
            }
        write_index(
            staged,
            {
                **summary,
                "eos_id": text_tokenizer.eos_id,
                "bos_id": getattr(text_tokenizer, "bos_id", None),
                "pad_id": getattr(text_tokenizer, "pad_id", None),
                "text_column": text_column,
                "label_mask": chat,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "shards": shards,
            },
        )
    return summary


def _with_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    return np.append(ids, np.int32(eos_id)).astype(np.int32)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `longloom data prepare`; `prepare_from_args` runs it."""
    parser.add_argument(
        "source", help=f"a file or folder of {_kinds()} (.txt: one document per file; chat: .jsonl)"
    )
    parser.add_argument("out", help="output folder of Arrow IPC token shards and index.json")
    parser.add_argument("--text-column", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument(
        "--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer folder"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text: plain documents; chat: conversations (JSONL messages / conversations) rendered with the "
        "tokenizer's chat template, trained on assistant tokens only",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="chat: the longest conversation (tokens with EOS) to keep, e.g. data.seq_len; default no limit",
    )
    parser.add_argument(
        "--overlong",
        choices=OVERLONG_CHOICES,
        default=None,
        help="chat: a conversation longer than --max-tokens stops prepare (error, the default), is skipped, "
        "or is truncated to its first --max-tokens tokens",
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output folder that an earlier `longloom data prepare` wrote (never any other folder)",
    )


def prepare_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_dataset(
        args.source,
        args.out,
        text_column=args.text_column,
        tokenizer=args.tokenizer,
        shard_tokens=args.shard_tokens,
        progress=True,
        overwrite=args.overwrite,
        format=args.format,
        max_tokens=args.max_tokens,
        overlong=args.overlong,
    )
