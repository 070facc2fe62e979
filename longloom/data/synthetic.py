"""Long-context tasks made on the fly, and `build_dataset`, which turns `data.source` into a dataset.

- `synthetic:passkey` - passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a random
  5-digit number hidden at a random depth of long filler text, asked for at the very end. Only a model
  that attends across the whole sequence can answer.
- `synthetic:recall` - multi-query associative recall (Arora et al. 2023, "Zoology"): key:value pairs,
  then queries of earlier keys whose values must be recalled; the test linear attention fails first.

Samples are byte-tokenizer ids (vocabulary 259), one document of exactly `seq_len` tokens. Sample i is
a pure function of (seed, i), so any worker rebuilds any sample without coordination, and the index
space is effectively infinite. Labels are -100 everywhere except the answer tokens (the passkey
digits; the recalled values), so the loss measures the task itself rather than predictable filler.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

from longloom.config import DataConfig
from longloom.data.packing import PackedTokenDataset
from longloom.data.tokenize import BOS_ID, BYTE_VOCAB_SIZE

IGNORE_INDEX = -100
SYNTHETIC_PREFIX = "synthetic:"

# The filler of the original passkey test; it never contains "key:".
PASSKEY_FILLER = np.frombuffer(
    b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
    dtype=np.uint8,
)
PASSKEY_DIGITS = 5
# Needle "key: 12345. " and question "key: " + answer: the answer is the only thing to predict.
_NEEDLE_HEAD, _NEEDLE_TAIL, _QUESTION = b"key: ", b". ", b"key: "
PASSKEY_MIN_SEQ_LEN = len(_NEEDLE_HEAD) + PASSKEY_DIGITS + len(_NEEDLE_TAIL) + len(_QUESTION) + PASSKEY_DIGITS

RECALL_VALUE_DIGITS = 4
_RECALL_PAIR_SEPARATOR, _RECALL_QUERY_SEPARATOR = ord(":"), ord("?")


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)


def _digits(numbers: np.ndarray, width: int, base: int, first: int) -> np.ndarray:
    """[n] integers -> [n, width] byte ids of their fixed-width digits (`first` = id of digit 0)."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (numbers[:, None] // powers) % base + first


