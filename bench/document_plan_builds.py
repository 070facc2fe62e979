"""How often one training step derives the same things from its packed-document ids (issue 16), with and
without the model call's DocumentPlans (attention/document_plans.py). CPU, gloo: counts, not timings.

    python bench/document_plan_builds.py --layers 32

For each split (one device, Ulysses 2, TokenRing 2, 2D 2 x 2; checkpointed layers, and token-wise
recomputation on one device) one train step (forward, checkpoint recomputation, backward) of a tiny-width
model is run with the ragged (varlen) backend emulated on the CPU (the GPU plumbing, plain-torch kernel),
and every derivation of the ids is counted on rank 0:

- plan_segments: ragged segment plans (on the device path each starts with a device->host copy of the ids;
  ring blocks plan from host ids);
- checks: document-id order checks (`bool(any)`: one device->host sync each);
- ring gathers: RingDocuments (an all-gather and a device->host copy each); row cuts: ring block plans cut
  to the rows that can share a document (host scans of the ids, per block);
- Ulysses gathers: all-gathers of the ids over the Ulysses group;
- linear runs: LASP-2's document runs (a device->host copy) and chunk edges (an all-gather).

"syncs" adds up the device->host synchronisations these would cost on a GPU: a check 1, a plan from
device ids 1, a ring gather 1, linear runs 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` finds longloom

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longloom.attention import blocks, document_plans
from longloom.attention.varlen import EMULATED
from longloom.config import ModelConfig
from longloom.models import llama
from longloom.offload.activations import ActivationOffloader
from longloom.parallel import ParallelDims, lasp2, ring_plan, ulysses
from longloom.parallel.loss import sequence_parallel_cross_entropy

SPLITS = (  # name, ulysses, ring, token-wise recomputation
    ("one device", 1, 1, False),
    ("one device, token-wise", 1, 1, True),
    ("ulysses 2", 2, 1, False),
    ("tokenring 2", 1, 2, False),
    ("2D 2x2", 2, 2, False),
)


@contextlib.contextmanager
def counting(cache: bool):
    """The varlen backend emulated on the CPU, every derivation of the ids counted; `cache=False`: the
    model makes no DocumentPlans (each attention call derives for itself)."""
    counts: Counter[str] = Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    def backend(q, documents=False):
        return "varlen" if documents else "torch"

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        for module in (blocks, ring_plan):
            patch(mock.patch.object(module, "select_backend", backend))
        patch(mock.patch.object(blocks, "ragged_kernel", lambda: EMULATED))
        patch(
            mock.patch.object(blocks, "plan_segments", counted("plans from device ids", blocks.plan_segments))
        )
        patch(
            mock.patch.object(
                ring_plan, "plan_segments", counted("plans from host ids", ring_plan.plan_segments)
            )
        )
        check = counted("checks", document_plans.check_document_ids)
        patch(mock.patch.object(document_plans, "check_document_ids", check))
        gather = counted("ring gathers", ring_plan.RingDocuments.gather)
        patch(mock.patch.object(ring_plan.RingDocuments, "gather", staticmethod(gather)))
        patch(
            mock.patch.object(
                ulysses, "gather_document_ids", counted("ulysses gathers", ulysses.gather_document_ids)
            )
        )
        patch(mock.patch.object(ring_plan, "meeting_rows", counted("row cuts", ring_plan.meeting_rows)))
        runs = counted("linear runs", lasp2._document_runs_and_edges)
        patch(mock.patch.object(lasp2, "_document_runs_and_edges", runs))
        if not cache:
            patch(mock.patch.object(llama, "DocumentPlans", lambda: None))
        yield counts


def _batch(seq: int, documents: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(seq) * documents // seq  # equal documents of seq / documents tokens
    positions = torch.arange(seq) - (ids * (seq // documents))
    return {
        "tokens": torch.randint(0, 64, (1, seq), generator=generator),
        "labels": torch.randint(0, 64, (1, seq), generator=generator),
        "position_ids": positions[None],
        "document_ids": ids[None],
    }


def _worker(rank: int, world: int, port: int, args, split, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    _, ulysses_size, ring_size, token_wise = split
    dims = ParallelDims.build(dp=1, ulysses=ulysses_size, ring=ring_size) if world > 1 else None
    cfg = ModelConfig(
        vocab_size=64, hidden=32, layers=args.layers, heads=4, kv_heads=2, layer_pattern=args.pattern
    )
    checkpoint_fn = ActivationOffloader(0.5, torch.device("cpu")).checkpoint if token_wise else None
    torch.manual_seed(0)
    model = llama.LlamaModel(cfg, dims, checkpoint_fn=checkpoint_fn).train()
    batch = _batch(args.seq, args.documents)
    batch = dims.shard_batch(batch) if dims is not None else batch
    found = {}
    for cache in (False, True):
        with counting(cache) as counts:
            logits = model(batch["tokens"], batch["position_ids"], document_ids=batch["document_ids"])
            group = dims.sp_group if dims is not None else None
            loss, _ = sequence_parallel_cross_entropy(logits, batch["labels"], group=group)
            loss.backward()
        counts["syncs"] = sum(
            counts[name] for name in ("checks", "plans from device ids", "ring gathers", "linear runs")
        )
        found[cache] = dict(counts)
    if rank == 0:
        results.put(found)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--pattern", default="S", help="model.layer_pattern (S softmax, L linear)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--documents", type=int, default=8)
    args = parser.parse_args()
    from longloom.runtime.ranks import free_port

    names = (
        "plans from device ids",
        "plans from host ids",
        "checks",
        "ring gathers",
        "row cuts",
        "ulysses gathers",
    )
    names += ("linear runs", "syncs")
    print(f"{args.layers} layers ({args.pattern!r}), {args.seq} tokens, {args.documents} documents, one step")
    print(f"{'split':24s} {'cache':6s} " + " ".join(names))
    context = mp.get_context("spawn")
    for split in SPLITS:
        world = split[1] * split[2]
        results = context.Queue()
        mp.start_processes(
            _worker, (world, free_port(), args, split, results), nprocs=world, start_method="spawn"
        )
        found = results.get()
        for cache in (False, True):
            row = found[cache]
            cells = " ".join(f"{row.get(name, 0):>{len(name)}d}" for name in names)
            print(f"{split[0]:24s} {'on' if cache else 'off':6s} {cells}")


if __name__ == "__main__":
    main()
