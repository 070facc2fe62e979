"""Head-chunked Ulysses: the all-to-alls of one head chunk run while attention works on another.

Plain Ulysses (parallel/ulysses.py) is serial: exchange q/k/v, attend, exchange the output back; the
GPU computes nothing while the two all-to-alls run (about 5% of fwd+bwd at 64K tokens on 2 H200s).
Attention heads are independent, so the heads each rank receives are split into C chunks and the
work becomes a pipeline (A_c: q/k/v all-to-all of chunk c, O_c: output all-to-all of chunk c):

    compute stream:  pack A0 | pack A1, attend 0, pack O0 | pack A2, attend 1, pack O1 | ... | attend C-1
    NCCL stream:     A0      |        A1 ........  O0    |        A2 ........  O1     | ... | O_{C-1}

Every collective is issued with async_op=True; on CUDA, NCCL runs it on its own stream and
`work.wait()` only makes the compute stream wait, so A_{c+1} and O_{c-1} run while chunk c is attended.
Only A_0 and O_{C-1} stay exposed: 1/C of the communication instead of all of it. The backward is the
mirror image (dout all-to-all of chunk c+1 and dq/dk/dv all-to-all of chunk c-1 run during the
attention backward of chunk c). On gloo (CPU tests) the collectives run on gloo's threads: same
results, same order.

Tried and removed in session 15: exchanges on the copy engines, which take no SMs from the attention
they run beside (copy-engine reads of the peers' torch symmetric-memory send buffers, and NCCL's
zero-CTA ncclAlltoAll between symmetric windows). Neither gained at 64K tokens on 2 x H200 (95.0-96.0%
of one GPU at equal work against 95.6-96.7% for NCCL's all_to_all_single), and the symmetric-memory
reads hung at 64K, cause not found (BENCHMARKS.md, sessions 10-15).

Chunks follow GQA groups: chunk c of rank r holds K/V heads [c*kv/C, (c+1)*kv/C) of r's kv = Hkv/P
K/V heads (after replication when Hkv < P) and exactly the query heads that read them, so every
chunk is a complete GQA attention and C must divide kv. Results are bit-identical to C = 1 when the
local attention computes each head independently (SDPA, the Triton document kernel, the reference):
the chunks move the same numbers and attend each head with the same kernel.

What it costs: C times more, smaller collectives and kernel launches (3 packing copies, 1 attention
and 1 unpacking copy per chunk and direction instead of per layer), and attention at H/(P*C) heads per
call. At long S each call still has S/128 * H/(P*C) tiles, enough to fill the GPU, so the FLOP
efficiency holds; at short S it does not, which is why `choose_head_chunks` stays at C = 1 there.

One autograd.Function owns the whole pipeline: forward and backward issue their collectives in a
fixed order, the same on every rank, whatever order autograd would pick for separate nodes. The
per-chunk attention is recorded as its own small graph inside the forward (reached in backward by
gradient edges, so no tensor is held outside the saved-tensor hooks: activation checkpointing and
offload still see and free the attention's saved tensors exactly as with C = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.autograd.graph import get_gradient_edge

from longloom.parallel.triton_row_copy import copy_rows_

# Below this many query rows x heads per attention call the GPU is no longer full (flash attention
# tiles 128 rows per block: 2^17 rows x heads = 1024 blocks, ~8 waves on 132 SMs) and C stays smaller.
MIN_ROWS_PER_CHUNK = 1 << 17
CHUNK_CHOICES = (4, 2)


def layout_copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) for the packing and unpacking copies: on CUDA by rows (parallel/triton_row_copy.py),
    whose (h, D) rows are contiguous on both sides; bit-identical to copy_ either way."""
    return copy_rows_(dst, src) if dst.is_cuda else dst.copy_(src)


def seq_to_heads_send_shape(parts: Sequence[torch.Tensor], world_size: int) -> torch.Size:
    batch, seq_local, _, _, head_dim = parts[0].shape
    return torch.Size((world_size, batch, seq_local, sum(part.size(3) for part in parts), head_dim))


def pack_seq_to_heads(parts: Sequence[torch.Tensor], send: torch.Tensor) -> torch.Tensor:
    """parts[i] [B, S/P, P, h_i, D] (slice p goes to rank p) -> `send` [P, B, S/P, sum h_i, D]
    (seq_to_heads_send_shape). Writing each part straight into its slot is the only copy."""
    heads = [part.size(3) for part in parts]
    offset = 0
    for part, count in zip(parts, heads):
        layout_copy_(send[..., offset : offset + count, :], part.permute(2, 0, 1, 3, 4))
        offset += count
    return send


def unpack_seq_to_heads(received: torch.Tensor, heads: Sequence[int]) -> list[torch.Tensor]:
    """[P, B, S/P, sum h_i, D] -> [B, S, h_i, D] each (received[p] is rank p's sequence chunk).

    A view when B == 1 (the usual long-sequence case), one copy otherwise.
    """
    world_size, batch, seq_local, total, head_dim = received.shape
    gathered = received.transpose(0, 1).reshape(batch, world_size * seq_local, total, head_dim)
    return list(gathered.split(list(heads), dim=2))