def passkey_window(seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(window [seq_len + 1] int64, answer mask [seq_len + 1] bool): BOS, filler with the needle, question, answer."""
    if seq_len < PASSKEY_MIN_SEQ_LEN:
        raise ValueError(
            f"data.seq_len={seq_len} is too short for synthetic:passkey: set data.seq_len >= {PASSKEY_MIN_SEQ_LEN}"
        )
    passkey = _bytes(str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS))).encode())
    needle = np.concatenate([_bytes(_NEEDLE_HEAD), passkey, _bytes(_NEEDLE_TAIL)])
    filler_len = seq_len - PASSKEY_MIN_SEQ_LEN
    filler = np.resize(PASSKEY_FILLER, filler_len).astype(np.int64)
    # Hide the needle between sentences, at the start, or at the end of the filler.
    sentence_ends = np.flatnonzero((filler[:-1] == ord(".")) & (filler[1:] == ord(" "))) + 2
    depths = np.concatenate([[0], sentence_ends, [filler_len]])
    depth = int(depths[rng.integers(len(depths))])
    window = np.concatenate([[BOS_ID], filler[:depth], needle, filler[depth:], _bytes(_QUESTION), passkey])
    answer = np.zeros(seq_len + 1, dtype=bool)
    answer[-PASSKEY_DIGITS:] = True
    return window, answer


def _recall_shape(seq_len: int) -> tuple[int, int, int]:
    """(key letters, pairs, queries): the shortest keys with at least 4x more possible keys than pairs."""
    for key_letters in range(2, 12):
        width = key_letters + RECALL_VALUE_DIGITS + 2
        records = (seq_len - 1) // width
        queries = max(1, records // 3)
        pairs = records - queries
        if records >= 2 and 26**key_letters >= 4 * pairs:
            return key_letters, pairs, queries
    raise ValueError(
        f"data.seq_len={seq_len} is too short for synthetic:recall (one pair and one query): "
        f"set data.seq_len >= {2 * (2 + RECALL_VALUE_DIGITS + 2) + 1}"
    )


def recall_window(seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(window, answer mask): BOS, "abcd:0123 " pairs, spaces, a newline, "abcd?0123 " queries of earlier keys."""
    key_letters, pairs, queries = _recall_shape(seq_len)
    width = key_letters + RECALL_VALUE_DIGITS + 2
    keys = _digits(rng.choice(26**key_letters, size=pairs, replace=False), key_letters, 26, ord("a"))
    values = _digits(rng.integers(0, 10**RECALL_VALUE_DIGITS, size=pairs), RECALL_VALUE_DIGITS, 10, ord("0"))
    asked = rng.choice(pairs, size=queries, replace=False)

    def records(key_rows: np.ndarray, value_rows: np.ndarray, separator: int) -> np.ndarray:
        column = np.full((len(key_rows), 1), 0, dtype=np.int64)
        return np.concatenate([key_rows, column + separator, value_rows, column + ord(" ")], axis=1)

    padding = (seq_len - 1) % width
    pair_part = records(keys, values, _RECALL_PAIR_SEPARATOR).ravel()
    query_part = records(keys[asked], values[asked], _RECALL_QUERY_SEPARATOR).ravel()
    window = np.concatenate([[BOS_ID], pair_part, np.full(padding, ord(" ")), [ord("\n")], query_part])
    is_value = np.zeros((queries, width), dtype=bool)
    is_value[:, key_letters + 1 : key_letters + 1 + RECALL_VALUE_DIGITS] = True
    answer = np.concatenate([np.zeros(len(window) - is_value.size, dtype=bool), is_value.ravel()])
    return window, answer


class SyntheticTaskDataset:
    """Sample i of a task = a window drawn from a generator seeded by (seed, i)."""

    # Samples are independent draws already; the loader does not need to shuffle them.
    shuffle = False
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(
        self, name: str, make_window: Callable, seq_len: int, seed: int, document_masking: bool = True
    ):
        self.name = name
        # A sample is one document (ids all 0): the same contract as packed data, nothing masked.
        self.document_masking = document_masking
        self.make_window = make_window
        self.seq_len = seq_len
        self.seed = seed
        self.make_window(seq_len, np.random.default_rng(0))  # a too-short seq_len fails here, not mid-run

    def __len__(self) -> int:
        return sys.maxsize

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed % 2**64, index])
        return self.make_window(self.seq_len, rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise IndexError(f"sample {index} of {self.name} must be non-negative")
        window, answer = self.window(index)
        labels = np.where(answer[1:], window[1:], IGNORE_INDEX)
        sample = {
            "tokens": torch.from_numpy(np.ascontiguousarray(window[:-1], dtype=np.int64)),
            "position_ids": torch.arange(self.seq_len, dtype=torch.int64),
            "labels": torch.from_numpy(labels.astype(np.int64)),
        }
        if self.document_masking:
            sample["document_ids"] = torch.zeros(self.seq_len, dtype=torch.int64)
        return sample


SYNTHETIC_TASKS: dict[str, Callable] = {"passkey": passkey_window, "recall": recall_window}


def build_dataset(
    data_cfg: DataConfig, seed: int, vocab_size: int | None = None
) -> SyntheticTaskDataset | PackedTokenDataset:
    """`data.source` "synthetic:<task>" or a folder made by `longloom data prepare`.

    With `vocab_size` (the model's), data tokenized with a larger vocabulary is refused up front.
    """
    source = data_cfg.source
    if source.startswith(SYNTHETIC_PREFIX):
        task = source[len(SYNTHETIC_PREFIX) :]
        if task not in SYNTHETIC_TASKS:
            choices = ", ".join(SYNTHETIC_PREFIX + name for name in SYNTHETIC_TASKS)
            raise ValueError(f"data.source={source!r} is not a synthetic task: choose one of {choices}")
        dataset = SyntheticTaskDataset(
            source, SYNTHETIC_TASKS[task], data_cfg.seq_len, seed, data_cfg.document_masking
        )
    else:
        dataset = PackedTokenDataset.from_folder(source, data_cfg.seq_len, data_cfg.document_masking)
    if vocab_size is not None and dataset.vocab_size > vocab_size:
        raise ValueError(
            f"data.source={source!r} uses a vocabulary of {dataset.vocab_size} tokens but model.vocab_size="
            f"{vocab_size}: set model.vocab_size={dataset.vocab_size}"
        )
    return dataset
