"""Packing a token stream into fixed-length training samples.

Documents lie back to back in the stream, each ending with EOS. Sample i of length S (data.seq_len)
is the window `stream[i*S : i*S + S + 1]`:
- `tokens` = window[:-1] and `labels` = window[1:], shifted here once so that sequence-parallel ranks
  never need their neighbour's first token;
- `position_ids` count from 0 at the window start and restart at 0 after each EOS, so RoPE sees
  per-document positions (Megatron's `reset_position_ids`);
- `document_ids` (with `data.document_masking`, the default) number the documents of the window from 0,
  a new one right after each EOS, so attention stays inside each document (Llama-3-style document
  masking; models/llama.py). They never decrease, as parallel/ sharding expects.

Kept simple on purpose: windows overlap by one token (the last label of sample i is the first token of
sample i+1), so only the tail shorter than a window is unused; the label at an EOS is the next
document's first token, as in GPT-style packing, and is not masked. Nothing is padded.

Chat data (`data prepare --format chat`) carries a label mask per token: a label is -100 where the mask
of the token it names is off (prompts, system turns, template tokens, the EOS between conversations),
so only assistant tokens are trained on. Plain-text folders have no mask: every label counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from longloom.data.arrow import TokenShards

IGNORE_INDEX = -100  # as parallel/loss.py; not imported from there: data/ does not depend on parallel/


def document_position_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Position of each token in its document, [n] int64: 0 at index 0 and right after every EOS."""
    n = len(tokens)
    document_start = np.zeros(n, dtype=np.int64)
    starts = np.flatnonzero(tokens[:-1] == eos_id) + 1
    document_start[starts] = starts
    # Each token's document began at the latest start at or before it.
    return np.arange(n, dtype=np.int64) - np.maximum.accumulate(document_start)


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Which document of the window each token is in, [n] int64: 0 first, +1 right after every EOS."""
    starts = np.zeros(len(tokens), dtype=np.int64)
    starts[1:] = tokens[:-1] == eos_id
    return np.cumsum(starts)


def pack_window(
    window: np.ndarray, eos_id: int, document_masking: bool = True, label_mask: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """A window of S + 1 tokens -> tokens, position_ids, labels (and document_ids), each int64 [S].

    `label_mask` [S + 1] bool (chat data): labels are -100 where the mask of their token is off.
    """
    tokens = np.asarray(window[:-1], dtype=np.int64)
    labels = np.asarray(window[1:], dtype=np.int64)
    if label_mask is not None:
        labels = np.where(label_mask[1:], labels, IGNORE_INDEX)
    sample = {
        "tokens": torch.from_numpy(tokens),
        "position_ids": torch.from_numpy(document_position_ids(tokens, eos_id)),
        "labels": torch.from_numpy(labels),
    }
    if document_masking:
        sample["document_ids"] = torch.from_numpy(document_ids(tokens, eos_id))
    return sample


class PackedTokenDataset:
    """Samples of `seq_len` tokens cut from the memory-mapped shards of a prepared folder."""

    # Neighbouring windows come from the same document: the loader shuffles them each epoch.
    shuffle = True

    def __init__(self, shards: TokenShards, seq_len: int, document_masking: bool = True):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be positive")
        if shards.num_tokens < seq_len + 1:
            raise ValueError(
                f"data folder {str(shards.folder)!r} holds {shards.num_tokens} tokens, fewer than one sample "
                f"needs (data.seq_len + 1 = {seq_len + 1}): lower data.seq_len or prepare more text"
            )
        self.shards = shards
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.eos_id = shards.eos_id
        self.vocab_size = shards.vocab_size
        self._num_samples = (shards.num_tokens - 1) // seq_len

    @classmethod
    def from_folder(
        cls, folder: str | Path, seq_len: int, document_masking: bool = True
    ) -> PackedTokenDataset:
        return cls(TokenShards(folder), seq_len, document_masking)

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self._num_samples:
            raise IndexError(
                f"sample {index} is outside the {self._num_samples} samples of {self.shards.folder}"
            )
        start = index * self.seq_len
        stop = start + self.seq_len + 1
        label_mask = self.shards.label_mask(start, stop) if self.shards.has_label_mask else None
        return pack_window(self.shards.tokens(start, stop), self.eos_id, self.document_masking, label_mask)
