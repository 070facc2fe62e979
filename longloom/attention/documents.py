"""Packed documents: checking `document_ids`, the same-document mask, and which rows of a block can meet.

A packed sample holds several documents back to back; `document_ids` [B, S_local] (integers, in the
same layout and sharding as q) says which document each token belongs to. Ids never decrease along
the original sequence, and every local shard of our layouts holds its chunks in sequence order (zigzag:
chunk r, then chunk 2P-1-r), so ids never decrease along any local shard either. That makes a block's
documents an interval [first id, last id]: two blocks share a document only if their intervals
overlap, and the rows of one block that can meet the other are one contiguous run. Ring schedules use
this to skip whole block pairs and to cut the rest down to the rows that meet; the kernels use it per
tile (attention/blocks.py, attention/triton_flash.py).

With ids, token t attends to token s only if both are in the same document (and s <= t when causal).
"""

from __future__ import annotations

import torch


def check_document_ids(document_ids: torch.Tensor | None, q: torch.Tensor, where: str) -> None:
    """Raises ValueError (naming `where`, the values seen and the fix) unless ids fit q [B, S_local, ...]."""
    if document_ids is None:
        return
    if document_ids.dim() != 2 or tuple(document_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"{where}: document_ids has shape {tuple(document_ids.shape)} but q is {tuple(q.shape)}: pass "
            f"document_ids as [batch, seq_local] = {tuple(q.shape[:2])}, sharded with the tokens "
            "(ParallelDims.shard_batch)"
        )
    if (
        document_ids.dtype.is_floating_point
        or document_ids.dtype.is_complex
        or document_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"{where}: document_ids must be integers; got {document_ids.dtype}: pass torch.long ids"
        )
    if document_ids.size(1) > 1:
        steps = document_ids[:, 1:] - document_ids[:, :-1]
        if bool((steps < 0).any()):
            row, column = (int(i) for i in (steps < 0).nonzero()[0])
            raise ValueError(
                f"{where}: document_ids decrease at local position {column + 1} of row {row} "
                f"({int(document_ids[row, column])} -> {int(document_ids[row, column + 1])}): ids must never "
                "decrease along the sequence; number documents in order (a running count of document "
                "starts, e.g. data/packing.document_ids) and shard them with the tokens"
            )


def document_mask(q_docs: torch.Tensor, k_docs: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, Sq, Sk] bool: query i may see key j (same document, and j <= i when causal, top-left aligned)."""
    mask = q_docs[:, :, None] == k_docs[:, None, :]
    if causal:
        mask = mask & torch.ones(q_docs.size(1), k_docs.size(1), dtype=torch.bool, device=mask.device).tril()
    return mask


def meeting_rows(q_docs: torch.Tensor, k_docs: torch.Tensor) -> tuple[slice, slice] | None:
    """(query rows, key rows) that can share a document, over every batch row; None if none can.

    q_docs [B, Sq], k_docs [B, Sk], each non-decreasing along dim 1 (on the host: called to plan).
    Query rows whose id lies in [first, last] key id (and the converse) form one run per batch row;
    the union of the runs of all batch rows is returned (the mask inside the block does the rest).
    """
    q_first, q_last = q_docs[:, 0], q_docs[:, -1]
    k_first, k_last = k_docs[:, 0], k_docs[:, -1]
    overlap = (q_first <= k_last) & (k_first <= q_last)
    if not bool(overlap.any()):
        return None
    rows = overlap.nonzero().flatten()
    q_docs, k_docs = q_docs[rows], k_docs[rows]
    k_first, k_last, q_first, q_last = k_first[rows], k_last[rows], q_first[rows], q_last[rows]
    q_start = torch.searchsorted(q_docs, k_first[:, None]).min()
    q_stop = torch.searchsorted(q_docs, k_last[:, None], right=True).max()
    k_start = torch.searchsorted(k_docs, q_first[:, None]).min()
    k_stop = torch.searchsorted(k_docs, q_last[:, None], right=True).max()
    return slice(int(q_start), int(q_stop)), slice(int(k_start), int(k_stop))
