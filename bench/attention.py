"""Ulysses attention throughput beside single-GPU SDPA, DeepSpeed Ulysses and torch context parallel.

    torchrun --nproc-per-node 8 bench/attention.py --seq 65536 262144 1048576 [--record]
    torchrun --nproc-per-node 2 bench/attention.py --seq 65536 --methods sdpa ulysses --head-chunks 1 2 4 auto
    python bench/attention.py --nproc 1 --seq 65536          # one GPU: SDPA and Ulysses with P = 1

Methods (all bf16, causal, Hq = 32, Hkv = 8, D = 128 by default; B = 1; S = whole sequence):
- sdpa (equal work): torch SDPA on ONE GPU over the work one Ulysses rank does, [B, S, Hq/P, D]
  queries with max(Hkv, P)/P K/V heads, no communication. Same per-GPU FLOPs as the P-GPU methods,
  so its TFLOP/s is the ceiling Ulysses approaches; the gap is the all-to-all cost.
- ulysses: longloom.parallel.ulysses.ulysses_attention (one fused q/k/v all-to-all, SDPA, one
  all-to-all back), one row per --head-chunks value C: "ulysses C=1" is that serial path, C > 1
  pipelines C head chunks so the all-to-alls of one chunk run during another's attention
  (parallel/ulysses_pipeline.py), "auto" is choose_head_chunks (the library default is C=1).
- deepspeed-ulysses: deepspeed.sequence.layer.DistributedAttention with the same SDPA as local
  attention (three separate q/k/v all-to-alls). Skipped, with the reason, when not importable.
- torch-cp: torch.distributed.tensor.experimental.context_parallel (ring attention with head-tail
  load balancing, K/V rotation by all-gather unless --cp-rotate alltoall). K/V heads are expanded to
  Hq inside the timed region, as torchtitan does before SDPA. Skipped, with the reason, if missing.

FLOP convention (as in the FlashAttention benchmarks): forward = 4 * B * S^2 * Hq * D, halved when
causal; forward + backward = 3.5 x forward (backward = 2.5 x forward). TFLOP/s per GPU = those FLOPs
/ P / time. "fwd" is the forward as in training (autograd on); "fwd+bwd" is forward then backward.
Times are the median over --iters runs of the slowest rank, CUDA events, ranks aligned by a barrier.

Before timing, Ulysses is checked on the GPU at --check-seq tokens against an fp64 reference: its bf16
error (forward and dq/dk/dv) must be at most 2x the error of single-GPU bf16 SDPA.

Performance notes: q/k/v share one all-to-all (one latency instead of three, one autograd node, so
every rank issues collectives in the same order); each direction costs one packing copy into the
send buffer and at most one unpacking copy; K/V are exchanged unexpanded (Hkv % P == 0). With
head chunks only the first chunk's q/k/v exchange and the last chunk's output exchange are exposed.
Overlapping the K/V exchange with the query projection is a model-level change, not measured here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch or NCCL start: NVLink multicast (NVLS) stays off on the lent machines.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/attention.py` finds longloom

import argparse
import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
from longloom.attention.reference import reference_attention
from longloom.parallel.sharding import shard_sequence, unshard_sequence
from longloom.parallel.ulysses import (
    kv_head_replication,
    resolve_head_chunks,
    sdpa_attention,
    ulysses_attention,
)

METHODS = ("sdpa", "ulysses", "deepspeed-ulysses", "torch-cp")
SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


class Skip(Exception):
    """A method that cannot run here; the message says why and goes into the table."""


@dataclass
class Setup:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    device: torch.device
    group: dist.ProcessGroup
    world_size: int
    cp_rotate: str

    @classmethod
    def from_args(cls, args, device: torch.device, world_size: int) -> Setup:
        """From the shared command-line arguments of attention.py and ring.py."""
        return cls(
            batch=args.batch,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype=DTYPES[args.dtype],
            causal=args.causal,
            device=device,
            group=dist.group.WORLD,
            world_size=world_size,
            cp_rotate=args.cp_rotate,
        )

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype).requires_grad_()

    def forward_flops(self, seq: int) -> float:
        return 4.0 * self.batch * seq * seq * self.heads * self.head_dim * (0.5 if self.causal else 1.0)


@dataclass
class Case:
    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]
    dout: torch.Tensor
    kernel: str  # the SDPA kernel aten picks for the per-GPU attention
    note: str


def sdpa_kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """Which fused kernel aten's SDPA dispatch picks for [B, S, H, D] tensors (without running it)."""
    try:
        choice = torch._fused_sdp_choice(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            enable_gqa=q.size(2) != k.size(2),
        )
        return torch.nn.attention.SDPBackend(choice).name.lower()
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return "unknown"


