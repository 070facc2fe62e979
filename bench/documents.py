"""Packed documents: document-masked SP attention beside full causal attention (issue 16).

    torchrun --nproc-per-node 2 bench/documents.py --seq 262144 [--record]
    torchrun --nproc-per-node 2 bench/documents.py --seq 4096 --check-seq 1024 --heads 4 --kv-heads 2 \
        --head-dim 16 --iters 1 --warmup 0            # CPU smoke test (gloo): timings mean nothing

One packed sequence of S tokens whose documents follow a length distribution:
- full: one document of S tokens (document ids all equal; must cost what ids=None costs);
- lognormal: lengths drawn from a lognormal with mean --mean-doc (8K) and sigma 1, the last one cut;
- fixed: every document --fixed-doc (2K) tokens long.

For each distribution and method (Ulysses; Ulysses with its exchange pipelined over head chunks;
TokenRing; 2D over every ulysses x ring split of the GPUs) the fwd+bwd time with `document_ids` is set beside the same method's time with full causal attention
(ids=None), and beside one GPU doing the same masked work (Ulysses' share: Hq/P heads over all S, with
the document ids, no communication). TFLOP/s counts only the unmasked work: forward FLOPs =
4 * B * Hq * D * sum(len^2) / 2 (the causal convention of bench/attention.py, per document), fwd+bwd =
3.5 x forward. The target of issue 16: time(masked) <= 1.25 x (masked FLOPs / full FLOPs) x time(full).

Balance: the share of unmasked (query, key) pairs each rank computes under the method's layout
(Ulysses: every rank has all tokens of its heads, so 1.00 always; TokenRing: the zigzag halves of each
rank), reported as max / mean over ranks. Zigzag methods get the documents in the order the trainer
gives them (ParallelDims.balance_documents: reordered so every rank has the same work; the balance as
drawn is shown beside it); --no-reorder times them in the order drawn.

Before timing, each method with document ids is checked at --check-seq tokens (lognormal documents
scaled down) against an fp64 masked reference: bf16 error at most 2x single-GPU bf16's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch or NCCL start: NVLink multicast (NVLS) stays off on the lent machines.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/documents.py` finds longloom

import argparse
import functools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.common import (
    DTYPES,
    append_record,
    check_against_fp64,
    markdown_table,
    print_rank_zero,
    start_bench,
    time_ms,
)
from longloom.attention.document_plans import DocumentPlans
from longloom.parallel import ParallelDims, ulysses_documents
from longloom.parallel.document_balance import balanced_document_order, imbalance, ulysses_rank_work
from longloom.parallel.sharding import shard_sequence, unshard_sequence
from longloom.parallel.tokenring import tokenring_attention
from longloom.parallel.two_d import sequence_parallel_attention
from longloom.parallel.ulysses import kv_head_replication, ulysses_attention
from longloom.parallel.ulysses_documents import plan_document_split

DISTRIBUTIONS = ("full", "lognormal", "fixed")
HEADERS = [
    "documents",
    "method",
    "S",
    "P",
    "docs",
    "masked/full FLOPs",
    "full causal ms",
    "masked ms",
    "time ratio",
    "target ratio",
    "TFLOP/s/GPU (unmasked)",
    "balance max/mean",
]
# (q, k, v, document_ids) on local shards -> out
Attention = Callable[..., torch.Tensor]


def document_lengths(kind: str, seq: int, mean_doc: int, fixed_doc: int, seed: int) -> list[int]:
    """Lengths of the packed documents; they add up to `seq` exactly (the last one is cut)."""
    if kind == "full":
        return [seq]
    if kind == "fixed":
        return [fixed_doc] * (seq // fixed_doc) + ([seq % fixed_doc] if seq % fixed_doc else [])
    generator = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean_doc) - sigma**2 / 2  # mean of the lognormal = exp(mu + sigma^2 / 2)
    lengths, total = [], 0
    while total < seq:
        draw = math.exp(mu + sigma * torch.randn((), generator=generator).item())
        length = min(max(1, round(draw)), seq - total)
        lengths.append(length)
        total += length
    return lengths


def ids_from_lengths(lengths: list[int], device: torch.device) -> torch.Tensor:
    """[1, S] document ids, non-decreasing: document i's tokens carry id i."""
    counts = torch.tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), counts).unsqueeze(0)


