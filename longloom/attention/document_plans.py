"""One model call's packed-document plans: what attention derives from `document_ids`, made once.

Every layer of a step sees the same document ids, and so do each layer's activation-checkpoint
recomputation and its backward. Without this cache every softmax attention call derives the same
things from them again: the ids checked never to decrease (a device->host sync), all-gathered over
the Ulysses group, put in ring order (2D), every ring rank's ids copied to the host
(parallel/ring_plan.RingDocuments: an all-gather and a sync), and the ragged segment plans of the
varlen kernels (attention/varlen_plan.py: a device->host copy and host work per block). That is 32
layers x (forward + recomputation + backward) times the same answers per step.

`DocumentPlans` is made where the ids enter the model (models/llama.py, models/hf.py), one per
model call (so one per micro batch), and handed down next to the ids to every SP attention entry
point (`document_plans=`; optional, None derives everything per call as before). Its lifetime is
explicit: the model call and the autograd graph that call builds (attention's backward reaches it
through its saved context), so nothing outlives the step and nothing is process-global.

Values are keyed on the *identity* of the ids tensor they derive from plus what is derived (kind and
a key such as the process group or the rows), never on the ids' values: a lookup needs no sync, and
ids of another micro batch (another tensor) can never meet a stale plan. The cache keeps each source
tensor alive, so its identity cannot pass to another tensor while the cache lives, and a source
changed in place (its version counter moved) is derived again. Derived tensors (gathered ids) are
themselves sources of later derivations (ring plans), which is why they are cached as tensors.

Every rank of a group builds and hits in the same calls (the same program over the same layers), so
the collectives some builds run (all-gathers of ids) stay matched across ranks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from functools import partial
from typing import TypeVar

import torch

from longloom.attention.documents import check_document_ids

Value = TypeVar("Value")


class DocumentPlans:
    """What attention derives from one model call's document ids, each built once (see module docstring)."""

    def __init__(self) -> None:
        # (id(source), kind, key) -> (source, source._version, value); the source is held so that its
        # id stays its own while the cache lives.
        self._entries: dict[tuple, tuple[torch.Tensor, int, object]] = {}
        # How many values of each kind were built: the evidence that layers share them (tests, benchmarks).
        self.builds: Counter[str] = Counter()

    def get(self, source: torch.Tensor, kind: str, key: Hashable, build: Callable[[], Value]) -> Value:
        """`build()` the first time `kind`/`key` is asked of this `source` tensor, the cached value after."""
        entry_key = (id(source), kind, key)
        entry = self._entries.get(entry_key)
        if entry is not None and entry[0] is source and entry[1] == source._version:
            return entry[2]
        value = build()
        self._entries[entry_key] = (source, source._version, value)
        self.builds[kind] += 1
        return value

    def __len__(self) -> int:
        return len(self._entries)


def cached(
    plans: DocumentPlans | None, source: torch.Tensor, kind: str, key: Hashable, build: Callable[[], Value]
) -> Value:
    """`plans.get(...)` where a cache is given; `build()` on every call without one (the per-call path)."""
    return build() if plans is None else plans.get(source, kind, key, build)


def check_document_ids_once(
    document_ids: torch.Tensor | None, q: torch.Tensor, where: str, plans: DocumentPlans | None
) -> None:
    """`check_document_ids` (its order scan is a device->host sync), once per ids tensor and q's [B, S]."""
    if document_ids is not None:
        check = partial(check_document_ids, document_ids, q, where)
        cached(plans, document_ids, "checked", tuple(q.shape[:2]), check)
