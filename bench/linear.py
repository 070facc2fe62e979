"""LASP-2 linear attention: weak scaling over 1/2/4/8 GPUs against two baselines, and single-GPU kernels.

    torchrun --nproc-per-node 8 bench/linear.py --gpus 1 2 4 8 --seq-per-gpu 65536 524288 [--record]
    python bench/linear.py --parts kernels --seq 8192 65536          # one GPU: kernels only
    python bench/linear.py --parts kernels --seq 65536 --segments auto fine 64 256   # + segmentations

Causal linear attention o_t = sum_{s<=t} decay[h]^(t-s) (q_t . k_s) v_s, bf16, B = 1, H = 32,
D = 128 by default, per-head decays 1 - 2^-(5 + 8h/H) (--no-decay: none); fwd+bwd as in training.

Part "scaling" (every GPU count in --gpus runs on the first P ranks of the launch, so one
`torchrun --nproc-per-node 8` gives the whole weak-scaling table; S = --seq-per-gpu x P):
- lasp2: longloom.parallel.lasp2.lasp2_linear_attention (one all-gather of fp32 d x d states per
  direction), contiguous layout; lasp2-zigzag: the same in the zigzag layout hybrid models use.
- lasp1: lasp1_linear_attention, the ring baseline: the state hops rank to rank (P - 1 sequential
  send/recv per direction).
- allgather-kv: all-gather K and V (O(S) bytes), each rank sums the states of the earlier chunks
  itself; the backward reduce-scatters dK/dV (Megatron-SP style), defined below.
Weak-scaling efficiency = time of the same method on 1 GPU at the same S/GPU / time on P GPUs.

Part "kernels" (rank 0 alone): the local scan inside LASP-2 on one GPU: Triton
(attention/triton_linear.py) vs chunked torch (attention/linear_chunked.py) vs flash-linear-attention's
`fla.ops.simple_gla.chunk_simple_gla` (skipped, with the reason, when not importable). "triton" and
"torch-chunked" go through lasp2_linear_attention(group=None, backend="triton" / "torch"); each --segments
value adds a row "triton-scan segments=X": the bare Triton scan forward plus its three backward scans
(linear_attention_backward), cut into X pieces: "auto" (auto_segments, the default policy), "fine"
(fine_segments: pieces of 1-2 blocks, fla's structure) or a number. Side by side, one command:
    python bench/linear.py --parts kernels --seq 65536 --segments auto fine 64 256
(triton vs triton-scan segments=auto is lasp2's own overhead on one device; auto vs fine the
segmentation; fine vs fla the kernels; at 64K, H = 32, d = 128, bf16: auto = 4 pieces of 16K tokens,
fine = 512 of 128, and 64 / 256 lie between: fewer fp32 piece states to write and chain, fewer
parallel programs). Row "triton-blocks": attention/triton_linear_blocks.py (block states, then every
block's output and gradients in parallel: fla's structure without piece states to chain); "lasp2
triton-blocks": the same through lasp2_linear_attention(backend="triton-blocks"), as training runs it on
CUDA (the default backend there since session 12). Before
timing, each of these rows is checked at --check-seq tokens: its bf16 error vs fp64 (out, dq, dk, dv)
must be at most 2x that of the "triton" path.

Before timing, every distributed method is checked at --check-seq tokens on all ranks: its bf16
error vs an fp64 reference (out, dq, dk, dv) must be at most 2x the error of the single-GPU bf16
computation. Times: median of --iters runs of the slowest rank, CUDA events, ranks aligned.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch or NCCL start: NVLink multicast (NVLS) stays off on the lent machines.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/linear.py` finds longloom

import argparse
import dataclasses
import functools
import inspect
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
from longloom.attention.linear_chunked import linear_attention_backward, log_decay_of
from longloom.attention.reference import reference_linear_attention
from longloom.attention.triton_linear import triton_linear_scan
from longloom.attention.triton_linear_blocks import (
    BlockLaunch,
    block_parallel_backward,
    block_parallel_forward,
)
from longloom.parallel.lasp2 import lasp1_linear_attention, lasp2_linear_attention, select_scan
from longloom.parallel.sharding import shard_sequence, unshard_sequence

METHODS = ("lasp2", "lasp2-zigzag", "lasp1", "allgather-kv")
LAYOUTS = {"lasp2-zigzag": "zigzag"}  # every other method: contiguous


def _gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """[B, L, H, D] on every rank -> [P, B, L, H, D]."""
    gathered = torch.empty(world_size * x.numel(), dtype=x.dtype, device=x.device)
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather_single(gathered, x.contiguous().view(-1), group=group)
    return gathered.view(world_size, *x.shape)


def _reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[P, B, L, H, D] partial sums on every rank -> this rank's [B, L, H, D], summed over ranks."""
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter (CPU smoke runs only)
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total[dist.get_rank(group)]
    dist.reduce_scatter_tensor(out.view(-1), x.contiguous().view(-1), group=group)
    return out