def causal_pairs(lengths: list[int]) -> float:
    """Unmasked (query, key) pairs of causal document attention, in the S^2/2 convention."""
    return sum(length * length for length in lengths) / 2


def plain_exchange_ulysses(q, k, v, document_ids=None, document_plans=None) -> torch.Tensor:
    """ulysses_attention over the world group with the document-local split turned off (its balance
    bound at 0 refuses every split; the choice is made in forward, the backward follows it)."""
    bound = ulysses_documents.DOCUMENT_LOCAL_BALANCE
    ulysses_documents.DOCUMENT_LOCAL_BALANCE = 0.0
    try:
        return ulysses_attention(
            q, k, v, dist.group.WORLD, True, document_ids=document_ids, document_plans=document_plans
        )
    finally:
        ulysses_documents.DOCUMENT_LOCAL_BALANCE = bound


def sp_methods(world: int, heads: int, kv_heads: int) -> dict[str, tuple[Attention, str]]:
    """name -> (attention over local shards taking document_ids, layout of the shards)."""
    group = dist.group.WORLD
    methods: dict[str, tuple[Attention, str]] = {
        "ulysses": (functools.partial(ulysses_attention, group=group, causal=True), "contiguous"),
        # The exchange pipelined with attention over head chunks (parallel/ulysses_pipeline.py, C chosen
        # by size): with documents there is ~20x less attention work to hide the same all-to-all behind.
        "ulysses pipelined": (
            functools.partial(ulysses_attention, group=group, causal=True, head_chunks=None),
            "contiguous",
        ),
        "tokenring": (
            functools.partial(tokenring_attention, group=group, causal=True, layout="zigzag"),
            "zigzag",
        ),
    }
    if world > 1:
        # Ulysses without its document-local split (parallel/ulysses_documents.py): every token's heads
        # exchanged, the A/B of that split.
        methods["ulysses plain exchange"] = (plain_exchange_ulysses, "contiguous")
    for ulysses in range(1, world + 1):
        if world % ulysses:
            continue
        try:
            kv_head_replication(heads, kv_heads, ulysses)
        except ValueError:
            continue
        dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=world // ulysses)
        methods[f"2d {ulysses}x{world // ulysses}"] = (
            functools.partial(sequence_parallel_attention, dims=dims, causal=True),
            dims.layout,
        )
    return methods


def masked_reference(q, k, v, ids: torch.Tensor) -> torch.Tensor:
    """Plain masked attention on whole sequences (any dtype): softmax over same-document earlier keys."""
    repeat = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    seq = q.size(1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    mask = causal & (ids[:, :, None] == ids[:, None, :])[:, None]  # [B, 1, S, S]
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.size(-1))
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhst,bthd->bshd", probs, v)


