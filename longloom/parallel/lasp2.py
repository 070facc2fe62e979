"""LASP-2: sequence parallelism for causal linear attention with ONE all-gather of d_k x d_v states.

Paper: Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid" (2025).
Idea: linear attention summarises a whole chunk of the sequence in a memory state M = K^T V
(d_k x d_v, decayed), so each rank computes the state of its chunk, one all-gather shares every
rank's state (its size does not depend on the sequence length), and each rank adds up the decayed
states of the chunks before its own: that prefix is the incoming state of its local scan
(attention/linear_chunked.py), which gives the intra-chunk causal term plus Q times the prefix.
The backward mirrors it with one all-gather of dM = Q^T dO and a suffix sum over the later chunks.

    o_t = sum_{s <= t} decay[h] ** (t - s) * (q_t . k_s) * v_s      (no softmax, no normalisation)

Layouts: "contiguous" (rank r holds chunk r of P) and "zigzag" (rank r holds chunks r and 2P-1-r of
2P; both chunks' states travel in the same all-gather and each chunk's prefix is taken in global
chunk order). `lasp1_linear_attention` is the ring-style baseline (LASP-1: the state is passed rank to
rank, P sequential hops), kept for bench/linear.py.

Local compute: the Triton scan (attention/triton_linear.py) on CUDA, the chunked torch scan on CPU.

LASP-2H ("hybrid" in longloom means only this): a model whose `model.layer_pattern` mixes linear "L"
layers (here) with softmax "S" layers (parallel/two_d.py), on the same sharding of the sequence
(configs/tiny-lasp2h.yaml is a small one).

Packed documents (`document_ids` [B, S/P], sharded like q): a document's tokens see nothing of the
previous one, also across ranks. Locally the scan runs per document (linear_chunked.document_scan: the
incoming state enters only the first document of a chunk, only the last one's state leaves it); across
ranks the ids at both ends of every chunk are all-gathered once in the forward (tiny, and saved for the
backward) and the prefix (suffix) of states crosses a chunk edge only where a document continues over
it, and passes through a chunk only if that chunk is one document (linear_chunked.chain_document_states).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from longloom.attention.document_plans import DocumentPlans, cached, check_document_ids_once
from longloom.attention.linear_chunked import (
    Scan,
    chain_document_states,
    chain_states,
    chunked_linear_scan,
    compute_dtype,
    decay_powers,
    document_scan,
    document_segments,
    linear_attention_backward,
    log_decay_of,
)
from longloom.parallel.sharding import chunks_per_rank, local_chunk_ids

# "triton-blocks": the outputs and gradients of the local chunks by the block-parallel kernels
# (attention/triton_linear_blocks.py); the states-only scans and packed documents keep the Triton scan.
# It is the CUDA default: fwd+bwd at 64K tokens, H = 32, d = 128 on one H200, 5.21 ms against the
# scan's 10.78 and flash-linear-attention's 7.03 in bench/linear.py (BENCHMARKS.md, session 13).
BACKENDS = ("torch", "triton", "triton-blocks")


# The block kernels hold whole [d_k, d_v] states per program (the backward kernel two of them beside
# four [block, d] tiles): compiled and measured at d <= 128 only. Wider heads keep the scan, which tiles d.
BLOCKS_MAX_HEAD_DIM = 128


def resolve_backend(q: torch.Tensor, backend: str | None, head_dim_v: int | None = None) -> str:
    """`backend` as given, or for None: on CUDA (when Triton imports) "triton-blocks" for head dims up to
    BLOCKS_MAX_HEAD_DIM and "triton" above; "torch" otherwise. `head_dim_v`: v's, when it differs from q's."""
    if backend is not None:
        return backend
    if not (q.is_cuda and _triton_available()):
        return "torch"
    widest = max(q.size(-1), head_dim_v or 0)
    return "triton-blocks" if widest <= BLOCKS_MAX_HEAD_DIM else "triton"


def select_scan(q: torch.Tensor, backend: str | None = None) -> Scan:
    """The local scan: Triton on CUDA (when importable), chunked torch otherwise or when asked."""
    backend = resolve_backend(q, backend)
    if backend == "torch":
        return chunked_linear_scan
    if backend in ("triton", "triton-blocks"):
        from longloom.attention.triton_linear import triton_linear_scan

        return triton_linear_scan
    raise ValueError(f"unknown linear attention backend {backend!r}: use one of {BACKENDS}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_linear_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None, chunks: int, layout: str
) -> None:
    """Raises ValueError naming the sizes and the config key to change."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq_local, heads, head_dim]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape (linear attention has no "
            "GQA: model.kv_heads must equal model.heads for linear layers)"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v {tuple(v.shape)} must match q {tuple(q.shape)} in batch, sequence and heads "
            "(model.kv_heads must equal model.heads for linear layers)"
        )
    if q.size(1) % chunks:
        raise ValueError(
            f"local sequence length {q.size(1)} is not divisible by {chunks} ({layout} layout holds "
            f"{chunks} chunks per rank): change data.seq_len to a multiple of {chunks} x the SP degree"
        )
    if decay is not None:
        if decay.shape != (q.size(2),):
            raise ValueError(
                f"decay must be [heads] = [{q.size(2)}]; got {tuple(decay.shape)} (model.heads = {q.size(2)})"
            )
        # Checking values reads the tensor back to the host: a stall on CUDA; the model's decay is a
        # fixed buffer made once, so only the CPU path (tests, demos) checks it per call.
        if not decay.is_cuda and not bool(((decay > 0) & (decay <= 1)).all()):
            raise ValueError(f"decay values must lie in (0, 1]; got {decay.tolist()}")


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _to_chunks(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B, L, H, D] -> [B * chunks, L / chunks, H, D]: each local chunk becomes its own batch entry."""
    return x.reshape(x.size(0) * chunks, x.size(1) // chunks, *x.shape[2:])


def _from_chunks(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.reshape(batch, -1, *x.shape[2:])


def _all_gather(states: torch.Tensor, group: dist.ProcessGroup | None, world_size: int) -> torch.Tensor:
    """[*shape] -> [P, *shape]: THE one collective of each direction (its size is d_k x d_v per head)."""
    if world_size == 1:
        return states.unsqueeze(0)
    flat = states.contiguous().view(-1)
    gathered = torch.empty(world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    # torch >= 2.13 names it all_gather_single (the old name warns); both take a flat [P * N] output.
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather_single(gathered, flat, group=group)
    return gathered.view(world_size, *states.shape)


def _in_global_order(gathered: torch.Tensor, layout: str) -> torch.Tensor:
    """[P, B, n, ...] rank-major, local chunk order -> [P * n, B, ...] in global chunk order."""
    world_size = gathered.size(0)
    by_chunk: dict[int, torch.Tensor] = {}
    for owner in range(world_size):
        for index, chunk_id in enumerate(local_chunk_ids(layout, owner, world_size)):
            by_chunk[chunk_id] = gathered[owner, :, index]
    return torch.stack([by_chunk[chunk_id] for chunk_id in range(len(by_chunk))])


def carried_states(
    gathered: torch.Tensor,
    layout: str,
    rank: int,
    chunk_len: int,
    log_decay: torch.Tensor | None,
    reverse: bool,
    chunk_edges: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state entering each of this rank's chunks, from every rank's chunk states.

    gathered: [P, B, n, H, d_k, d_v], rank-major, local chunk order. Walks the 2P (zigzag) or P
    (contiguous) chunks in global order (from the end when `reverse`, for the backward's suffix):
    incoming[c] = sum over the chunks c' walked before c of lam^((|c - c'| - 1) * chunk_len) state[c'].
    Returns [B, n, H, d_k, d_v] for this rank's chunks.
    `chunk_edges` [P * n, B, 2] (packed documents): the ids at both ends of every chunk, in global order.
    """
    world_size = gathered.size(0)
    in_order = _in_global_order(gathered, layout)
    if chunk_edges is None:
        incoming, _ = chain_states(in_order, log_decay, chunk_len, reverse=reverse)
    else:
        incoming = chain_document_states(
            in_order, log_decay, chunk_len, chunk_edges[..., 0], chunk_edges[..., 1], reverse
        )
    return torch.stack([incoming[chunk_id] for chunk_id in local_chunk_ids(layout, rank, world_size)], dim=1)


