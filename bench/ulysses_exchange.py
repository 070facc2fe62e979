"""Ulysses' exchange on its own: the packing copy, and NCCL's all-to-all alone and beside attention (P=2).

    torchrun --nproc-per-node 2 bench/ulysses_exchange.py --seq 65536

Why (issue 18 item 4): at 64K on 2 x H200, Ulysses fwd+bwd takes 116.45 ms against one GPU's 111.37 ms
at equal work (95.6%, target 98%); pipelining head chunks over NCCL made it slower (C=2 94.6%), since
NCCL's kernels take SMs from the attention they run beside. This probe measures the parts of that gap:

- flip copy: a reversed contiguous copy of the q/k/v bytes (one read + one write), the floor of any pack
  (session 10 timed it as "pack");
- pack (torch copy_) / pack (row kernel): Ulysses' real packing of q/k/v [1, S/P, H, D] into the send
  buffer [P, 1, S/P, (Hq + 2 Hkv)/P, D], by torch's strided copy_ and by the row kernel
  (parallel/triton_row_copy.py, what `pack_seq_to_heads` uses on CUDA); checked equal first;
- nccl a2a: all_to_all_single of the forward q/k/v bytes (the same as the backward's dq/dk/dv);
- attention: cuDNN fwd+bwd at one rank's equal work ([1, S, Hq/P, D], Hkv/P K/V heads), alone;
- attention + 4 x nccl a2a: the attention on the compute stream while the all-to-all runs four times on a
  side stream (the exchanges of one fwd+bwd: q/k/v in, out back, dout in, dq/dk/dv back; all sized as
  q/k/v here, an upper bound): the wall time, and how much it exceeds the attention alone. An excess
  near zero would mean head-chunk pipelining can hide the exchange; an excess above the serial cost
  means NCCL's kernels slow the attention more than overlapping saves.

Exchanges on the copy engines (copy-engine reads of torch symmetric memory, NCCL's zero-CTA
ncclAlltoAll) had rows here until session 15, when they were removed: no gain (BENCHMARKS.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch or NCCL start: NVLink multicast (NVLS) stays off on the lent machines.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.common import markdown_table, print_rank_zero, start_bench, time_ms
from longloom.parallel.ulysses import sdpa_attention
from longloom.parallel.ulysses_pipeline import pack_seq_to_heads, seq_to_heads_send_shape

EXCHANGES_PER_STEP = 4  # q/k/v in, out back (forward); dout in, dq/dk/dv back (backward)


def _beside(attention: Callable[[], None], exchange: Callable[[], object], side: torch.cuda.Stream):
    """The attention on the current stream with EXCHANGES_PER_STEP exchanges on `side` at the same time."""

    def run() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(EXCHANGES_PER_STEP):
                exchange()
        attention()
        torch.cuda.current_stream().wait_stream(side)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    world, device = start_bench()
    if device.type != "cuda" or world < 2:
        raise SystemExit("needs 2 or more GPUs: torchrun --nproc-per-node 2 bench/ulysses_exchange.py")
    dtype, seq, dim = torch.bfloat16, args.seq, args.head_dim
    local_tokens = seq // world
    # One rank's q/k/v, [S/P, Hq + 2 Hkv, D], cut into P chunks of heads (as Ulysses packs them).
    elements = local_tokens * (args.heads + 2 * args.kv_heads) * dim
    chunk = elements // world
    qkv = torch.randn(world, chunk, device=device, dtype=dtype)
    received = torch.empty_like(qkv)
    nccl_received = torch.empty_like(qkv)

    def flip_copy() -> None:  # every element read once and written once, contiguous
        received.view(-1).copy_(qkv.view(-1).flip(0))

    # Ulysses' packing of one layer's q/k/v (parallel/ulysses_pipeline.py), by torch and by rows.
    q_k_v = [
        torch.randn(1, local_tokens, heads, dim, device=device, dtype=dtype)
        for heads in (args.heads, args.kv_heads, args.kv_heads)
    ]
    parts = [t.unflatten(2, (world, t.size(2) // world)) for t in q_k_v]
    packed = torch.empty(seq_to_heads_send_shape(parts, world), device=device, dtype=dtype)
    packed_by_torch = torch.empty_like(packed)

    def pack_torch() -> None:
        offset = 0
        for part in parts:
            packed_by_torch[..., offset : offset + part.size(3), :].copy_(part.permute(2, 0, 1, 3, 4))
            offset += part.size(3)

    def pack_rows() -> None:
        pack_seq_to_heads(parts, packed)

    pack_torch()
    pack_rows()
    if not torch.equal(packed, packed_by_torch):
        raise RuntimeError("the row kernel's pack differs from torch's copy_")

    def nccl() -> None:
        dist.all_to_all_single(nccl_received, qkv)

    rows: list[list[object]] = []
    times: dict[str, float] = {}
    alone: dict[str, Callable[[], None]] = {
        "flip copy": flip_copy,
        "pack (torch copy_)": pack_torch,
        "pack (row kernel)": pack_rows,
        "nccl a2a": nccl,
    }
    gib = qkv.numel() * qkv.element_size() / 2**30
    for name, fn in alone.items():
        times[name] = time_ms(fn, args.warmup, args.iters)
        rows.append(
            [
                name,
                f"{gib:.3f}",
                f"{times[name]:.3f}",
                f"{gib * (world - 1) / world / times[name] * 1e3:.0f}",
                "-",
            ]
        )

    heads, kv_heads = args.heads // world, max(1, args.kv_heads // world)
    q = torch.randn(1, seq, heads, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, seq, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, seq, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(1, seq, heads, dim, device=device, dtype=dtype)

    def attention() -> None:
        out = sdpa_attention(q, k, v, True)
        torch.autograd.backward(out, dout)

    def drop_grads() -> None:
        q.grad = k.grad = v.grad = None

    times["attention"] = time_ms(attention, args.warmup, args.iters, before=drop_grads)
    rows.append(["attention fwd+bwd alone", "-", f"{times['attention']:.3f}", "-", "-"])
    side = torch.cuda.Stream(device=device)
    both = time_ms(_beside(attention, nccl, side), args.warmup, args.iters, before=drop_grads)
    serial = EXCHANGES_PER_STEP * times["nccl a2a"]
    rows.append(
        [
            f"attention + {EXCHANGES_PER_STEP} x nccl a2a beside it",
            "-",
            f"{both:.3f}",
            "-",
            f"+{both - times['attention']:.3f} ms over attention alone (serial would add {serial:.3f})",
        ]
    )
    print_rank_zero(
        markdown_table(["what", "GiB per rank", "ms (slowest rank, median)", "GiB/s to peers", "note"], rows)
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