def heads_to_seq_send_shape(tensors: Sequence[torch.Tensor], world_size: int) -> torch.Size:
    batch, seq, _, head_dim = tensors[0].shape
    return torch.Size((world_size, batch, seq // world_size, sum(t.size(2) for t in tensors), head_dim))


def pack_heads_to_seq(tensors: Sequence[torch.Tensor], send: torch.Tensor) -> torch.Tensor:
    """[B, S, h_i, D] each -> `send` [P, B, S/P, sum h_i, D] (heads_to_seq_send_shape): row p is
    sequence chunk p, for rank p."""
    world_size, seq_local = send.size(0), send.size(2)
    heads = [tensor.size(2) for tensor in tensors]
    offset = 0
    for tensor, count in zip(tensors, heads):
        layout_copy_(
            send[..., offset : offset + count, :],
            tensor.unflatten(1, (world_size, seq_local)).transpose(0, 1),
        )
        offset += count
    return send


def unpack_heads_to_seq(received: torch.Tensor, heads: Sequence[int]) -> list[torch.Tensor]:
    """[P, B, S/P, sum h_i, D] -> [B, S/P, P, h_i, D] views: [:, :, p] holds rank p's heads of our chunk."""
    outputs, offset = [], 0
    for count in heads:
        outputs.append(received[..., offset : offset + count, :].permute(1, 2, 0, 3, 4))
        offset += count
    return outputs


class PendingAllToAll:
    """One all_to_all_single of `send` [P, ...] (row p for rank p) over `group`, started asynchronously."""

    def __init__(self, send: torch.Tensor, group: dist.ProcessGroup):
        self.received = torch.empty_like(send)
        self.work = dist.all_to_all_single(self.received, send, group=group, async_op=True)

    def result(self) -> torch.Tensor:
        """The received [P, ...] rows (row p from rank p), waited for: on CUDA by the compute stream, not the host."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.received


def _finish(exchanges: Sequence[PendingAllToAll | None]) -> None:
    # On an exception mid-pipeline (out of memory, checkpoint's early stop of a recomputation) the
    # issued collectives still complete before their buffers go, as on every other rank.
    for exchange in exchanges:
        if exchange is not None:
            exchange.result()


def exchange_seq_to_heads(
    parts: Sequence[torch.Tensor], group: dist.ProcessGroup, world_size: int
) -> PendingAllToAll:
    """Packs parts[i] [B, S/P, P, h_i, D] into a send buffer and starts its all-to-all over `group`;
    its result() is [P, B, S/P, sum h_i, D], row p from rank p (unpack_seq_to_heads)."""
    send = torch.empty(
        seq_to_heads_send_shape(parts, world_size), dtype=parts[0].dtype, device=parts[0].device
    )
    return PendingAllToAll(pack_seq_to_heads(parts, send), group)


def exchange_heads_to_seq(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, world_size: int
) -> PendingAllToAll:
    """Packs [B, S, h_i, D] each into a send buffer and starts its all-to-all over `group`; its result()
    is [P, B, S/P, sum h_i, D], row p holding rank p's heads of our chunk (unpack_heads_to_seq)."""
    if len(tensors) == 1:
        # One [B, S, h, D] tensor, contiguous, with B = 1 (the attention output of a long sequence)
        # is already laid out as its send buffer: NCCL sends from it, without the packing copy.
        rows = tensors[0].unflatten(1, (world_size, -1)).transpose(0, 1)
        if rows.is_contiguous():
            return PendingAllToAll(rows, group)
    send = torch.empty(
        heads_to_seq_send_shape(tensors, world_size), dtype=tensors[0].dtype, device=tensors[0].device
    )
    return PendingAllToAll(pack_heads_to_seq(tensors, send), group)


def choose_head_chunks(batch: int, seq: int, query_heads_per_rank: int, kv_heads_per_rank: int) -> int:
    """C for `head_chunks=None`: the largest of 4, 2 that splits the K/V heads and keeps each call's
    query rows x heads >= MIN_ROWS_PER_CHUNK (a full GPU); else 1 (plain Ulysses)."""
    for chunks in CHUNK_CHOICES:
        if (
            kv_heads_per_rank % chunks == 0
            and batch * seq * (query_heads_per_rank // chunks) >= MIN_ROWS_PER_CHUNK
        ):
            return chunks
    return 1


class _Passthrough(torch.autograd.Function):
    """Gives gathered (non-grad) tensors a grad_fn that holds no tensor, so the chunk's attention inputs
    can be reached by gradient edges without keeping them alive outside the saved-tensor hooks."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *tensors: torch.Tensor):
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, *grads)


def _chunk_views(tensor: torch.Tensor, world_size: int, chunks: int) -> torch.Tensor:
    """[B, S/P, H, D] -> [B, S/P, P, C, H/(P*C), D] view: [:, :, p, c] is chunk c of rank p's heads."""
    return tensor.unflatten(2, (world_size, chunks, tensor.size(2) // (world_size * chunks)))


class HeadChunkedAttention(torch.autograd.Function):
    """q [B, S/P, Hq, D], k/v [B, S/P, Hkv, D] (Hkv % (P*C) == 0) -> out [B, S/P, Hq, D], pipelined."""

    @staticmethod
    def forward(ctx, q, k, v, attend, group, world_size, chunks, build_graph):
        q_chunks, k_chunks, v_chunks = (_chunk_views(t, world_size, chunks) for t in (q, k, v))
        heads = [q_chunks.size(4), k_chunks.size(4), v_chunks.size(4)]
        out = torch.empty_like(q)
        out_chunks = _chunk_views(out, world_size, chunks)
        anchor = q.new_zeros((), requires_grad=True)
        edges = []

        def exchange_inputs(c: int) -> PendingAllToAll:
            parts = (q_chunks[:, :, :, c], k_chunks[:, :, :, c], v_chunks[:, :, :, c])
            return exchange_seq_to_heads(parts, group, world_size)

        def finish_output(c: int) -> None:
            layout_copy_(out_chunks[:, :, :, c], unpack_heads_to_seq(outputs[c].result(), heads[:1])[0])
            outputs[c] = None

        inputs, outputs = [exchange_inputs(0)], []
        try:
            for c in range(chunks):
                received = inputs[c].result()
                inputs[c] = None  # the buffer lives on only as the chunk's attention inputs
                if c + 1 < chunks:
                    inputs.append(exchange_inputs(c + 1))  # travels while chunk c is attended
                gathered = unpack_seq_to_heads(received, heads)
                with torch.enable_grad():
                    if build_graph:
                        gathered = _Passthrough.apply(anchor, *gathered)
                    out_heads = attend(*gathered)
                if build_graph:
                    edges.append((get_gradient_edge(out_heads), [get_gradient_edge(t) for t in gathered]))
                outputs.append(exchange_heads_to_seq([out_heads.detach()], group, world_size))
                del received, gathered, out_heads  # only the graph (through the hooks) keeps them
                if c > 0:  # chunk c-1's output travelled during attention c: at most 2 buffers held
                    finish_output(c - 1)
            finish_output(chunks - 1)
        finally:
            _finish(inputs + outputs)
        ctx.edges, ctx.group, ctx.world_size, ctx.chunks = edges, group, world_size, chunks
        ctx.heads = heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        world_size, chunks, group = ctx.world_size, ctx.chunks, ctx.group
        if any(edge is None for edge in ctx.edges):  # before any collective: every rank stops here
            raise RuntimeError(
                "ulysses_attention with head_chunks > 1 frees each chunk's graph in its first backward; "
                "a second backward (retain_graph=True) needs head_chunks=1"
            )
        batch, seq_local, _, head_dim = grad_out.shape
        grad_chunks = _chunk_views(grad_out, world_size, chunks)
        grads = [
            grad_out.new_empty(batch, seq_local, world_size * chunks * count, head_dim) for count in ctx.heads
        ]
        grad_views = [_chunk_views(grad, world_size, chunks) for grad in grads]

        def exchange_grad_out(c: int) -> PendingAllToAll:
            return exchange_seq_to_heads([grad_chunks[:, :, :, c]], group, world_size)

        def finish_grads(c: int) -> None:
            for view, part in zip(grad_views, unpack_heads_to_seq(outgoing[c].result(), ctx.heads)):
                layout_copy_(view[:, :, :, c], part)
            outgoing[c] = None

        incoming, outgoing = [exchange_grad_out(0)], []
        try:
            for c in range(chunks):
                grad_heads = unpack_seq_to_heads(incoming[c].result(), ctx.heads[:1])[0]
                incoming[c] = None
                if c + 1 < chunks:
                    incoming.append(exchange_grad_out(c + 1))  # travels during chunk c's backward
                out_edge, input_edges = ctx.edges[c]
                chunk_grads = torch.autograd.grad([out_edge], input_edges, [grad_heads])
                outgoing.append(exchange_heads_to_seq(chunk_grads, group, world_size))
                ctx.edges[c] = None  # frees chunk c's graph
                del grad_heads, chunk_grads
                if c > 0:
                    finish_grads(c - 1)
            finish_grads(chunks - 1)
        finally:
            _finish(incoming + outgoing)
        return (*grads, None, None, None, None, None)


def head_chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup,
    world_size: int,
    chunks: int,
) -> torch.Tensor:
    """Ulysses attention of q [B, S/P, Hq, D] and (already replicated) k/v [B, S/P, Hkv, D] in `chunks`
    pipelined head chunks; `attend(q, k, v)` runs on each chunk's gathered [B, S, h, D] tensors."""
    build_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return HeadChunkedAttention.apply(q, k, v, attend, group, world_size, chunks, build_graph)
