"""Packed documents on one GPU: where the masked step's time goes, and what new document lengths cost (issue 16).

    python bench/document_shapes.py [--seq 262144] [--record]
    python bench/document_shapes.py --seq 2048 --heads 4 --kv-heads 2 --head-dim 16 --draws 2 --iters 1
        # CPU smoke test: timings mean nothing

`document_attention` fwd+bwd (bf16, causal) with Ulysses' per-rank share at P=2 (16 query / 4 K/V heads
over all S: bench/documents.py's "1 GPU equal work" row), on the same lognormal (mean 8K) and fixed (2K)
documents as bench/documents.py. Three questions:

1. Repeated vs fresh lengths. bench/documents.py times one draw over and over; a training run on a real
   corpus sees new document lengths every step. A document long enough for the dense kernel is one
   cuDNN call shaped by its length, and torch builds (and caches) a cuDNN graph per shape. Rows: the
   median over --iters of the same draw; each of --draws new draws timed once when first seen, then once
   again (now cached), with the growth of host memory over the two.
2. Where the time of one repeated step goes: torch.profiler's CUDA time by kernel (top --top), the kernels'
   sum beside the step's wall time (the rest is the GPU waiting for the host).
3. The dense kernels' cost per new shape on their own: one fwd+bwd at a shape never used before, then at
   the same shape again, for causal documents and for non-causal rectangles (a ring block's share of a
   document), on cuDNN and on flash (compiled kernels, no per-shape build).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` finds longloom

import argparse
import functools
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import DTYPES, append_record, markdown_table, time_ms
from bench.documents import causal_pairs, document_lengths, ids_from_lengths
from longloom.attention import varlen_plan
from longloom.attention.blocks import block_attention_backward, block_attention_forward, document_attention
from longloom.attention.document_plans import DocumentPlans


def tflops(lengths: list[int], heads: int, head_dim: int, ms: float) -> float:
    """Unmasked fwd+bwd TFLOP/s (bench/documents.py's convention: 3.5 x 4 x Hq x D x pairs)."""
    return 3.5 * 4 * heads * head_dim * causal_pairs(lengths) / (ms * 1e-3) / 1e12


class Step:
    """`--layers` fwd+bwd calls of document_attention sharing one DocumentPlans (as a model's layers
    share their call's plans: ids planned once), on fresh bf16 inputs of a draw's total length.
    Times are per call (`per_call`)."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
        shape = (1, args.seq, args.heads, args.head_dim)
        kv_shape = (1, args.seq, args.kv_heads, args.head_dim)
        self.q, self.k, self.v = (
            torch.randn(s, device=device, dtype=self.dtype).requires_grad_()
            for s in (shape, kv_shape, kv_shape)
        )
        self.dout = torch.randn(shape, device=device, dtype=self.dtype)
        self.layers = args.layers

    def __call__(self, ids: torch.Tensor) -> None:
        plans = DocumentPlans() if self.layers > 1 else None  # 1: each call plans for itself
        inputs = (self.q, self.k, self.v)
        for _ in range(self.layers):
            # autograd.grad, not backward(): a model's layers each have their own inputs, so no call adds into .grad
            torch.autograd.grad(document_attention(*inputs, ids, document_plans=plans), inputs, self.dout)

    def per_call(self, ms: float) -> float:
        return ms / self.layers

    def wall_ms(self, ids: torch.Tensor) -> float:
        """One step's wall time per call, GPU included (synchronized both ends)."""
        synchronize(self.device)
        started = time.perf_counter()
        self(ids)
        synchronize(self.device)
        return self.per_call((time.perf_counter() - started) * 1e3)


def host_rss_mib() -> float:
    """This process's resident host memory (Linux /proc), to see caches that grow with new shapes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeated_and_fresh_rows(args, step: Step) -> list[list[object]]:
    rows = []
    for kind in args.documents:
        first = document_lengths(kind, args.seq, args.mean_doc, args.fixed_doc, seed=0)
        ids = ids_from_lengths(first, step.device)
        repeated = step.per_call(time_ms(functools.partial(step, ids), args.warmup, args.iters))
        rows.append([kind, "repeated (seed 0)", len(first), f"{repeated:.2f}",
                     f"{tflops(first, args.heads, args.head_dim, repeated):.1f}", "-"])  # fmt: skip
        if kind != "lognormal":
            continue  # full and fixed draws are the same every time
        for seed in range(1, args.draws + 1):
            lengths = document_lengths(kind, args.seq, args.mean_doc, args.fixed_doc, seed=seed)
            draw_ids = ids_from_lengths(lengths, step.device)
            rss_before = host_rss_mib()
            new, again = step.wall_ms(draw_ids), step.wall_ms(draw_ids)
            rss_growth = host_rss_mib() - rss_before
            dense_docs = sum(length >= varlen_plan.DENSE_DOCUMENT_TOKENS for length in lengths)
            rates = [f"{tflops(lengths, args.heads, args.head_dim, ms):.1f}" for ms in (new, again)]
            rows.append([kind, f"seed {seed}: new / again ({dense_docs} dense)", len(lengths),
                         f"{new:.2f} / {again:.2f}", " / ".join(rates), f"{rss_growth:+.0f}"])  # fmt: skip
    return rows


def kernel_profile(args, step: Step, kind: str) -> tuple[str, str]:
    """(table of the top kernels by CUDA time in one repeated step, a summary line)."""
    lengths = document_lengths(kind, args.seq, args.mean_doc, args.fixed_doc, seed=0)
    ids = ids_from_lengths(lengths, step.device)
    step(ids)  # shapes cached: the profiled step is a repeated one
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    synchronize(step.device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step(ids)
        synchronize(step.device)
        wall = step.per_call((time.perf_counter() - started) * 1e3)
    if args.trace:  # the timeline: where the GPU waits for the host, and for what
        prof.export_chrome_trace(f"{args.trace}_{kind}.json")
    # Kernels on a GPU; on the CPU smoke run, each op's own CPU time stands in for them. Per call.
    by_name: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if step.device.type != "cuda":
            by_name[event.name].append(step.per_call(event.self_cpu_time_total / 1e3))
        elif event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name].append(step.per_call(event.device_time / 1e3))
    total = sum(sum(times) for times in by_name.values())
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[: args.top]
    table = markdown_table(
        ["kernel", "launches per call", "ms per call", "share of kernel time"],
        [[name[:90], f"{len(times) / step.layers:g}", f"{sum(times):.2f}", f"{sum(times) / max(total, 1e-9):.1%}"]
         for name, times in ranked],
    )  # fmt: skip
    launches = sum(len(t) for t in by_name.values()) / step.layers
    summary = (
        f"{kind}: {len(lengths)} documents, one repeated step of {step.layers} call(s), per call: wall "
        f"{wall:.2f} ms, CUDA kernels {total:.2f} ms in {launches:g} launches, "
        f"{tflops(lengths, args.heads, args.head_dim, wall):.1f} TFLOP/s unmasked by wall time"
    )
    return table, summary


def inside_a_block(q, k, v, dout, causal: bool, block_rows: int):
    """q/k/v/dout placed in blocks of `block_rows` rows (the same for every shape, as a ring schedule's
    blocks are: cuDNN's graph cache keys on strides too), with ids that make the given rows one
    document's share of the block: causal (its first rows on both sides), or a rectangle (the first
    rows of the query block, the last rows of an earlier key block)."""

    def ids(lengths: list[int], first: int) -> torch.Tensor:
        return ids_from_lengths(lengths, q.device) + first

    def placed(x: torch.Tensor, at_end: bool) -> torch.Tensor:
        block = x.new_zeros(1, block_rows, *x.shape[2:])
        (block[:, block_rows - x.size(1) :] if at_end else block[:, : x.size(1)]).copy_(x)
        return block

    queries, keys = q.size(1), k.size(1)
    q, dout = placed(q, False), placed(dout, False)
    k, v = placed(k, not causal), placed(v, not causal)
    q_docs = ids([queries, block_rows - queries], 1)
    k_docs = q_docs if causal else ids([block_rows - keys, keys], 0)
    return q, k, v, dout, {"q_docs": q_docs, "k_docs": k_docs}


def dense_fwd_bwd_ms(q, k, v, dout, causal: bool, backend: str | None, block_rows: int = 0) -> float:
    """Wall time of one dense fwd+bwd on `backend` (None: the default, cuDNN on a GPU), GPU included.

    "varlen": the packed-document path (what the ring runs) on blocks of `block_rows` rows in which the
    queries and keys given are one document's share (inside_a_block)."""
    documents = {}
    if backend == "varlen":
        q, k, v, dout, documents = inside_a_block(q, k, v, dout, causal, block_rows)
        backend = "varlen" if q.is_cuda else "torch"  # CPU smoke run: the masked plain-torch path
    synchronize(q.device)
    started = time.perf_counter()
    out, lse = block_attention_forward(q, k, v, causal, q.size(-1) ** -0.5, backend, **documents)
    block_attention_backward(dout, q, k, v, out, lse, causal, q.size(-1) ** -0.5, backend, **documents)
    synchronize(q.device)
    return (time.perf_counter() - started) * 1e3


def parse_shape(text: str) -> tuple[int, int, bool]:
    """'L' (a causal document of L tokens) or 'QxK' (a non-causal rectangle: Q queries, K keys)."""
    try:
        if "x" in text:
            queries, keys = (int(part) for part in text.split("x"))
            return queries, keys, False
        return int(text), int(text), True
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is L or QxK (e.g. 12289 or 5000x12345); got {text!r}")


def dense_shape_rows(args, device: torch.device) -> list[list[object]]:
    """Each dense backend's fwd+bwd at shapes never used before, then again."""
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    backends = args.dense_backends if device.type == "cuda" else ["torch", "varlen"]
    rows = []
    block_rows = max(max(queries, keys) for queries, keys, _ in args.dense_shapes) + 64
    for queries, keys, causal in args.dense_shapes:
        q = torch.randn(1, queries, args.heads, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, keys, args.kv_heads, args.head_dim, device=device, dtype=dtype)
        v, dout = torch.randn_like(k), torch.randn_like(q)
        for backend in backends:
            run = functools.partial(dense_fwd_bwd_ms, q, k, v, dout, causal, backend, block_rows)
            new = run()
            again = statistics.median(run() for _ in range(3))
            shape = f"{queries} causal" if causal else f"{queries} x {keys}"
            rows.append([shape, backend, f"{new:.2f}", f"{again:.2f}", f"{new - again:.2f}"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=262144)
    parser.add_argument("--heads", type=int, default=16, help="query heads (Ulysses' share of 32 at P=2)")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--documents", nargs="*", default=["lognormal", "fixed"])
    parser.add_argument("--mean-doc", type=int, default=8192)
    parser.add_argument("--fixed-doc", type=int, default=2048)
    parser.add_argument(
        "--draws", type=int, default=4, help="new lognormal draws, each timed when first seen"
    )
    parser.add_argument(
        "--dense-shapes",
        type=parse_shape,
        nargs="*",
        default=[parse_shape(text) for text in ("12289", "20011", "33331", "5003x12345", "9001x3001")],
        help="L: a causal document; QxK: a non-causal rectangle (a ring block's document)",
    )
    parser.add_argument("--dense-backends", nargs="+", default=["cudnn", "flash", "varlen"])
    parser.add_argument(
        "--lengths-per-octave",
        type=int,
        default=None,
        help="sets attention/varlen_plan.DENSE_LENGTHS_PER_OCTAVE for this run (0: documents at their own length)",
    )
    parser.add_argument(
        "--dense-from",
        type=int,
        default=None,
        help="sets attention/varlen_plan.DENSE_DOCUMENT_TOKENS for this run (documents this long or longer "
        "run on the dense kernel, shorter ones on the ragged one)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="calls per step sharing one DocumentPlans, as a model's layers do (times per call); 1: each "
        "call plans for itself",
    )
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--trace", default=None, help="write each profiled step's Chrome trace to TRACE_<documents>.json"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print("no CUDA device: running on CPU as a smoke test; the timings mean nothing")
    if args.lengths_per_octave is not None:
        varlen_plan.DENSE_LENGTHS_PER_OCTAVE = args.lengths_per_octave
    if args.dense_from is not None:
        varlen_plan.DENSE_DOCUMENT_TOKENS = args.dense_from
    print(
        f"long causal documents padded to {varlen_plan.DENSE_LENGTHS_PER_OCTAVE} lengths per octave (0: none)"
    )
    step = Step(args, device)
    headers = ["documents", "draw", "docs", "fwd+bwd ms", "TFLOP/s (unmasked)", "host RSS MiB"]
    sections = [markdown_table(headers, repeated_and_fresh_rows(args, step))] if args.documents else []
    for kind in args.documents:
        table, summary = kernel_profile(args, step, kind)
        sections += [summary, table]
    if args.dense_shapes:
        rows = dense_shape_rows(args, device)
        headers = ["dense shape", "backend", "first call ms", "again ms", "first - again ms"]
        sections.append(markdown_table(headers, rows))
    text = "\n\n".join(sections)
    print(text)
    if args.record:
        what = (
            f"document_attention fwd+bwd on one device, {args.heads} q / {args.kv_heads} K/V heads, D={args.head_dim}, "
            f"S={args.seq}, {args.dtype}, causal: repeated vs new document lengths, a kernel profile of one "
            "repeated step, and the dense kernel's first call at a new length. "
            + (
                f"Per call, in steps of {args.layers} calls sharing one DocumentPlans."
                if args.layers > 1
                else ""
            )
        )
        append_record("Packed documents on one GPU: new lengths and kernel profile (issue 16)", what, text, 1)


if __name__ == "__main__":
    main()