class AllGatherKV(torch.autograd.Function):
    """Baseline: every rank gathers all K/V and sums the decayed states of the chunks before its own."""

    @staticmethod
    def forward(ctx, q, k, v, decay, group):
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        scan, log_decay = select_scan(q), log_decay_of(decay)
        keys, values = _gather_sequence(k, group, world_size), _gather_sequence(v, group, world_size)
        earlier_k = keys[:rank].transpose(0, 1).flatten(1, 2)  # [B, rank * L, H, D]
        earlier_v = values[:rank].transpose(0, 1).flatten(1, 2)
        prefix = scan(None, earlier_k, earlier_v, log_decay)[1] if rank > 0 else None
        out, _ = scan(q, k, v, log_decay, prefix)
        ctx.save_for_backward(q, k, v, decay, prefix, earlier_k, earlier_v)
        ctx.group, ctx.world_size = group, world_size
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, decay, prefix, earlier_k, earlier_v = ctx.saved_tensors
        scan, log_decay = select_scan(q), log_decay_of(decay)
        dq, dk, dv, d_prefix = linear_attention_backward(
            scan, q, k, v, grad_out.contiguous(), log_decay, prefix
        )
        # Partial dK/dV of the earlier chunks, summed in fp32: bf16 partials summed over ranks would
        # fail the accuracy check (2x the single-GPU error) that every method passes before timing.
        partial_k = torch.zeros(ctx.world_size, *k.shape, dtype=torch.float32, device=k.device)
        partial_v = torch.zeros(ctx.world_size, *v.shape, dtype=torch.float32, device=v.device)
        earlier = earlier_k.size(1)
        if earlier:
            # prefix = sum_s lam^(earlier-1-s) k_s^T v_s over the earlier tokens s, so d k_s and d v_s follow.
            positions = torch.arange(earlier, device=k.device)
            weight = torch.ones(1, earlier, 1, 1, device=k.device)
            if log_decay is not None:
                weight = torch.exp(log_decay[None, :] * (earlier - 1 - positions)[:, None]).unsqueeze(0)
                weight = weight.unsqueeze(-1)  # [1, S', H, 1]
            d_prefix = d_prefix.float()
            d_k = torch.einsum("bshv,bhkv->bshk", earlier_v.float(), d_prefix) * weight
            d_v = torch.einsum("bshk,bhkv->bshv", earlier_k.float(), d_prefix) * weight
            rank = dist.get_rank(ctx.group)
            partial_k[:rank] = d_k.unflatten(1, (rank, k.size(1))).transpose(0, 1)
            partial_v[:rank] = d_v.unflatten(1, (rank, v.size(1))).transpose(0, 1)
        dk = dk.float() + _reduce_scatter_sequence(partial_k, ctx.group)
        dv = dv.float() + _reduce_scatter_sequence(partial_v, ctx.group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def allgather_kv_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    decay: torch.Tensor | None = None,
    layout: str = "contiguous",
) -> torch.Tensor:
    if layout != "contiguous":
        raise ValueError("allgather-kv baseline: contiguous layout only")
    return AllGatherKV.apply(q, k, v, decay, group)