def _document_runs_and_edges(
    document_ids: torch.Tensor,
    chunks: int,
    layout: str,
    group: dist.ProcessGroup | None,
    world_size: int,
) -> tuple[list[list[tuple[int, int]]], torch.Tensor]:
    """(each local chunk's document runs, for `document_scan`, and every chunk's end ids [P * n, B, 2] in
    global order) from this rank's ids. The runs cost a host copy, the edges one tiny all-gather."""
    local = document_ids.reshape(-1, document_ids.size(1) // chunks)  # [B * n, L / n] like _to_chunks
    edges = torch.stack((local[:, 0], local[:, -1]), dim=-1).view(document_ids.size(0), chunks, 2)
    gathered = edges.unsqueeze(0)
    if world_size > 1:
        parts = [torch.empty_like(edges) for _ in range(world_size)]
        dist.all_gather(parts, edges.contiguous(), group=group)
        gathered = torch.stack(parts)
    return document_segments(local), _in_global_order(gathered, layout)


def _scanned_layout(layout: str, world_size: int) -> str:
    """The layout each rank scans its chunks in. On one device every layout holds the sequence in order
    (zigzag's two chunks are 0 and 1), so it is scanned whole, as one contiguous chunk: the states-only
    scan forward and the dual scan backward, which only carry state between ranks, are skipped (2 of 6
    scans per layer, measured ~2 ms of 12.3 at 64K tokens on an H200)."""
    return "contiguous" if world_size == 1 else layout


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, group, layout, backend, document_ids=None, document_plans=None):
        world_size, rank = _group_size_rank(group)
        check_linear_inputs(q, k, v, decay, chunks_per_rank(layout), layout)
        check_document_ids_once(document_ids, q, "lasp2_linear_attention", document_plans)
        layout = _scanned_layout(layout, world_size)
        chunks = chunks_per_rank(layout)
        backend = resolve_backend(q, backend, v.size(-1))
        scan, chunk_edges = select_scan(q, backend), None
        if document_ids is not None:  # once per model call with its plans (every linear layer shares them)
            runs_and_edges = partial(
                _document_runs_and_edges, document_ids, chunks, layout, group, world_size
            )
            runs, chunk_edges = cached(
                document_plans, document_ids, "linear attention runs", (group, layout), runs_and_edges
            )
            scan = partial(document_scan, scan, runs)
        log_decay = log_decay_of(decay, compute_dtype(q.dtype))
        batch, chunk_len = q.size(0), q.size(1) // chunks
        qc, kc, vc = _to_chunks(q, chunks), _to_chunks(k, chunks), _to_chunks(v, chunks)

        incoming = None  # one device: the whole sequence is one chunk and nothing comes before it
        if world_size > 1:
            # M of each local chunk (a zero-state scan without outputs), all-gathered, prefix-summed.
            _, states = scan(None, kc, vc, log_decay)
            gathered = _all_gather(states.reshape(batch, chunks, *states.shape[1:]), group, world_size)
            incoming = carried_states(
                gathered, layout, rank, chunk_len, log_decay, reverse=False, chunk_edges=chunk_edges
            ).flatten(0, 1)
        if backend == "triton-blocks" and document_ids is None:
            from longloom.attention.triton_linear_blocks import block_parallel_forward

            out, _ = block_parallel_forward(qc, kc, vc, log_decay, incoming)
        else:
            out, _ = scan(qc, kc, vc, log_decay, incoming)

        ctx.save_for_backward(q, k, v, decay, incoming)
        ctx.group, ctx.layout, ctx.backend = group, layout, backend
        ctx.documents = (scan, chunk_edges) if document_ids is not None else None
        return _from_chunks(out, batch).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, decay, incoming = ctx.saved_tensors
        world_size, rank = _group_size_rank(ctx.group)
        chunks = chunks_per_rank(ctx.layout)
        scan, chunk_edges = ctx.documents or (select_scan(q, ctx.backend), None)
        log_decay = log_decay_of(decay, compute_dtype(q.dtype))
        batch, chunk_len = q.size(0), q.size(1) // chunks
        qc, kc, vc = _to_chunks(q, chunks), _to_chunks(k, chunks), _to_chunks(v, chunks)
        doc = _to_chunks(grad_out.contiguous(), chunks)

        outgoing = None  # one device: no later chunk sends a gradient back into the final state
        if world_size > 1:
            # dM = sum_t lam^(t+1) q_t^T dO_t of each local chunk (a reverse zero-state scan), all-gathered,
            # suffix-summed: the gradient reaching this chunk's final state from every later chunk.
            _, dual = scan(None, qc, doc, log_decay, reverse=True)
            gathered = _all_gather(dual.reshape(batch, chunks, *dual.shape[1:]), ctx.group, world_size)
            outgoing = carried_states(
                gathered, ctx.layout, rank, chunk_len, log_decay, reverse=True, chunk_edges=chunk_edges
            ).flatten(0, 1)
        if ctx.backend == "triton-blocks" and ctx.documents is None:
            from longloom.attention.triton_linear_blocks import block_parallel_backward

            dq, dk, dv, _ = block_parallel_backward(qc, kc, vc, doc, log_decay, incoming, outgoing)
        else:
            dq, dk, dv, _ = linear_attention_backward(scan, qc, kc, vc, doc, log_decay, incoming, outgoing)
        return (
            _from_chunks(dq, batch).to(q.dtype),
            _from_chunks(dk, batch).to(k.dtype),
            _from_chunks(dv, batch).to(v.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def lasp2_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    decay: torch.Tensor | None = None,
    layout: str = "contiguous",
    backend: str | None = None,
    document_ids: torch.Tensor | None = None,
    document_plans: DocumentPlans | None = None,
) -> torch.Tensor:
    """Causal linear attention over a sequence sharded on `group`; out [B, S/P, H, d_v] in q's dtype.

    q, k: [B, S/P, H, d_k]; v: [B, S/P, H, d_v]; decay: [H] in (0, 1] or None (no decay), a fixed
    buffer (no gradient). `group=None` (or size 1) runs on one device. `layout` must be the one the
    sequence was sharded with (parallel/sharding.py). `backend`: None ("triton-blocks" on CUDA, torch
    on CPU), "torch", "triton" (the sequential scan) or "triton-blocks" (the local outputs and gradients
    block-parallel). Differentiable in q, k, v.
    `document_ids` [B, S/P] (packed documents, sharded like q): state and decay restart at each document.
    `document_plans` (attention/document_plans.py): the model call's cache; the ids' runs and chunk edges
    are then found (a host copy, an all-gather) once for every layer; None finds them per call.
    """
    return _LASP2.apply(q, k, v, decay, group, layout, backend, document_ids, document_plans)


class _LASP1(torch.autograd.Function):
    """Ring-style baseline: rank r waits for the state of ranks < r from rank r-1, forwards
    lam^L * state + M_r to rank r+1, then computes its output. The backward runs the ring backwards."""

    @staticmethod
    def forward(ctx, q, k, v, decay, group, backend):
        check_linear_inputs(q, k, v, decay, 1, "contiguous")
        scan = select_scan(q, backend)
        log_decay = log_decay_of(decay, compute_dtype(q.dtype))
        _, state = scan(None, k, v, log_decay)
        incoming = _pass_along_ring(state, group, q.size(1), log_decay, reverse=False)
        out, _ = scan(q, k, v, log_decay, incoming)
        ctx.save_for_backward(q, k, v, decay, incoming)
        ctx.group, ctx.backend = group, backend
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, decay, incoming = ctx.saved_tensors
        scan = select_scan(q, ctx.backend)
        log_decay = log_decay_of(decay, compute_dtype(q.dtype))
        grad_out = grad_out.contiguous()
        _, dual = scan(None, q, grad_out, log_decay, reverse=True)
        outgoing = _pass_along_ring(dual, ctx.group, q.size(1), log_decay, reverse=True)
        dq, dk, dv, _ = linear_attention_backward(scan, q, k, v, grad_out, log_decay, incoming, outgoing)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _pass_along_ring(
    state: torch.Tensor,
    group: dist.ProcessGroup | None,
    chunk_len: int,
    log_decay: torch.Tensor | None,
    reverse: bool,
) -> torch.Tensor:
    """Receives the carried state from the previous rank (next when `reverse`) and sends on its own."""
    world_size, rank = _group_size_rank(group)
    incoming = torch.zeros_like(state)
    previous, following = (rank + 1, rank - 1) if reverse else (rank - 1, rank + 1)
    if 0 <= previous < world_size:
        dist.recv(incoming, src=dist.get_global_rank(group, previous), group=group)
    if 0 <= following < world_size:
        chunk_decay = decay_powers(log_decay, torch.tensor(chunk_len, device=state.device))
        carried = incoming if chunk_decay is None else incoming * chunk_decay.view(-1, 1, 1)
        dist.send((carried + state).contiguous(), dst=dist.get_global_rank(group, following), group=group)
    return incoming


def lasp1_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    decay: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LASP-1 baseline (contiguous layout only): same result as LASP-2, P - 1 sequential hops."""
    return _LASP1.apply(q, k, v, decay, group, backend)
