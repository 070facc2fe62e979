"""Document ids for packed-sample tests: the boundary cases every SP method must get right."""

from __future__ import annotations

import torch


def lengths_to_ids(lengths: list[int], first_id: int = 0) -> torch.Tensor:
    return torch.cat([torch.full((n,), first_id + i, dtype=torch.long) for i, n in enumerate(lengths)])


def packed_batch(lengths: list[list[int]], vocab: int = 61) -> dict[str, torch.Tensor]:
    """A model batch of len(lengths) rows packed from documents of those lengths (each row's lengths sum to
    the row's tokens): random tokens and labels (seeded), positions restarting at each document, ids."""
    generator = torch.Generator().manual_seed(2)
    seq = sum(lengths[0])
    tokens = torch.randint(0, vocab, (len(lengths), seq), generator=generator)
    labels = torch.randint(0, vocab, (len(lengths), seq), generator=generator)
    ids = torch.stack([lengths_to_ids(row) for row in lengths])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return {"tokens": tokens, "position_ids": positions, "labels": labels, "document_ids": ids}


def packed_document_ids(seq: int, chunks: int, seed: int = 0) -> torch.Tensor:
    """[2, seq] ids; `chunks` is the number of equal layout chunks (P contiguous, 2P zigzag).

    Row 0, built from the chunk length c: a one-token document, one ending exactly on the first chunk
    edge, one longer than two chunks (longer than a shard), a boundary inside a chunk, then many short
    documents (several per chunk). Row 1: random lengths 1..c+2 (other boundaries: the union over batch
    rows must still be exact).
    """
    c = seq // chunks
    lengths = [1, c - 1, max(1, min(2 * c + c // 2, seq - c - 4)), 3]
    while sum(lengths) < seq:
        lengths.append(1 + (len(lengths) * 5) % 4)
    generator = torch.Generator().manual_seed(seed)
    random_lengths: list[int] = []
    while sum(random_lengths) < seq:
        random_lengths.append(int(torch.randint(1, c + 3, (1,), generator=generator)))
    rows = [lengths_to_ids(lengths)[:seq], lengths_to_ids(random_lengths, 7)[:seq]]
    return torch.stack(rows)
