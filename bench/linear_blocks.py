"""The block-parallel linear attention kernels (attention/triton_linear_blocks.py) on one GPU: where the
time goes and which launch settings to default to.

    python bench/linear_blocks.py                                  # every part, 64K, H = 32, d = 128, bf16
    python bench/linear_blocks.py --parts sweep --launch 64:4:4:4:64 128:8:8:1:64

Parts (causal, per-head decays 1 - 2^-(5 + 8h/H) as in bench/linear.py, fwd+bwd as in training):
- "side-by-side": ours (default launch) and flash-linear-attention's chunk_simple_gla through autograd,
  bench/common.time_ms, in one fresh process in the order ours, fla, ours. bench/linear.py times the
  same two after its other rows; this part shows what each costs without them.
- "profile": CUDA time per kernel over 5 fwd+bwd (torch.profiler), ours and fla's. Our backward runs
  its two state walks side by side, so per-kernel sums exceed the wall time.
- "walks": one state walk alone (a forward walk over k, v) at each --walk-blocks and --state-tiles value.
- "sweep": each --launch BLOCK:OUTPUT_WARPS:BACKWARD_WARPS:STAGES:STATE_TILE ("-" for STAGES: Triton's
  default) checked against fp64 at --check-seq tokens, then forward and backward timed by direct calls.
Medians of --iters runs after --warmup, CUDA events.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/linear_blocks.py` finds longloom

import argparse
import dataclasses
import functools
from collections.abc import Callable

import torch

from bench.common import DTYPES, check_against_fp64, markdown_table, time_ms
from bench.linear import Skip, TritonBlocksAttention, fla_attention, make_decay
from longloom.attention.linear_chunked import log_decay_of
from longloom.attention.reference import reference_linear_attention
from longloom.attention.triton_linear_blocks import (
    BlockLaunch,
    block_parallel_backward,
    block_parallel_forward,
    block_states,
)

PARTS = ("side-by-side", "profile", "walks", "sweep")
# The sweep that chose BlockLaunch's defaults (BENCHMARKS.md, session 12).
DEFAULT_SWEEP = (
    "64:4:8:-:64", "64:4:4:-:64", "64:4:4:2:64", "64:4:4:4:64", "64:4:8:4:64", "64:8:4:3:64", "64:4:4:1:64",
    "64:4:8:1:64", "128:4:8:-:64", "128:8:8:-:64", "128:8:8:2:64", "128:4:4:-:64", "128:8:8:1:64",
    "64:4:4:3:128", "32:4:4:-:32", "32:4:4:3:64",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
    block_size: int
    launch: BlockLaunch

    def label(self) -> str:
        stages = "-" if self.launch.stages is None else self.launch.stages
        return (
            f"block {self.block_size}, warps {self.launch.output_warps}/{self.launch.backward_warps}, "
            f"stages {stages}, state tile {self.launch.state_tile}"
        )


def parse_variant(value: str) -> Variant:
    """--launch value "BLOCK:OUTPUT_WARPS:BACKWARD_WARPS:STAGES:STATE_TILE" -> Variant."""
    parts = value.split(":")
    numbers = [int(part) if part.isdigit() and int(part) > 0 else None for part in parts]
    well_formed = (
        len(parts) == 5
        and None not in numbers[:3] + numbers[4:]
        and (numbers[3] is not None or parts[3] == "-")
        and all(n >= 16 and n & (n - 1) == 0 for n in (numbers[0], numbers[4]))
    )
    if not well_formed:
        raise argparse.ArgumentTypeError(
            "--launch takes BLOCK:OUTPUT_WARPS:BACKWARD_WARPS:STAGES:STATE_TILE, positive integers with "
            f"BLOCK and STATE_TILE powers of two >= 16 and '-' for Triton's default stages; got {value!r}"
        )
    block, output_warps, backward_warps, stages, tile = numbers
    return Variant(block, BlockLaunch(output_warps, backward_warps, stages, tile))


def _inputs(args: argparse.Namespace, seq: int, device: torch.device, dtype: torch.dtype, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (1, seq, args.heads, args.head_dim)
    return [torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(4)]


def check_variant(args: argparse.Namespace, variant: Variant, decay: torch.Tensor | None, device) -> str:
    """The variant in the bench dtype vs fp64: error at most 2x that of the default launch."""
    q, k, v, grad_out = (
        x / args.head_dim**0.5 for x in _inputs(args, args.check_seq, device, torch.float64, 1)
    )

    def run(forward_backward: Callable[..., tuple], dtype: torch.dtype) -> list[torch.Tensor]:
        cast = [x.to(dtype) for x in (q, k, v, grad_out)]
        return [x.double() for x in forward_backward(*cast)]

    def reference(q_, k_, v_, grad):
        leaves = [x.clone().requires_grad_() for x in (q_, k_, v_)]
        out = reference_linear_attention(*leaves, None if decay is None else decay.double())
        out.backward(grad)
        return out.detach(), *(x.grad for x in leaves)

    def blocks(chosen: Variant) -> Callable[..., tuple]:
        log_decay = log_decay_of(decay)

        def forward_backward(q_, k_, v_, grad):
            out, _ = block_parallel_forward(q_, k_, v_, log_decay, None, chosen.block_size, chosen.launch)
            dq, dk, dv, _ = block_parallel_backward(
                q_, k_, v_, grad, log_decay, None, None, chosen.block_size, chosen.launch
            )
            return out, dq, dk, dv

        return forward_backward

    dtype = DTYPES[args.dtype]
    want = run(reference, torch.float64)
    single = run(blocks(Variant(64, BlockLaunch())), dtype)
    got = run(blocks(variant), dtype)
    return check_against_fp64(f"{variant.label()}: check at S={args.check_seq}", want, single, got)


def sweep_rows(
    args: argparse.Namespace, decay: torch.Tensor | None, device: torch.device
) -> list[list[object]]:
    q, k, v, grad_out = _inputs(args, args.seq, device, DTYPES[args.dtype], 0)
    log_decay = log_decay_of(decay)
    rows = []
    for variant in args.launch:
        try:
            print(check_variant(args, variant, decay, device), flush=True)
        except RuntimeError as failure:  # a wrong variant is reported, never timed
            print(failure, flush=True)
            rows.append([variant.label(), "-", "-", "-", "failed its fp64 check"])
            continue
        forward = functools.partial(
            block_parallel_forward, q, k, v, log_decay, None, variant.block_size, variant.launch
        )
        backward = functools.partial(
            block_parallel_backward,
            q,
            k,
            v,
            grad_out,
            log_decay,
            None,
            None,
            variant.block_size,
            variant.launch,
        )
        forward_ms = time_ms(forward, args.warmup, args.iters)
        backward_ms = time_ms(backward, args.warmup, args.iters)
        row = [
            variant.label(),
            f"{forward_ms:.2f}",
            f"{backward_ms:.2f}",
            f"{forward_ms + backward_ms:.2f}",
            "",
        ]
        print(" | ".join(row), flush=True)
        rows.append(row)
    return rows


def walk_rows(
    args: argparse.Namespace, decay: torch.Tensor | None, device: torch.device
) -> list[list[object]]:
    _, k, v, _ = _inputs(args, args.seq, device, DTYPES[args.dtype], 0)
    log_decay = log_decay_of(decay)
    rows = []
    for block in args.walk_blocks:
        for tile in args.state_tiles:
            walk = functools.partial(block_states, k, v, log_decay, None, False, block, tile)
            walk_ms = time_ms(walk, args.warmup, args.iters)
            rows.append([f"block {block}, state tile {tile}", f"{walk_ms:.2f}"])
    return rows


def _fla(q, k, v, decay: torch.Tensor | None) -> Callable[[], torch.Tensor] | None:
    try:
        return fla_attention(q, k, v, decay)
    except Skip as reason:
        print(f"fla left out: {reason}", flush=True)
        return None


def side_by_side_rows(args, decay, device) -> list[list[object]]:
    q, k, v, grad_out = (
        x.requires_grad_(i < 3) for i, x in enumerate(_inputs(args, args.seq, device, DTYPES[args.dtype], 0))
    )

    def drop_grads() -> None:
        q.grad = k.grad = v.grad = None

    def step(forward: Callable[[], torch.Tensor]) -> float:
        return time_ms(lambda: forward().backward(grad_out), args.warmup, args.iters, None, drop_grads)

    ours = lambda: TritonBlocksAttention.apply(q, k, v, decay, BlockLaunch())
    rows = [["ours (triton-blocks)", f"{step(ours):.2f}"]]
    fla = _fla(q, k, v, decay)
    if fla is not None:
        rows.append(["fla chunk_simple_gla", f"{step(fla):.2f}"])
    rows.append(["ours again", f"{step(ours):.2f}"])
    return rows


def profile_tables(args, decay, device) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    q, k, v, grad_out = (
        x.requires_grad_(i < 3) for i, x in enumerate(_inputs(args, args.seq, device, DTYPES[args.dtype], 0))
    )
    candidates = {"ours": lambda: TritonBlocksAttention.apply(q, k, v, decay, BlockLaunch())}
    fla = _fla(q, k, v, decay)
    if fla is not None:
        candidates["fla"] = fla
    tables = []
    for name, forward in candidates.items():
        for _ in range(3):
            forward().backward(grad_out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                forward().backward(grad_out)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50)
        tables.append(f"{name}, 5 x fwd+bwd:\n{table}")
    return tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--launch", type=parse_variant, nargs="+", default=[parse_variant(v) for v in DEFAULT_SWEEP]
    )
    parser.add_argument("--state-tiles", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument(
        "--walk-blocks", type=int, nargs="+", default=[64, 128], help="walks part: block sizes"
    )
    parser.add_argument("--check-seq", type=int, default=2048, help="tokens of each variant's fp64 check")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "bench/linear_blocks.py needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run)"
        )
    decay = make_decay(args.heads, True, device)
    print(f"S={args.seq}, H={args.heads}, d={args.head_dim}, {args.dtype}, on {device}", flush=True)
    if "side-by-side" in args.parts:
        print(markdown_table(["fwd+bwd through autograd", "ms"], side_by_side_rows(args, decay, device)))
    if "profile" in args.parts:
        if device.type != "cuda":
            print("profile: needs CUDA; left out")
        else:
            print("\n\n".join(profile_tables(args, decay, device)))
    if "walks" in args.parts:
        print(markdown_table(["one forward state walk", "ms"], walk_rows(args, decay, device)))
    if "sweep" in args.parts:
        headers = ["variant", "fwd ms", "bwd ms", "fwd+bwd ms", "notes"]
        print(markdown_table(headers, sweep_rows(args, decay, device)))


if __name__ == "__main__":
    main()
