"""TokenRing vs classic K/V ring vs 2D hybrid vs torch context_parallel vs one GPU, and a P2P probe.

    torchrun --nproc-per-node 8 bench/ring.py --seq 65536 262144 1048576 [--record]
    torchrun --nproc-per-node 8 bench/ring.py --methods p2p            # only the link probe

Methods (bf16, causal, Hq = 32, Hkv = 8, D = 128, B = 1 by default; S = whole sequence, P = GPUs):
- sdpa (equal work): torch SDPA (cuDNN where aten picks it) on ONE GPU over [B, S, Hq/P, D] queries
  and max(Hkv, P)/P K/V heads: the per-GPU FLOPs of the P-GPU methods, no communication.
- tokenring: longloom.parallel.tokenring (Q travels forward, partial out/lse back to its owner;
  K/V stay), zigzag layout when causal.
- ring-kv: longloom.parallel.ring_baseline (K/V travel one way, Q stays), zigzag when causal.
- hybrid UxR: longloom.parallel.hybrid.sequence_parallel_attention with ulysses = U, ring = R
  (Ulysses all-to-all inside groups of U neighbouring ranks, TokenRing across them); every split
  with U, R > 1 that the heads allow, or those given by --hybrid.
- torch-cp: torch.distributed.tensor.experimental.context_parallel (bench/attention.py's runner).
- p2p: the link probe below.

FLOPs as in bench/attention.py: forward = 4 * B * S^2 * Hq * D (halved when causal), forward +
backward = 3.5 x forward; TFLOP/s per GPU = FLOPs / P / time (median of --iters, slowest rank).

P2P probe: every rank sends one message of M MiB to its ring successor ("one direction"), or one to
its successor and one to its predecessor at once ("both"), through the same batched isend/irecv the
schedules use (parallel/p2p.py). Reported: GB/s sent per GPU, the ring total (x P) and the ratio
both / one; TokenRing's premise is that this ratio is near 2 (full-duplex links).

Before timing, each ring method is checked at --check-seq tokens against an fp64 reference: its bf16
error (out, dq, dk, dv) must be at most 2x that of single-GPU bf16 SDPA on the same inputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch or NCCL start: NVLink multicast (NVLS) stays off on the lent machines.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/ring.py` finds longloom

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from bench.attention import Case, Setup, measure_row, sdpa_equal_work, torch_context_parallel
from bench.common import (
    ATTENTION_HEADERS,
    DTYPES,
    append_record,
    check_against_fp64,
    markdown_table,
    print_rank_zero,
    start_bench,
    time_ms,
)
from longloom.attention.blocks import select_backend
from longloom.attention.reference import reference_attention
from longloom.parallel import ParallelDims
from longloom.parallel.hybrid import choose_ring_degree, sequence_parallel_attention
from longloom.parallel.p2p import RingComm
from longloom.parallel.ring_baseline import ring_attention
from longloom.parallel.sharding import shard_sequence, unshard_sequence
from longloom.parallel.tokenring import tokenring_attention
from longloom.parallel.ulysses import kv_head_replication, sdpa_attention

METHODS = ("sdpa", "tokenring", "ring-kv", "hybrid", "torch-cp", "p2p")
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_dims: dict[tuple[int, int], ParallelDims] = {}


def parallel_dims(ulysses: int, ring: int) -> ParallelDims:
    """Groups are created once per split (new_group is collective and not free)."""
    if (ulysses, ring) not in _dims:
        _dims[(ulysses, ring)] = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    return _dims[(ulysses, ring)]


def ring_methods(setup: Setup, splits: list[tuple[int, int]]) -> dict[str, tuple[Attention, str]]:
    """name -> (attention on local shards, layout of the shards) for the longloom SP methods."""
    layout = "zigzag" if setup.causal else "contiguous"
    group, causal = setup.group, setup.causal
    methods: dict[str, tuple[Attention, str]] = {
        "tokenring": (
            functools.partial(tokenring_attention, group=group, causal=causal, layout=layout),
            layout,
        ),
        "ring-kv": (functools.partial(ring_attention, group=group, causal=causal, layout=layout), layout),
    }
    for ulysses, ring in splits:
        dims = parallel_dims(ulysses, ring)
        attention = functools.partial(sequence_parallel_attention, dims=dims, causal=causal)
        methods[f"hybrid {ulysses}x{ring}"] = (attention, dims.layout)
    return methods


@contextlib.contextmanager
def sharded_case(setup: Setup, seq: int, attention: Attention, note: str) -> Iterator[Case]:
    world = setup.world_size
    q = setup.randn(setup.batch, seq // world, setup.heads, setup.head_dim)
    k = setup.randn(setup.batch, seq // world, setup.kv_heads, setup.head_dim)
    v = setup.randn(setup.batch, seq // world, setup.kv_heads, setup.head_dim)
    yield Case(
        forward=lambda: attention(q, k, v),
        inputs=[q, k, v],
        dout=torch.randn_like(q),
        kernel=select_backend(q),
        note=note,
    )


def measure(
    setup: Setup, label: str, runner: Callable[[], contextlib.AbstractContextManager[Case]], seq: int, args
) -> list[object]:
    """One table row (bench/attention.py `measure_row`); only torch context_parallel may fail softly."""
    return measure_row(setup, label, runner, seq, args.warmup, args.iters, may_fail=label == "torch-cp")


def check_methods(setup: Setup, seq: int, methods: dict[str, tuple[Attention, str]]) -> list[str]:
    """bf16 result of each method vs fp64 on the full sequence: at most 2x single-GPU bf16's error."""
    generator = torch.Generator(device=setup.device).manual_seed(1234)  # same tensors on every rank

    def full(heads: int) -> torch.Tensor:
        shape = (setup.batch, seq, heads, setup.head_dim)
        return torch.randn(shape, generator=generator, device=setup.device, dtype=torch.float64)

    q, k, v, dout = full(setup.heads), full(setup.kv_heads), full(setup.kv_heads), full(setup.heads)

    def run(attention: Attention, dtype: torch.dtype, layout: str | None) -> list[torch.Tensor]:
        def prepare(t: torch.Tensor) -> torch.Tensor:
            return t if layout is None else shard_sequence(t, 1, setup.group, layout)

        inputs = [prepare(t).to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(prepare(dout).to(dtype))
        results = [out.detach(), *(t.grad for t in inputs)]
        if layout is not None:
            results = [unshard_sequence(t.contiguous(), 1, setup.group, layout) for t in results]
        return [t.double() for t in results]

    want = run(functools.partial(reference_attention, causal=setup.causal), torch.float64, None)
    single = run(functools.partial(sdpa_attention, causal=setup.causal), setup.dtype, None)
    lines = []
    for name, (attention, layout) in methods.items():
        got = run(attention, setup.dtype, layout)
        lines.append(check_against_fp64(f"{name} check at S={seq}, P={setup.world_size}", want, single, got))
    return lines


def exchange(comm: RingComm, sends, recvs) -> None:
    comm.start(sends, recvs, "p2p probe").wait()


def p2p_probe(setup: Setup, sizes_mib: list[int], args) -> list[list[object]]:
    """Rows: MiB, one-direction GB/s per GPU and ring total, both-directions GB/s and total, ratio."""
    comm = RingComm(setup.group)
    world = setup.world_size
    rows = []
    for mib in sizes_mib:
        numel = mib * 2**20 // 2
        send_next, send_prev, from_prev, from_next = (
            torch.empty(numel, dtype=torch.bfloat16, device=setup.device) for _ in range(4)
        )

        next_rank, prev_rank = comm.next_rank, comm.prev_rank
        one_direction = functools.partial(exchange, comm, [(send_next, next_rank)], [(from_prev, prev_rank)])
        both_directions = functools.partial(
            exchange,
            comm,
            [(send_next, next_rank), (send_prev, prev_rank)],
            [(from_prev, prev_rank), (from_next, next_rank)],
        )
        one_ms = time_ms(one_direction, args.warmup, args.iters, setup.group)
        both_ms = time_ms(both_directions, args.warmup, args.iters, setup.group)
        one = mib * 2**20 / one_ms / 1e6  # GB/s sent per GPU
        both = 2 * mib * 2**20 / both_ms / 1e6
        rows.append(
            [
                mib,
                f"{one:.1f}",
                f"{world * one:.1f}",
                f"{both:.1f}",
                f"{world * both:.1f}",
                f"{both / one:.2f}",
            ]
        )
        print_rank_zero(" | ".join(str(cell) for cell in rows[-1]))
    return rows


def hybrid_splits(args, world: int) -> list[tuple[int, int]]:
    if args.hybrid:
        splits = [tuple(int(x) for x in text.split("x")) for text in args.hybrid]
        for ulysses, ring in splits:
            if ulysses * ring != world:
                raise SystemExit(f"--hybrid {ulysses}x{ring}: ulysses * ring must equal the {world} GPUs")
        return splits  # type: ignore[return-value]
    splits = []
    for ulysses in range(2, world):
        if world % ulysses:
            continue
        try:
            kv_head_replication(args.heads, args.kv_heads, ulysses)
        except ValueError:
            continue
        splits.append((ulysses, world // ulysses))
    return splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seq", type=int, nargs="+", default=[65536, 262144, 1048576], help="whole-sequence S"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv (GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--hybrid", nargs="+", default=None, help="splits UxR to run (default: every one)")
    parser.add_argument("--p2p-mib", type=int, nargs="+", default=[16, 64, 256], help="probe message sizes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--cp-rotate", choices=("allgather", "alltoall"), default="allgather")
    parser.add_argument("--check-seq", type=int, default=2048, help="S of the correctness check (0: skip)")
    parser.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world, device = start_bench()
    for seq in [*args.seq, *([args.check_seq] if args.check_seq else [])]:
        if seq % (2 * world):
            raise SystemExit(
                f"--seq/--check-seq {seq} must be a multiple of 2 x {world} GPUs (zigzag layout)"
            )
    setup = Setup.from_args(args, device, world)
    splits = hybrid_splits(args, world) if "hybrid" in args.methods else []
    methods = ring_methods(setup, splits)
    methods = {name: method for name, method in methods.items() if name.split()[0] in args.methods}
    notes = check_methods(setup, args.check_seq, methods) if args.check_seq and methods else []
    for line in notes:
        print_rank_zero(line)
    rows = []
    for seq in args.seq:
        auto = choose_ring_degree(world, args.heads, args.kv_heads, seq, args.head_dim)
        auto_name = "tokenring" if auto == world else f"hybrid {world // auto}x{auto}"
        runners: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Case]]]] = []
        if "sdpa" in args.methods:
            runners.append(("sdpa (equal work)", functools.partial(sdpa_equal_work, setup, seq)))
        for name, (attention, layout) in methods.items():
            note = f"{layout} layout" + (
                " (parallel.ring=auto picks this split)" if name == auto_name else ""
            )
            runners.append((name, functools.partial(sharded_case, setup, seq, attention, note)))
        if "torch-cp" in args.methods:
            runners.append(("torch-cp", functools.partial(torch_context_parallel, setup, seq)))
        for label, runner in runners:
            rows.append(measure(setup, label, runner, seq, args))
            print_rank_zero(" | ".join(str(cell) for cell in rows[-1]))
    what = (
        f"Ring attention throughput, {args.dtype}, {'causal' if args.causal else 'full'}, B={args.batch}, "
        f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}. TFLOP/s per GPU = FLOPs / P / time, "
        "FLOPs = 4*B*S^2*Hq*D" + (" / 2 (causal)" if args.causal else "") + " for fwd and 3.5x for fwd+bwd; "
        f"median of {args.iters} runs after {args.warmup} warmups, slowest rank, CUDA events. "
        "sdpa (equal work) = one GPU doing 1/P of the attention heads over all S, no communication. "
        + " ".join(notes)
    )
    tables = []
    if rows:
        tables.append((f"Ring attention, P={world}", what, markdown_table(ATTENTION_HEADERS, rows)))
    if "p2p" in args.methods and world > 1:
        p2p_rows = p2p_probe(setup, args.p2p_mib, args)
        p2p_headers = [
            "MiB",
            "one dir GB/s/GPU",
            "ring total",
            "both dirs GB/s/GPU",
            "ring total",
            "both/one",
        ]
        p2p_what = (
            f"Ring P2P probe over {world} GPUs: each rank sends M MiB to its successor (one direction) or "
            "to its successor and predecessor at once (both), batched isend/irecv (longloom.parallel.p2p); "
            f"GB/s = bytes sent per GPU / time, ring total = x {world}; median of {args.iters} runs."
        )
        tables.append((f"Ring P2P probe, P={world}", p2p_what, markdown_table(p2p_headers, p2p_rows)))
    for title, text, table in tables:
        print_rank_zero(f"\n{title}\n{text}\n\n{table}")
        if args.record and dist.get_rank() == 0:
            print_rank_zero(f"appended to {append_record(title, text, table, world)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