def check_methods(args, methods, device: torch.device) -> list[str]:
    seq = args.check_seq
    lengths = document_lengths("lognormal", seq, max(2, seq // 32), 0, seed=7)
    lengths[0:2] = [1, lengths[0] + lengths[1] - 1]  # a one-token document too
    ids = ids_from_lengths(lengths, device)
    generator = torch.Generator(device=device).manual_seed(1234)

    def full(heads: int) -> torch.Tensor:
        return torch.randn(
            (1, seq, heads, args.head_dim), generator=generator, device=device, dtype=torch.float64
        )

    q, k, v, dout = full(args.heads), full(args.kv_heads), full(args.kv_heads), full(args.heads)

    def run(attention: Attention, dtype: torch.dtype, layout: str | None) -> list[torch.Tensor]:
        def prepare(t: torch.Tensor) -> torch.Tensor:
            return t if layout is None else shard_sequence(t, 1, dist.group.WORLD, layout)

        inputs = [prepare(t).to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, document_ids=prepare(ids))
        out.backward(prepare(dout).to(dtype))
        results = [out.detach(), *(t.grad for t in inputs)]
        if layout is not None:
            results = [unshard_sequence(t.contiguous(), 1, dist.group.WORLD, layout) for t in results]
        return [t.double() for t in results]

    def reference(q, k, v, document_ids):
        return masked_reference(q, k, v, document_ids)

    dtype = DTYPES[args.dtype]
    want = run(reference, torch.float64, None)
    single = run(reference, dtype, None)
    return [
        check_against_fp64(
            f"{name} with {len(lengths)} documents at S={seq}", want, single, run(fn, dtype, lay)
        )
        for name, (fn, lay) in methods.items()
    ]


def time_step(attention: Attention, args, seq: int, world: int, ids_local, device, heads: int, kv: int):
    """Median fwd+bwd milliseconds of `attention` on fresh [1, S/P, H, D] shards.

    With document ids and --layers N, one timed run is N calls sharing one DocumentPlans, as the layers
    of one model call share it (the ids checked, gathered and planned once), and the time is per call."""
    dtype = DTYPES[args.dtype]

    def randn(h: int) -> torch.Tensor:
        return torch.randn(1, seq // world, h, args.head_dim, device=device, dtype=dtype).requires_grad_()

    q, k, v = randn(heads), randn(kv), randn(kv)
    dout = torch.randn_like(q)
    layers = args.layers if ids_local is not None else 1

    def step() -> None:
        plans = DocumentPlans() if ids_local is not None else None  # one model call's cache
        for _ in range(layers):
            # autograd.grad, not backward(): a model's layers each have their own inputs, so no call adds into .grad
            out = attention(q, k, v, document_ids=ids_local, document_plans=plans)
            torch.autograd.grad(out, (q, k, v), dout)

    return time_ms(step, args.warmup, args.iters, dist.group.WORLD) / layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[262144])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--documents", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
    parser.add_argument(
        "--no-reorder",
        action="store_true",
        help="zigzag methods: keep the documents in the order drawn (the trainer reorders them for balance)",
    )
    parser.add_argument("--mean-doc", type=int, default=8192, help="lognormal: mean document length")
    parser.add_argument("--fixed-doc", type=int, default=2048, help="fixed: document length")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of ulysses, tokenring, '2d UxR'")
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="time document-masked calls in groups of this many sharing one DocumentPlans, as a model's "
        "layers do (per-call time reported); 1: every call plans for itself. Each masked row then runs "
        "N times as long: at 256K the one-document row ('full') takes about 2 s a call on an H200",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--check-seq", type=int, default=4096, help="S of the correctness check (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world, device = start_bench()
    methods = sp_methods(world, args.heads, args.kv_heads)
    if args.methods:
        methods = {name: method for name, method in methods.items() if name in args.methods}
    notes = check_methods(args, methods, device) if args.check_seq else []
    for line in notes:
        print_rank_zero(line)
    # One GPU doing Ulysses' per-rank share of the masked work, no communication.
    alone = dist.new_group([dist.get_rank()])
    equal_work_heads = args.heads // world
    equal_work_kv = args.kv_heads * kv_head_replication(args.heads, args.kv_heads, world) // world
    equal_work = functools.partial(ulysses_attention, group=alone, causal=True)

    rows = []
    for seq in args.seq:
        full_ms = {
            name: time_step(fn, args, seq, world, None, device, args.heads, args.kv_heads)
            for name, (fn, _) in methods.items()
        }
        full_ms["1 GPU equal work"] = time_step(
            equal_work, args, seq * world, world, None, device, equal_work_heads, equal_work_kv
        )
        for kind in args.documents:
            lengths = document_lengths(kind, seq, args.mean_doc, args.fixed_doc, args.seed)
            ids = ids_from_lengths(lengths, device)
            share = causal_pairs(lengths) / causal_pairs([seq])
            unmasked_flops = 3.5 * 4 * args.heads * args.head_dim * causal_pairs(lengths)
            cases = [(name, fn, layout) for name, (fn, layout) in methods.items()]
            cases.append(("1 GPU equal work", equal_work, None))
            for name, fn, layout in cases:
                if layout is None:
                    local_ids, heads, kv, tokens = ids, equal_work_heads, equal_work_kv, seq * world
                    balance = "1 GPU"
                elif layout == "zigzag":
                    # As the trainer does (ParallelDims.balance_documents): documents reordered so that
                    # the zigzag chunks give every rank the same work; --no-reorder: the order as drawn.
                    order = (
                        range(len(lengths)) if args.no_reorder else balanced_document_order(lengths, world)
                    )
                    ordered = [lengths[i] for i in order]
                    local_ids = shard_sequence(ids_from_lengths(ordered, device), 1, dist.group.WORLD, layout)
                    heads, kv, tokens = args.heads, args.kv_heads, seq
                    balance = f"{imbalance(ordered, world):.3f}"
                    if not args.no_reorder:
                        balance += f" (as drawn {imbalance(lengths, world):.3f})"
                elif name == "ulysses plain exchange" or world == 1:
                    local_ids = shard_sequence(ids, 1, dist.group.WORLD, layout)
                    heads, kv, tokens = args.heads, args.kv_heads, seq
                    balance = "1.000"
                else:
                    # Ulysses' document-local split (parallel/ulysses_documents.py): documents reordered as
                    # the trainer does for it (ParallelDims.balance_documents); it runs where this keeps the
                    # ranks within its bound, else the plain exchange (balanced by heads) does.
                    order = (
                        range(len(lengths))
                        if args.no_reorder
                        else balanced_document_order(lengths, world, rank_work=ulysses_rank_work)
                    )
                    ordered = [lengths[i] for i in order]
                    ordered_ids = ids_from_lengths(ordered, device)
                    local_ids = shard_sequence(ordered_ids, 1, dist.group.WORLD, layout)
                    heads, kv, tokens = args.heads, args.kv_heads, seq
                    # Which path the call takes: the split, or the plain exchange it gives way to.
                    split = plan_document_split(ordered_ids, world, dist.get_rank(), True)
                    path = "split" if split is not None else "plain exchange"
                    balance = f"{imbalance(ordered, world, ulysses_rank_work):.3f} ({path})"
                masked_ms = time_step(fn, args, tokens, world, local_ids, device, heads, kv)
                ratio = masked_ms / full_ms[name]
                rows.append(
                    [
                        f"{kind} ({len(lengths)} docs)",
                        name,
                        seq,
                        world,
                        len(lengths),
                        f"{share:.4f}",
                        f"{full_ms[name]:.2f}",
                        f"{masked_ms:.2f}",
                        f"{ratio:.4f}",
                        f"<= {1.25 * share:.4f}",
                        f"{unmasked_flops / world / masked_ms / 1e9:.1f}",
                        balance,
                    ]
                )
                print_rank_zero(" | ".join(str(cell) for cell in rows[-1]))
    what = (
        f"Document-masked attention fwd+bwd, {args.dtype}, causal, Hq={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, B=1; lognormal mean {args.mean_doc}, sigma 1; fixed {args.fixed_doc}. "
        "TFLOP/s per GPU counts unmasked FLOPs only (3.5 x 4 x Hq x D x sum(len^2)/2 / P / time); time ratio = "
        "masked / full causal of the same method; target ratio = 1.25 x masked/full FLOPs. '1 GPU equal work' "
        "= Ulysses' per-rank share (Hq/P heads, all S) on one GPU with the same ids, no communication. "
        "Balance = max/mean of the unmasked pairs each rank's queries own (Ulysses' plain exchange: by "
        "heads, 1.00; other Ulysses rows: as its document-local split counts them, the pairs of a rank's "
        "own documents plus 1/P of the crossing ones', parallel/document_balance.ulysses_rank_work, and in "
        "brackets the path taken: the split, or the plain exchange where it would be out of balance or no "
        "document lies inside a shard; zigzag splits: by the zigzag halves, "
        + (
            "documents in the order drawn). "
            if args.no_reorder
            else "documents reordered as the trainer does, parallel/document_balance.py; in brackets: as drawn). "
        )
        + f"Median of {args.iters} after {args.warmup} warmup, slowest rank. "
        + (
            f"Masked times are per call in groups of {args.layers} calls sharing one DocumentPlans, as the "
            "layers of one model call do (ids checked, gathered and planned once per group). "
            if args.layers > 1
            else "Every masked call plans for itself (no DocumentPlans shared). "
        )
        + " ".join(notes)
    )
    table = markdown_table(HEADERS, rows)
    print_rank_zero(f"\n{what}\n\n{table}")
    if args.record and dist.get_rank() == 0:
        print_rank_zero(f"appended to {append_record(f'Packed documents, P={world}', what, table, world)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