@contextlib.contextmanager
def sdpa_equal_work(setup: Setup, seq: int) -> Iterator[Case]:
    world = setup.world_size
    kv_per_rank = setup.kv_heads * kv_head_replication(setup.heads, setup.kv_heads, world) // world
    q = setup.randn(setup.batch, seq, setup.heads // world, setup.head_dim)
    k = setup.randn(setup.batch, seq, kv_per_rank, setup.head_dim)
    v = setup.randn(setup.batch, seq, kv_per_rank, setup.head_dim)
    yield Case(
        forward=lambda: sdpa_attention(q, k, v, setup.causal),
        inputs=[q, k, v],
        dout=torch.randn_like(q),
        kernel=sdpa_kernel_name(q, k, v, setup.causal),
        note=f"1 GPU, {q.size(2)} q / {kv_per_rank} kv heads over all S, no comm (each rank alone)",
    )


@contextlib.contextmanager
def ulysses(setup: Setup, seq: int, head_chunks: int | None = 1) -> Iterator[Case]:
    world = setup.world_size
    q = setup.randn(setup.batch, seq // world, setup.heads, setup.head_dim)
    k = setup.randn(setup.batch, seq // world, setup.kv_heads, setup.head_dim)
    v = setup.randn(setup.batch, seq // world, setup.kv_heads, setup.head_dim)
    replication = kv_head_replication(setup.heads, setup.kv_heads, world)
    local_q = q.new_empty(setup.batch, seq, setup.heads // world, setup.head_dim)
    kv_per_rank = setup.kv_heads * replication // world
    chunks = resolve_head_chunks(head_chunks, setup.batch, seq, setup.heads // world, kv_per_rank)
    # The kernel of one attention call: 1/C of the rank's heads.
    local_q = q.new_empty(setup.batch, seq, setup.heads // world // chunks, setup.head_dim)
    local_kv = q.new_empty(setup.batch, seq, kv_per_rank // chunks, setup.head_dim)
    exchange = "fused q/k/v all-to-all" if chunks == 1 else f"{chunks} head chunks, all-to-alls overlapped"
    yield Case(
        forward=lambda: ulysses_attention(q, k, v, setup.group, causal=setup.causal, head_chunks=chunks),
        inputs=[q, k, v],
        dout=torch.randn_like(q),
        kernel=sdpa_kernel_name(local_q, local_kv, local_kv, setup.causal),
        note=(
            "P=1: no communication"
            if world == 1
            else exchange
            + (f", K/V heads x{replication}" if replication > 1 else "")
            + (" (auto)" if head_chunks is None else "")
        ),
    )


_deepspeed_ready: list[bool] = []


@contextlib.contextmanager
def deepspeed_ulysses(setup: Setup, seq: int) -> Iterator[Case]:
    world = setup.world_size
    if world == 1:
        raise Skip("needs more than one GPU")
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as error:
        raise Skip(f"deepspeed not importable: {error}") from None
    if "batch_dim_idx" not in inspect.signature(DistributedAttention.forward).parameters:
        raise Skip(
            f"deepspeed {deepspeed.__version__}: DistributedAttention has no batch_dim_idx ([B, S, H, D])"
        )
    if setup.kv_heads % world:
        raise Skip(
            f"DistributedAttention splits K/V heads: kv_heads {setup.kv_heads} not divisible by {world}"
        )
    if not _deepspeed_ready:
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group
        _deepspeed_ready.append(True)
    local = functools.partial(sdpa_attention, causal=setup.causal)
    # [B, S/P, H, D]: scatter heads (2), gather sequence (1); batch_dim_idx = 0 at call time.
    attention = DistributedAttention(local, setup.group, scatter_idx=2, gather_idx=1)
    q = setup.randn(setup.batch, seq // world, setup.heads, setup.head_dim)
    k = setup.randn(setup.batch, seq // world, setup.kv_heads, setup.head_dim)
    v = setup.randn(setup.batch, seq // world, setup.kv_heads, setup.head_dim)
    local_q = q.new_empty(setup.batch, seq, setup.heads // world, setup.head_dim)
    local_kv = q.new_empty(setup.batch, seq, setup.kv_heads // world, setup.head_dim)
    yield Case(
        forward=lambda: attention(q, k, v, 0),
        inputs=[q, k, v],
        dout=torch.randn_like(q),
        kernel=sdpa_kernel_name(local_q, local_kv, local_kv, setup.causal),
        note=f"deepspeed {deepspeed.__version__}, separate q/k/v all-to-alls",
    )


_meshes: dict[int, object] = {}


@contextlib.contextmanager
def torch_context_parallel(setup: Setup, seq: int) -> Iterator[Case]:
    world = setup.world_size
    if world == 1:
        raise Skip("needs more than one GPU")
    if setup.device.type != "cuda":
        raise Skip("context_parallel dispatches the CUDA SDPA kernels only")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError as error:
        raise Skip(f"torch {torch.__version__} has no context_parallel: {error}") from None
    if seq % (2 * world):
        raise Skip(f"load-balanced CP needs S divisible by 2P = {2 * world}")
    if world not in _meshes:
        _meshes[world] = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    set_rotate_method(setup.cp_rotate)
    groups = setup.heads // setup.kv_heads
    # [B, H, S/P, D]: the layout torch SDPA (and so context_parallel) works in.
    q = setup.randn(setup.batch, setup.heads, seq // world, setup.head_dim)
    k = setup.randn(setup.batch, setup.kv_heads, seq // world, setup.head_dim)
    v = setup.randn(setup.batch, setup.kv_heads, seq // world, setup.head_dim)

    def forward() -> torch.Tensor:
        # Looked up at call time: context_parallel swaps F.scaled_dot_product_attention for its ring.
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=setup.causal
        )

    # A sequence-length buffer sets up the head-tail load balancer; q/k/v are already local shards.
    positions = torch.arange(seq, device=setup.device)
    with context_parallel(
        _meshes[world], buffers=[positions], buffer_seq_dims=[0], no_restore_buffers={positions}
    ):
        block = q.new_empty(
            setup.batch, seq // world // 2, setup.heads, setup.head_dim
        )  # one ring step's chunk
        yield Case(
            forward=forward,
            inputs=[q, k, v],
            dout=torch.randn_like(q),
            kernel=sdpa_kernel_name(block, block, block, causal=False),
            note=f"ring, rotate={setup.cp_rotate}, K/V expanded to {setup.heads} heads",
        )


RUNNERS = {
    "sdpa": sdpa_equal_work,
    "ulysses": ulysses,
    "deepspeed-ulysses": deepspeed_ulysses,
    "torch-cp": torch_context_parallel,
}
THIRD_PARTY = {"deepspeed-ulysses", "torch-cp"}


def measure(
    setup: Setup, method: str, seq: int, warmup: int, iters: int, head_chunks: int | None = 1
) -> list[object]:
    """One table row for one of RUNNERS (see `measure_row`); `head_chunks` for ulysses only."""
    label = "sdpa (equal work)" if method == "sdpa" else method
    runner = functools.partial(RUNNERS[method], setup, seq)
    if method == "ulysses":
        label = f"ulysses C={'auto' if head_chunks is None else head_chunks}"
        runner = functools.partial(ulysses, setup, seq, head_chunks)
    return measure_row(setup, label, runner, seq, warmup, iters, may_fail=method in THIRD_PARTY)


def measure_row(
    setup: Setup,
    label: str,
    runner: Callable[[], contextlib.AbstractContextManager[Case]],
    seq: int,
    warmup: int,
    iters: int,
    may_fail: bool,
) -> list[object]:
    """One table row: method, S, P, kernel, fwd ms, fwd TFLOP/s, fwd+bwd ms, fwd+bwd TFLOP/s, note.

    `runner()` yields the Case to time; a Skip or an out-of-memory becomes a row saying so, and so does
    any other error when `may_fail` (third-party baselines), which our own methods never are.
    """
    world = setup.world_size
    flops_per_gpu = setup.forward_flops(seq) / world
    try:
        with runner() as case:

            def drop_grads() -> None:
                for tensor in case.inputs:
                    tensor.grad = None

            def forward_backward() -> None:
                case.forward().backward(case.dout)

            forward_ms = time_ms(case.forward, warmup, iters, setup.group, before=drop_grads)
            step_ms = time_ms(forward_backward, warmup, iters, setup.group, before=drop_grads)
            row = [
                label,
                seq,
                world,
                case.kernel,
                f"{forward_ms:.2f}",
                f"{flops_per_gpu / forward_ms / 1e9:.1f}",
                f"{step_ms:.2f}",
                f"{3.5 * flops_per_gpu / step_ms / 1e9:.1f}",
                case.note,
            ]
    except Skip as reason:
        row = [label, seq, world, "-", "-", "-", "-", "-", f"skipped: {reason}"]
    except torch.OutOfMemoryError:
        # Every rank holds the same shapes, so every rank runs out together and the run goes on.
        row = [label, seq, world, "-", "OOM", "-", "OOM", "-", "out of memory"]
    except Exception as error:
        if not may_fail:
            raise
        row = [
            label,
            seq,
            world,
            "-",
            "-",
            "-",
            "-",
            "-",
            f"failed: {type(error).__name__}: {str(error)[:120]}",
        ]
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def check_ulysses(setup: Setup, seq: int, head_chunks: int | None = 1) -> list[object]:
    """bf16 Ulysses vs fp64 on the full sequence: error at most 2x that of single-GPU bf16 SDPA."""
    generator = torch.Generator(device=setup.device).manual_seed(1234)  # same tensors on every rank

    def full(heads: int) -> torch.Tensor:
        shape = (setup.batch, seq, heads, setup.head_dim)
        return torch.randn(shape, generator=generator, device=setup.device, dtype=torch.float64)

    q, k, v, dout = full(setup.heads), full(setup.kv_heads), full(setup.kv_heads), full(setup.heads)

    def run(attention: Callable[..., torch.Tensor], dtype: torch.dtype, shard: bool) -> list[torch.Tensor]:
        prepare = (lambda t: shard_sequence(t, 1, setup.group)) if shard else (lambda t: t)
        inputs = [prepare(t).to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(prepare(dout).to(dtype))
        results = [out.detach(), *(t.grad for t in inputs)]
        if shard:
            results = [unshard_sequence(t.contiguous(), 1, setup.group) for t in results]
        return [t.double() for t in results]

    want = run(functools.partial(reference_attention, causal=setup.causal), torch.float64, shard=False)
    single = run(functools.partial(sdpa_attention, causal=setup.causal), setup.dtype, shard=False)
    got = run(
        functools.partial(ulysses_attention, group=setup.group, causal=setup.causal, head_chunks=head_chunks),
        setup.dtype,
        shard=True,
    )
    chunks = "auto" if head_chunks is None else head_chunks
    what = f"Ulysses check at S={seq}, P={setup.world_size}, C={chunks}"
    return [check_against_fp64(what, want, single, got)]


def _head_chunks(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head-chunks takes integers or 'auto', got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seq", type=int, nargs="+", default=[65536, 262144], help="whole-sequence lengths S"
    )
    parser.add_argument(
        "--nproc", type=int, default=None, help="GPUs (= torchrun --nproc-per-node; 1: single-GPU mode)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32, help="query heads Hq")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads Hkv (GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--head-chunks",
        nargs="+",
        type=_head_chunks,
        default=[1],
        metavar="C",
        help="ulysses rows: pipelined head chunks (an integer dividing the K/V heads per rank; 1 = no "
        "overlap) or 'auto' (choose_head_chunks; the library default is 1); one row per value",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed runs; the median is reported")
    parser.add_argument("--cp-rotate", choices=("allgather", "alltoall"), default="allgather")
    parser.add_argument(
        "--sdpa-backend",
        choices=("auto", *SDPA_BACKENDS),
        default="auto",
        help="restrict aten's SDPA kernel choice",
    )
    parser.add_argument("--check-seq", type=int, default=2048, help="S of the correctness check (0: skip)")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc is not None and args.nproc != world_env:
        raise SystemExit(
            f"--nproc {args.nproc} but WORLD_SIZE={world_env}: launch with "
            f"`torchrun --nproc-per-node {args.nproc} bench/attention.py ...` (or drop --nproc)"
        )
    world, device = start_bench()
    for seq in args.seq:
        if seq % world:
            raise SystemExit(
                f"--seq {seq} is not divisible by the {world} GPUs: choose a multiple of {world}"
            )
    setup = Setup.from_args(args, device, world)
    kv_head_replication(args.heads, args.kv_heads, world)  # bad head counts fail here, before any work
    kernels = contextlib.nullcontext()
    if args.sdpa_backend != "auto":
        kernels = torch.nn.attention.sdpa_kernel(
            getattr(torch.nn.attention.SDPBackend, SDPA_BACKENDS[args.sdpa_backend])
        )
    with kernels:
        notes = (
            [note for chunks in args.head_chunks for note in check_ulysses(setup, args.check_seq, chunks)]
            if args.check_seq
            else ["Ulysses check skipped (--check-seq 0)"]
        )
        for line in notes:
            print_rank_zero(line)
        rows = []
        for seq in args.seq:
            for method in args.methods:
                for chunks in args.head_chunks if method == "ulysses" else [1]:
                    rows.append(measure(setup, method, seq, args.warmup, args.iters, chunks))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the method's tensors are gone; give the next one room
                    print_rank_zero(" | ".join(str(cell) for cell in rows[-1]))
    table = markdown_table(ATTENTION_HEADERS, rows)
    what = (
        f"Attention throughput, {args.dtype}, {'causal' if args.causal else 'full'}, B={args.batch}, "
        f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, SDPA backend {args.sdpa_backend}. "
        "TFLOP/s per GPU = FLOPs / P / time with FLOPs = 4*B*S^2*Hq*D"
        + (" / 2 (causal)" if args.causal else "")
        + " for fwd and 3.5x that for fwd+bwd; median of "
        f"{args.iters} runs after {args.warmup} warmups, slowest rank, CUDA events. "
        "sdpa (equal work) = one GPU doing one Ulysses rank's attention without communication. "
        + " ".join(notes)
    )
    print_rank_zero("\n" + what + "\n\n" + table)
    if args.record and dist.get_rank() == 0:
        path = append_record(f"Ulysses attention, P={world}", what, table, world)
        print_rank_zero(f"appended to {path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