ATTENTION: dict[str, Callable[..., torch.Tensor]] = {
    "lasp2": lasp2_linear_attention,
    "lasp2-zigzag": lasp2_linear_attention,
    "lasp1": lambda q, k, v, group, decay, layout: lasp1_linear_attention(q, k, v, group, decay),
    "allgather-kv": allgather_kv_linear_attention,
}


def make_decay(heads: int, enabled: bool, device: torch.device) -> torch.Tensor | None:
    """RetNet-style per-head decays 1 - 2^-(5 + 8h/H): from fast forgetting to ~1 - 1/8000."""
    if not enabled:
        return None
    exponents = 5.0 + 8.0 * torch.arange(heads, dtype=torch.float64) / heads
    return (1.0 - 2.0**-exponents).float().to(device)


def check(
    args: argparse.Namespace,
    group: dist.ProcessGroup,
    world: int,
    decay: torch.Tensor | None,
    device: torch.device,
) -> list[str]:
    """bf16 distributed vs fp64 reference: error at most 2x that of the single-GPU bf16 computation."""
    generator = torch.Generator(device=device).manual_seed(1234)  # same tensors on every rank
    seq = args.check_seq

    def full(dim: int) -> torch.Tensor:
        shape = (args.batch, seq, args.heads, dim)
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float64) / dim**0.5

    q, k, v, dout = (full(args.head_dim) for _ in range(4))

    def run(
        attention: Callable[..., torch.Tensor], dtype: torch.dtype, layout: str | None
    ) -> list[torch.Tensor]:
        prepare = (lambda t: shard_sequence(t, 1, group, layout)) if layout else (lambda t: t)
        inputs = [prepare(t).to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(prepare(dout).to(dtype))
        results = [out.detach(), *(t.grad for t in inputs)]
        if layout:
            results = [unshard_sequence(t.contiguous(), 1, group, layout) for t in results]
        return [t.double() for t in results]

    reference_decay = None if decay is None else decay.double()
    want = run(lambda a, b, c: reference_linear_attention(a, b, c, reference_decay), torch.float64, None)
    dtype = DTYPES[args.dtype]
    single = run(lambda a, b, c: lasp2_linear_attention(a, b, c, None, decay), dtype, None)
    lines = []
    for method in args.methods:
        layout = LAYOUTS.get(method, "contiguous")
        attention = functools.partial(ATTENTION[method], group=group, decay=decay, layout=layout)
        got = run(attention, dtype, layout)
        lines.append(check_against_fp64(f"{method} check at S={seq}, P={world}", want, single, got))
    return lines


def _time_case(
    forward: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
    group: dist.ProcessGroup,
    args: argparse.Namespace,
) -> tuple[float, float]:
    dout = torch.randn_like(forward())

    def drop_grads() -> None:
        for tensor in inputs:
            tensor.grad = None

    forward_ms = time_ms(forward, args.warmup, args.iters, group, before=drop_grads)
    step_ms = time_ms(lambda: forward().backward(dout), args.warmup, args.iters, group, before=drop_grads)
    return forward_ms, step_ms


def scaling_rows(
    args: argparse.Namespace,
    groups: dict[int, dist.ProcessGroup],
    decay: torch.Tensor | None,
    device: torch.device,
) -> list[list[object]]:
    """One row per (S/GPU, GPUs, method); ranks outside the first P wait at a barrier."""
    rows: list[list[object]] = []
    one_gpu_ms: dict[tuple[str, int], float] = {}
    itemsize = DTYPES[args.dtype].itemsize
    for per_gpu in args.seq_per_gpu:
        for gpus in args.gpus:
            for method in args.methods:
                layout = LAYOUTS.get(method, "contiguous")
                result = None
                if dist.get_rank() < gpus:
                    result = _measure_scaling(args, method, layout, groups[gpus], per_gpu, decay, device)
                dist.barrier()
                if dist.get_rank() != 0:
                    continue
                # Bytes each rank receives per step (fwd + bwd): fp32 states for LASP; K and V in
                # their dtype, then fp32 dK/dV partials (reduce-scatter) for all-gather.
                state = args.batch * args.heads * args.head_dim**2 * 4
                tokens_elsewhere = (gpus - 1) * per_gpu * args.batch * args.heads * args.head_dim
                received = {
                    "lasp2": 2 * state * gpus if gpus > 1 else 0,
                    "lasp2-zigzag": 2 * state * gpus * 2 if gpus > 1 else 0,
                    "lasp1": 2 * state if gpus > 1 else 0,
                    "allgather-kv": 2 * tokens_elsewhere * (itemsize + 4),
                }[method]
                row: list[object] = [method, gpus, per_gpu * gpus, per_gpu]
                if isinstance(result, str):
                    row += ["-", "-", "-", "-", _human(received), result]
                else:
                    forward_ms, step_ms = result  # type: ignore[misc]
                    if gpus == 1:
                        one_gpu_ms[(method, per_gpu)] = step_ms
                    baseline = one_gpu_ms.get((method, per_gpu))
                    row += [
                        f"{forward_ms:.2f}",
                        f"{step_ms:.2f}",
                        f"{per_gpu * args.batch / step_ms / 1e3:.2f}",
                        f"{baseline / step_ms:.2f}" if baseline else "-",
                        _human(received),
                        "",
                    ]
                rows.append(row)
                print(" | ".join(str(cell) for cell in row), flush=True)
    return rows


def _measure_scaling(
    args: argparse.Namespace,
    method: str,
    layout: str,
    group: dist.ProcessGroup,
    per_gpu: int,
    decay: torch.Tensor | None,
    device: torch.device,
) -> tuple[float, float] | str:
    """(fwd ms, fwd+bwd ms), or why not."""
    dtype = DTYPES[args.dtype]
    try:
        shape = (args.batch, per_gpu, args.heads, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
        attention = functools.partial(ATTENTION[method], group=group, decay=decay, layout=layout)
        return _time_case(lambda: attention(q, k, v), [q, k, v], group, args)
    except torch.OutOfMemoryError:
        # Every rank holds the same shapes, so every rank of the group runs out together.
        return "out of memory"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def kernel_rows(
    args: argparse.Namespace, alone: dist.ProcessGroup, decay: torch.Tensor | None, device: torch.device
) -> list[list[object]]:
    """Rank 0 alone (`alone` is its one-rank group, so timing never waits for the idle ranks)."""
    dtype = DTYPES[args.dtype]
    rows = []
    # Our variants, each checked against fp64 before timing; "triton" (the training path) is their yardstick.
    variants = ["triton-blocks", "lasp2 triton-blocks"]
    variants += [f"triton-blocks launch={launch}" for launch in args.blocks_launch]
    variants += [f"triton-scan segments={segments}" for segments in args.segments]
    names = ["triton", "torch-chunked", "fla-chunk_simple_gla", *variants]
    wrong: dict[str, str] = {}  # rows whose kernel failed its fp64 check: reported, never timed
    if device.type == "cuda" and args.check_seq:
        for name in names[
            3:
        ]:  # the rows checked here; "triton" is their yardstick, torch and fla are others'
            try:
                print(check_kernel(args, name, decay, device), flush=True)
            except RuntimeError as failure:
                print(failure, flush=True)
                wrong[name] = str(failure)
    for seq in args.seq:
        for name in names:
            row: list[object] = [name, seq]
            try:
                if name in wrong:
                    raise Skip("failed its fp64 check (above)")
                shape = (args.batch, seq, args.heads, args.head_dim)
                q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
                forward = _kernel(name, q, k, v, decay)
                mallocs = _device_mallocs(device)
                forward_ms, step_ms = _time_case(forward, [q, k, v], alone, args)
                tokens_per_s = seq * args.batch / (step_ms / 1e3) / 1e6
                # The row's cudaMalloc calls (warmups included): a count above the warmups' few means
                # the caching allocator missed in the timed runs too (each miss costs a malloc and a free).
                notes = f"{_device_mallocs(device) - mallocs} cudaMalloc" if device.type == "cuda" else ""
                row += [f"{forward_ms:.2f}", f"{step_ms:.2f}", f"{tokens_per_s:.2f}", notes]
            except Skip as reason:
                row += ["-", "-", "-", f"skipped: {reason}"]
            except torch.OutOfMemoryError:
                row += ["OOM", "OOM", "-", "out of memory"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(" | ".join(str(cell) for cell in row), flush=True)
    return rows


def _device_mallocs(device: torch.device) -> int:
    """cudaMalloc calls of the caching allocator so far (0 off CUDA)."""
    return torch.cuda.memory_stats(device).get("num_device_alloc", 0) if device.type == "cuda" else 0


class Skip(Exception):
    """A method that cannot run here; the message says why and goes into the table."""


def parse_segments(value: str) -> int | str | None:
    """--segments value -> triton_linear_scan's `segments`: "auto" -> None, "fine", or a piece count."""
    if value == "auto":
        return None
    if value == "fine":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"--segments takes auto, fine or a positive piece count; got {value!r}"
        )
    return int(value)


def _block_launch_label(value: str) -> str:
    """--blocks-launch type: checked when parsing, kept as written (it labels the row)."""
    parse_block_launch(value)
    return value


def _segments_label(value: str) -> str:
    """--segments type: checked when parsing, kept as written (it labels the row)."""
    parse_segments(value)
    return value


class TritonScanAttention(torch.autograd.Function):
    """The bare single-device Triton scan with a given segmentation, differentiable (bench rows only).

    Forward: one scan from a zero state; backward: linear_attention_backward's three scans, all with
    the same `segments` (None: auto_segments, "fine": fine_segments, or a count).
    """

    @staticmethod
    def forward(ctx, q, k, v, decay, segments):
        scan = functools.partial(triton_linear_scan, segments=segments)
        out, _ = scan(q, k, v, log_decay_of(decay))
        ctx.save_for_backward(q, k, v, decay)
        ctx.scan = scan
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, decay = ctx.saved_tensors
        dq, dk, dv, _ = linear_attention_backward(
            ctx.scan, q, k, v, grad_out.contiguous(), log_decay_of(decay)
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class TritonBlocksAttention(torch.autograd.Function):
    """Block-parallel Triton linear attention (attention/triton_linear_blocks.py) on one device, from a
    zero state, differentiable: the bare kernels, without lasp2_linear_attention's wrapping."""

    @staticmethod
    def forward(ctx, q, k, v, decay, launch=None):
        launch = launch or BlockLaunch()
        out, _ = block_parallel_forward(q, k, v, log_decay_of(decay), launch=launch)
        ctx.save_for_backward(q, k, v, decay)
        ctx.launch = launch
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, decay = ctx.saved_tensors
        dq, dk, dv, _ = block_parallel_backward(q, k, v, grad_out, log_decay_of(decay), launch=ctx.launch)
        return dq, dk, dv, None, None


def parse_block_launch(value: str) -> BlockLaunch:
    """--blocks-launch value "OUTPUT_WARPS:BACKWARD_WARPS:STAGES[:STATE_TILE]" -> BlockLaunch (e.g. 8:8:2:32)."""
    parts = value.split(":")
    if len(parts) not in (3, 4) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            "--blocks-launch takes OUTPUT_WARPS:BACKWARD_WARPS:STAGES[:STATE_TILE], positive integers "
            f"(e.g. 8:8:2 or 4:8:2:32); got {value!r}"
        )
    numbers = [int(part) for part in parts]
    if len(numbers) == 4 and (numbers[3] < 16 or numbers[3] & (numbers[3] - 1)):
        raise argparse.ArgumentTypeError(
            f"--blocks-launch: STATE_TILE must be a power of two >= 16; got {value!r}"
        )
    launch = BlockLaunch(output_warps=numbers[0], backward_warps=numbers[1], stages=numbers[2])
    return dataclasses.replace(launch, state_tile=numbers[3]) if len(numbers) == 4 else launch


def check_kernel(
    args: argparse.Namespace, name: str, decay: torch.Tensor | None, device: torch.device
) -> str:
    """A "triton-blocks" or "triton-scan segments=X" row's kernel in bf16 vs fp64: error at most 2x that
    of the default "triton" path."""
    generator = torch.Generator(device=device).manual_seed(1234)
    shape = (args.batch, args.check_seq, args.heads, args.head_dim)
    q, k, v, dout = (
        torch.randn(shape, generator=generator, device=device, dtype=torch.float64) / args.head_dim**0.5
        for _ in range(4)
    )

    def run(attention: Callable[..., torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(dout.to(dtype))
        return [t.double() for t in (out.detach(), *(t.grad for t in inputs))]

    reference_decay = None if decay is None else decay.double()
    want = run(lambda a, b, c: reference_linear_attention(a, b, c, reference_decay), torch.float64)
    dtype = DTYPES[args.dtype]
    single = run(lambda a, b, c: lasp2_linear_attention(a, b, c, None, decay, backend="triton"), dtype)
    got = run(lambda a, b, c: _kernel(name, a, b, c, decay)(), dtype)
    return check_against_fp64(f"{name} check at S={args.check_seq}", want, single, got)


def _kernel(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    if name.startswith("triton-scan segments="):
        if not q.is_cuda:
            raise Skip("Triton needs CUDA (tests run it under TRITON_INTERPRET)")
        segments = parse_segments(name.split("=", 1)[1])
        return lambda: TritonScanAttention.apply(q, k, v, decay, segments)
    if name == "lasp2 triton-blocks":
        if not q.is_cuda:
            raise Skip("Triton needs CUDA (tests run it under TRITON_INTERPRET)")
        return lambda: lasp2_linear_attention(q, k, v, None, decay, backend="triton-blocks")
    if name.startswith("triton-blocks"):
        if not q.is_cuda:
            raise Skip("Triton needs CUDA (tests run it under TRITON_INTERPRET)")
        launch = parse_block_launch(name.split("=", 1)[1]) if "=" in name else BlockLaunch()
        return lambda: TritonBlocksAttention.apply(q, k, v, decay, launch)
    if name == "triton":
        if not q.is_cuda:
            raise Skip("Triton needs CUDA (tests run it under TRITON_INTERPRET)")
        return lambda: lasp2_linear_attention(q, k, v, None, decay, backend="triton")
    if name == "torch-chunked":
        return lambda: lasp2_linear_attention(q, k, v, None, decay, backend="torch")
    return fla_attention(q, k, v, decay)


def fla_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None
) -> Callable[[], torch.Tensor]:
    """flash-linear-attention's chunk_simple_gla on q, k, v with our decays (scale 1, [B, S, H, D]);
    raises Skip when fla is not importable."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as error:
        raise Skip(f"flash-linear-attention not importable: {error}") from None
    parameters = inspect.signature(chunk_simple_gla).parameters
    extra: dict[str, object] = {}
    if decay is not None:
        if "g_gamma" in parameters:  # newer fla: one log-decay per head
            extra["g_gamma"] = torch.log(decay.float())
        else:  # older fla: a log-decay per token, cumulated inside
            extra["g"] = torch.log(decay.float()).expand(q.size(0), q.size(1), -1).contiguous()
    if "head_first" in parameters:
        extra["head_first"] = False
    return lambda: chunk_simple_gla(q=q, k=k, v=v, scale=1.0, **extra)[0]


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=("scaling", "kernels"), default=["scaling", "kernels"])
    parser.add_argument(
        "--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts (<= world size)"
    )
    parser.add_argument("--seq-per-gpu", type=int, nargs="+", default=[65536, 524288], help="weak scaling")
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 65536], help="kernels part: S")
    parser.add_argument(
        "--segments",
        nargs="*",
        default=[],
        type=_segments_label,
        help="kernels part: a 'triton-scan segments=X' row per value X (auto, fine or a piece count)",
    )
    parser.add_argument(
        "--blocks-launch",
        nargs="*",
        default=[],
        type=_block_launch_label,
        help="kernels part: a 'triton-blocks launch=X' row per X = OUTPUT_WARPS:BACKWARD_WARPS:STAGES[:STATE_TILE]",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--decay", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed runs; the median is reported")
    parser.add_argument("--check-seq", type=int, default=2048, help="S of the correctness check (0: skip)")
    parser.add_argument("--record", action="store_true", help="append the tables to BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world, device = start_bench()
    args.gpus = sorted({p for p in args.gpus if p <= world})  # 1 GPU first: the weak-scaling baseline
    if not args.gpus:
        raise SystemExit(f"--gpus: none fits the {world} launched ranks")
    # The zigzag layout holds 2 chunks per GPU: every per-GPU length must be even.
    if any(per_gpu % 2 for per_gpu in args.seq_per_gpu) or args.check_seq % (2 * world):
        raise SystemExit(
            f"--seq-per-gpu {args.seq_per_gpu} must be even and --check-seq {args.check_seq} a multiple "
            f"of 2 x {world} GPUs (zigzag layout)"
        )
    decay = make_decay(args.heads, args.decay, device)
    # new_group is collective over the whole world: every rank creates every group, in order.
    groups = {p: dist.new_group(list(range(p))) for p in sorted(set(args.gpus) | {1, world})}
    what = (
        f"Causal linear attention, {args.dtype}, B={args.batch}, H={args.heads}, D={args.head_dim}, "
        f"{'decay 1 - 2^-(5 + 8h/H)' if args.decay else 'no decay'}, fwd+bwd as in training; "
        f"median of {args.iters} runs after {args.warmup} warmups, slowest rank, CUDA events."
    )
    blocks = []
    if "scaling" in args.parts:
        notes = check(args, groups[world], world, decay, device) if args.check_seq else ["check skipped"]
        for line in notes:
            print_rank_zero(line)
        rows = scaling_rows(args, groups, decay, device)
        headers = [
            "method",
            "GPUs",
            "S",
            "S/GPU",
            "fwd ms",
            "fwd+bwd ms",
            "Mtok/s/GPU",
            "weak eff",
            "recv/rank/step",
            "notes",
        ]
        blocks.append(("LASP-2 weak scaling", what + " " + " ".join(notes), headers, rows))
    if "kernels" in args.parts:
        rows = kernel_rows(args, groups[1], decay, device) if dist.get_rank() == 0 else []
        dist.barrier()
        headers = ["kernel", "S", "fwd ms", "fwd+bwd ms", "Mtok/s", "notes"]
        blocks.append(("Linear attention kernels, 1 GPU", what, headers, rows))
    if dist.get_rank() == 0:
        for title, text, headers, rows in blocks:
            table = markdown_table(headers, rows)
            print(f"\n## {title}\n\n{text}\n\n{table}", flush=True)
            if args.record:
                print(f"appended to {append_record(title, text, table, world)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
