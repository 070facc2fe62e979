"""Single-GPU attention block kernels: aten cuDNN, aten flash and our Triton kernel, forward and backward.

    python bench/attention_kernels.py [--seq 4096 16384 65536] [--record]
    python bench/attention_kernels.py --seq 256 --backends torch triton   # CPU smoke (TRITON_INTERPRET=1)

What ring attention runs per block (attention/blocks.py): `block_attention_forward` -> (out, lse) and
`block_attention_backward(dout, q, k, v, out, lse)` with the final out / lse. bf16, causal, B=1,
Hq=32, Hkv=8, D=128 by default. FLOPs = 4*B*S^2*Hq*D / 2 (causal) forward, 2.5x that backward;
median of --iters runs after --warmup, CUDA events. Each backend is checked against cuDNN (or torch
on CPU) at the first length: max abs difference of out and dq printed in the notes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the CPU smoke run
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` finds longloom

import argparse

import torch

from bench.common import DTYPES, append_record, markdown_table, time_ms
from longloom.attention.blocks import block_attention_backward, block_attention_forward


def measure(args, seq: int, backend: str, reference: dict | None) -> tuple[list, dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(1, seq, heads, args.head_dim, device=device, dtype=dtype, generator=generator)

    q, k, v, dout = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads)
    out, lse = block_attention_forward(q, k, v, causal=True, backend=backend)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal=True, backend=backend)
    forward_ms = time_ms(
        lambda: block_attention_forward(q, k, v, True, backend=backend), args.warmup, args.iters
    )
    backward_ms = time_ms(
        lambda: block_attention_backward(dout, q, k, v, out, lse, True, backend=backend),
        args.warmup,
        args.iters,
    )
    flops = 4 * seq * seq * args.heads * args.head_dim / 2
    note = ""
    if reference is not None:
        note = (
            f"max |out - {reference['backend']}| {(out.float() - reference['out']).abs().max().item():.2e}, "
            f"|dq - {reference['backend']}| {(grads[0].float() - reference['dq']).abs().max().item():.2e}"
        )
    row = [
        backend, seq, f"{forward_ms:.2f}", f"{flops / forward_ms / 1e9:.1f}", f"{backward_ms:.2f}",
        f"{2.5 * flops / backward_ms / 1e9:.1f}", f"{3.5 * flops / (forward_ms + backward_ms) / 1e9:.1f}", note,
    ]  # fmt: skip
    return row, {"backend": backend, "out": out.float(), "dq": grads[0].float()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash", "triton"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: CPU smoke run (Triton interpreted); the timings mean nothing", flush=True)
    rows = []
    for seq in args.seq:
        reference = None
        for backend in args.backends:
            row, result = measure(args, seq, backend, reference if seq == args.seq[0] else None)
            reference = reference or result
            rows.append(row)
            print(" | ".join(str(cell) for cell in row), flush=True)
    headers = ["backend", "S", "fwd ms", "fwd TFLOP/s", "bwd ms", "bwd TFLOP/s", "fwd+bwd TFLOP/s", "check"]
    table = markdown_table(headers, rows)
    print(table)
    if args.record:
        what = (
            f"One attention block as ring attention runs it (attention/blocks.py), {args.dtype}, causal, B=1, "
            f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}; backward takes the final out/lse. "
            f"FLOPs 4*S^2*Hq*D/2 fwd, 2.5x bwd; median of {args.iters} after {args.warmup} warmups, CUDA events. "
            "check = max abs difference from the first backend at the first length."
        )
        append_record("Attention block kernels: cuDNN, flash, Triton", what, table, world_size=1)


if __name__ == "__main__":
    main()
