"""Triton causal linear attention with per-head decay, block-parallel: block states, then every block at once.

The scan kernel (attention/triton_linear.py) walks the sequence with the state in registers and
computes each block's output on the way: the whole computation sits on the sequential walk, and its
backward is three more such walks (dq, dk, dv). This module splits the work the way
flash-linear-attention's chunk kernels do (chunk_simple_gla; read for the structure, no code taken):

1. `_block_states_kernel` walks the blocks once and only carries the state: for each block it stores
   the state entering it (in the inputs' dtype, as the scan's dots round it), then adds the block's
   keys and values. One small dot per block; programs per (batch, head, d_k tile, d_v tile).
2. `_block_output_kernel`: every (block, batch, head, d_v tile) at once, from its entering state:
       out_i = sum_{j <= i in block} lam^(i-j) (q_i . k_j) v_j + lam^(i+1) q_i h_n
3. Backward: the states again (recomputed, not kept from the forward), the reverse walk of
   `_block_states_kernel` over (q, dO) whose entering states are dh_{n+1}, the gradient of the state
   leaving block n (the final state's gradient for the last block), then `_block_backward_kernel` for
   every (block, batch, head) at once:
       dq_i = sum_{j <= i} lam^(i-j) (dO_i . v_j) k_j + lam^(i+1) dO_i h_n^T
       dk_j = sum_{i >= j} lam^(i-j) (dO_i . v_j) q_i + lam^(c-1-j) v_j dh_{n+1}^T
       dv_j = sum_{i >= j} lam^(i-j) (q_i . k_j) dO_i + lam^(c-1-j) k_j dh_{n+1}
   and the initial state's gradient is the reverse walk's final state.

Same contract as the scan (attention/linear_chunked.py docstring): [B, S, H, D] tensors, states
[B, H, d_k, d_v] in fp32, an optional incoming state and the outgoing state (LASP-2's). The block
states take B * H * (S / block) * d_k * d_v elements in the inputs' dtype (1 GiB at 64K tokens, H = 32,
d = 128, bf16), held for one call. Runs on CPU under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from longloom.attention.linear_chunked import DEFAULT_BLOCK_SIZE, compute_dtype
from longloom.attention.triton_linear import (
    add_block_to_state,
    block_rows,
    head_log_decay,
    intra_block_weight,
    load_block_rows,
    load_initial_state,
    state_tile,
    walk_block,
)


@dataclasses.dataclass(frozen=True)
class BlockLaunch:
    """Launch settings of the block-parallel kernels; bench/linear_blocks.py (and bench/linear.py) sweep them.

    Defaults, measured on one H200 at 64K tokens, H = 32, d = 128, bf16 (BENCHMARKS.md, session 12):
    4 warps for both kernels and 4 stages. The backward kernel with 8 warps took 4.77 ms against 3.38
    with 4 (more programs resident per SM hide its loads better than more warps per program); 2 to 4
    stages are within noise of each other, 3 (Triton's default) was 0.2 ms slower. The state walk is
    latency-bound (one small dot per block, in sequence): `state_tile` is the d_k and d_v tile of its
    programs, B * H * (d_k / tile) * (d_v / tile) of them (128 at H = 32, d = 128, tile 64: one per SM
    of an H200; tile 32 took 1.12 ms per walk, 64 0.93, 128 2.07).

    fp32 operands take exact (ieee) dots on the CUDA cores, and the backward kernel's d = 128 tiles then
    compile slowly in few warps: 113 s with 4 warps against 33 s with 8 (bf16: 6 s; sm_90, triton 3.6,
    BENCHMARKS.md session 13), so fp32 has its own backward warp count.
    """

    output_warps: int = 4
    backward_warps: int = 4
    stages: int | None = 4
    state_tile: int = 64
    fp32_backward_warps: int = 8

    def stage_settings(self) -> dict[str, int]:
        return {} if self.stages is None else {"num_stages": self.stages}

    def backward_warps_for(self, dtype: torch.dtype) -> int:
        return self.fp32_backward_warps if dtype == torch.float32 else self.backward_warps


@triton.jit
def load_block_state(
    STATES, b, h, block, num_blocks, offs_k, offs_v, state_mask,
    HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, dtype: tl.constexpr,
):  # fmt: skip
    """The [d_k tile, d_v tile] of block `block`'s stored state ([B, H, N, DK, DV], as the walk writes it)."""
    tile = STATES + ((b * HEADS + h) * num_blocks + block) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    return tl.load(tile, mask=state_mask, other=0.0).to(dtype)


@triton.jit
def _block_states_kernel(
    K,
    V,
    LOG_DECAY,
    STATE_IN,
    STATES,
    FINAL,
    seq_len,
    num_blocks,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ib,
    stride_ih,
    stride_ik,
    stride_iv,
    HEADS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tiles_k = tl.cdiv(DK, BK)
    tiles_v = tl.cdiv(DV, BV)
    pid_v = tl.program_id(0) % tiles_v
    pid_k = (tl.program_id(0) // tiles_v) % tiles_k
    pid_bh = tl.program_id(0) // (tiles_v * tiles_k)
    b, h, offs_k, offs_v, mask_k, mask_v, state_mask = state_tile(pid_bh, pid_k, pid_v, HEADS, DK, DV, BK, BV)
    offs_i = tl.arange(0, BLOCK)
    log_decay = head_log_decay(LOG_DECAY, h, HAS_DECAY)
    state = load_initial_state(
        STATE_IN,
        b,
        h,
        stride_ib,
        stride_ih,
        stride_ik,
        stride_iv,
        offs_k,
        offs_v,
        state_mask,
        HAS_INITIAL,
        BK,
        BV,
    )
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    states_base = STATES + (b * HEADS + h) * num_blocks * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    position = offs_i.to(tl.float32)
    for step in range(num_blocks):
        block = walk_block(step, num_blocks, REVERSE)
        # The state entering this block (in walk order), as the output and gradient kernels read it.
        tl.store(states_base + block * DK * DV, state.to(STATES.dtype.element_ty), mask=state_mask)
        length, rows, row_mask = block_rows(block, seq_len, offs_i, BLOCK)
        k = load_block_rows(k_base, rows, stride_ks, offs_k, row_mask, mask_k)
        v = load_block_rows(v_base, rows, stride_vs, offs_v, row_mask, mask_v)
        state = add_block_to_state(
            state, k, v, log_decay, length, position, row_mask, HAS_DECAY, REVERSE, PRECISION
        )
    final = FINAL + (b * HEADS + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    tl.store(final, state, mask=state_mask)


@triton.jit
def _block_output_kernel(
    Q,
    K,
    V,
    O,
    STATES,
    LOG_DECAY,
    seq_len,
    num_blocks,
    batch_heads,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    HEADS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # d_v tiles fastest, then heads, then blocks: the tiles of one (block, head) share Q/K in L2.
    tiles_v = tl.cdiv(DV, BV)
    pid_v = tl.program_id(0) % tiles_v
    pid_bh = (tl.program_id(0) // tiles_v) % batch_heads
    block = tl.program_id(0) // tiles_v // batch_heads
    b, h, offs_k, offs_v, mask_k, mask_v, state_mask = state_tile(pid_bh, 0, pid_v, HEADS, DK, DV, BK, BV)
    offs_i = tl.arange(0, BLOCK)
    log_decay = head_log_decay(LOG_DECAY, h, HAS_DECAY)
    _, rows, row_mask = block_rows(block, seq_len, offs_i, BLOCK)
    q = load_block_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qs, offs_k, row_mask, mask_k)
    k = load_block_rows(K + b * stride_kb + h * stride_kh, rows, stride_ks, offs_k, row_mask, mask_k)
    v = load_block_rows(V + b * stride_vb + h * stride_vh, rows, stride_vs, offs_v, row_mask, mask_v)
    state = load_block_state(
        STATES, b, h, block, num_blocks, offs_k, offs_v, state_mask, HEADS, DK, DV, k.dtype
    )
    weight = intra_block_weight(log_decay, offs_i, HAS_DECAY, False)  # [i, j]: lam^(i-j), j <= i
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * weight
    out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
    if HAS_DECAY:  # q_i reads the entering state decayed by lam^(i+1)
        q = (q * tl.exp(log_decay * (offs_i.to(tl.float32) + 1.0))[:, None]).to(k.dtype)
    out += tl.dot(q, state, input_precision=PRECISION)
    tl.store(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_v[None, :],
        out.to(O.dtype.element_ty),
        mask=row_mask[:, None] & mask_v[None, :],
    )


@triton.jit
def _block_backward_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    DK_OUT,
    DV_OUT,
    STATES,
    GRAD_STATES,
    LOG_DECAY,
    seq_len,
    num_blocks,
    batch_heads,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_vb,
    stride_vs,
    stride_vh,
    HEADS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Heads fastest: the programs running side by side cover one stretch of the sequence.
    pid_bh = tl.program_id(0) % batch_heads
    block = tl.program_id(0) // batch_heads
    b, h, offs_k, offs_v, mask_k, mask_v, state_mask = state_tile(pid_bh, 0, 0, HEADS, DK, DV, BK, BV)
    offs_i = tl.arange(0, BLOCK)
    log_decay = head_log_decay(LOG_DECAY, h, HAS_DECAY)
    length, rows, row_mask = block_rows(block, seq_len, offs_i, BLOCK)
    qk_mask = row_mask[:, None] & mask_k[None, :]
    v_mask = row_mask[:, None] & mask_v[None, :]
    # q / k (and dq / dk) share the q strides, v / dO (and dv) the v strides: all contiguous [B, S, H, D].
    q_rows = b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_k[None, :]
    v_rows = b * stride_vb + h * stride_vh + rows[:, None] * stride_vs + offs_v[None, :]
    q = tl.load(Q + q_rows, mask=qk_mask, other=0.0)
    k = tl.load(K + q_rows, mask=qk_mask, other=0.0)
    v = tl.load(V + v_rows, mask=v_mask, other=0.0)
    grad_out = tl.load(DO + v_rows, mask=v_mask, other=0.0)
    position = offs_i.to(tl.float32)
    weight = intra_block_weight(log_decay, offs_i, HAS_DECAY, False)  # [i, j]: lam^(i-j), j <= i
    # lam^(c-1-j): how key j's contribution decays until the block's end (where dh_{n+1} applies).
    if HAS_DECAY:
        to_end = tl.exp(log_decay * tl.maximum(length.to(tl.float32) - 1.0 - position, 0.0))
        from_start = tl.exp(log_decay * (position + 1.0))
    else:
        to_end = tl.full([BLOCK], 1.0, tl.float32)
        from_start = tl.full([BLOCK], 1.0, tl.float32)
    grad_state = load_block_state(  # dh_{n+1}
        GRAD_STATES, b, h, block, num_blocks, offs_k, offs_v, state_mask, HEADS, DK, DV, k.dtype
    )

    # dv_j = sum_{i >= j} lam^(i-j) (q_i . k_j) dO_i + lam^(c-1-j) k_j dh_{n+1}
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * weight
    dv = tl.dot(tl.trans(scores.to(grad_out.dtype)), grad_out, input_precision=PRECISION)
    k_to_end = (k * to_end[:, None]).to(k.dtype)
    dv += tl.dot(k_to_end, grad_state, input_precision=PRECISION)
    tl.store(DV_OUT + v_rows, dv.to(DV_OUT.dtype.element_ty), mask=v_mask)

    # dk_j = sum_{i >= j} lam^(i-j) (dO_i . v_j) q_i + lam^(c-1-j) v_j dh_{n+1}^T
    grad_scores = (tl.dot(grad_out, tl.trans(v), input_precision=PRECISION) * weight).to(q.dtype)
    dk = tl.dot(tl.trans(grad_scores), q, input_precision=PRECISION)
    v_to_end = (v * to_end[:, None]).to(v.dtype)
    dk += tl.dot(v_to_end, tl.trans(grad_state), input_precision=PRECISION)
    tl.store(DK_OUT + q_rows, dk.to(DK_OUT.dtype.element_ty), mask=qk_mask)

    # dq_i = sum_{j <= i} lam^(i-j) (dO_i . v_j) k_j + lam^(i+1) dO_i h_n^T
    state = load_block_state(  # h_n
        STATES, b, h, block, num_blocks, offs_k, offs_v, state_mask, HEADS, DK, DV, k.dtype
    )
    dq = tl.dot(grad_scores, k, input_precision=PRECISION)
    grad_out_from_start = (grad_out * from_start[:, None]).to(grad_out.dtype)
    dq += tl.dot(grad_out_from_start, tl.trans(state), input_precision=PRECISION)
    tl.store(DQ + q_rows, dq.to(DQ.dtype.element_ty), mask=qk_mask)


# One side stream per device for the backward's forward walk. A stream taken per call would cycle
# through torch's pool of streams; this one is reused, and the walk's work stays on it.
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _precision(dtype: torch.dtype) -> str | None:
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def _check(block_size: int, *tensors: torch.Tensor) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"Triton block_size must be a power of two >= 16; got {block_size}")
    for tensor in tensors:
        if tensor.stride(-1) != 1:
            raise ValueError("block-parallel linear attention reads rows with a unit stride along head_dim")


def empty_block_states(
    k: torch.Tensor, v: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (states [B, H, N, d_k, d_v] in k's dtype, final [B, H, d_k, d_v] fp32) for a walk
    over k, v: what `block_states` fills."""
    batch, seq, heads, dim_k = k.shape
    num_blocks = triton.cdiv(seq, block_size)
    states = torch.empty(batch, heads, num_blocks, dim_k, v.size(-1), dtype=k.dtype, device=k.device)
    final = torch.empty(batch, heads, dim_k, v.size(-1), dtype=compute_dtype(k.dtype), device=k.device)
    return states, final


def block_states(
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    reverse: bool,
    block_size: int,
    state_tile: int = 64,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entering state of every block [B, H, N, d_k, d_v] in k's dtype, final state [B, H, d_k, d_v] fp32).

    Walking backwards (`reverse`) the blocks' keys weigh lam^(j+1) and "entering" is from the right.
    `out`: the two tensors to fill (from `empty_block_states`), e.g. allocated on another stream.
    """
    batch, seq, heads, dim_k = k.shape
    dim_v = v.size(-1)
    states, final = out if out is not None else empty_block_states(k, v, block_size)
    num_blocks = states.size(2)
    tile_k = min(state_tile, max(16, triton.next_power_of_2(dim_k)))
    tile_v = min(state_tile, max(16, triton.next_power_of_2(dim_v)))
    grid = (batch * heads * triton.cdiv(dim_k, tile_k) * triton.cdiv(dim_v, tile_v),)
    state_in = k if initial_state is None else initial_state
    state_strides = (0, 0, 0, 0) if initial_state is None else initial_state.stride()
    _block_states_kernel[grid](
        k, v, k if log_decay is None else log_decay, state_in, states, final, seq, num_blocks,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *state_strides,
        HEADS=heads, DK=dim_k, DV=dim_v, BLOCK=block_size, BK=tile_k, BV=tile_v,
        HAS_DECAY=log_decay is not None, HAS_INITIAL=initial_state is not None, REVERSE=reverse,
        PRECISION=_precision(k.dtype), num_warps=4,
    )  # fmt: skip
    return states, final


def block_parallel_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    launch: BlockLaunch = BlockLaunch(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, H, d_v] in q's dtype, final state fp32): the forward scan's result, blocks in parallel."""
    _check(block_size, q, k, v)
    log_decay = None if log_decay is None else log_decay.float().contiguous()
    batch, seq, heads, dim_k = k.shape
    dim_v = v.size(-1)
    states, final = block_states(k, v, log_decay, initial_state, False, block_size, launch.state_tile)
    out = torch.empty(batch, seq, heads, dim_v, dtype=q.dtype, device=q.device)
    num_blocks = states.size(2)
    tile_v = min(64, max(16, triton.next_power_of_2(dim_v)))
    grid = (num_blocks * batch * heads * triton.cdiv(dim_v, tile_v),)
    _block_output_kernel[grid](
        q, k, v, out, states, k if log_decay is None else log_decay, seq, num_blocks, batch * heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEADS=heads, DK=dim_k, DV=dim_v, BLOCK=block_size, BK=max(16, triton.next_power_of_2(dim_k)),
        BV=tile_v, HAS_DECAY=log_decay is not None, PRECISION=_precision(k.dtype),
        num_warps=launch.output_warps, **launch.stage_settings(),
    )  # fmt: skip
    return out, final


def block_parallel_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    final_state_grad: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    launch: BlockLaunch = BlockLaunch(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_initial_state) of `block_parallel_forward`, as linear_chunked.linear_attention_backward
    gives them: gradients in the inputs' dtypes, the initial state's in fp32."""
    # The kernel indexes q / k with one set of strides and v / dO with another: contiguous all four
    # (no copy for the projections' [B, S, H, D] views).
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out.to(v.dtype)))
    _check(block_size, q, k, v, grad_out)
    log_decay = None if log_decay is None else log_decay.float().contiguous()
    batch, seq, heads, dim_k = k.shape
    dim_v = v.size(-1)
    # The two walks are independent and each fills only part of the GPU: on CUDA the forward walk runs
    # on a side stream beside the reverse walk. Its output is allocated here, on the compute stream: the
    # caching allocator keeps a block for reuse by the stream it was allocated on, so a tensor made on the
    # side stream would be cached apart (one more copy of the largest tensor here, 1 GiB at 64K tokens).
    states_and_final = empty_block_states(k, v, block_size)
    side = _side_stream(q.device) if q.is_cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        states, _ = block_states(
            k, v, log_decay, initial_state, False, block_size, launch.state_tile, out=states_and_final
        )
    grad_states, d_initial = block_states(
        q, grad_out, log_decay, final_state_grad, True, block_size, launch.state_tile
    )
    if side is not None:  # everything below reads the side walk's states
        torch.cuda.current_stream(q.device).wait_stream(side)
    num_blocks = states.size(2)
    dq = torch.empty(batch, seq, heads, dim_k, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(batch, seq, heads, dim_v, dtype=v.dtype, device=v.device)
    grid = (num_blocks * batch * heads,)
    _block_backward_kernel[grid](
        q, k, v, grad_out, dq, dk, dv, states, grad_states, k if log_decay is None else log_decay,
        seq, num_blocks, batch * heads, q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HEADS=heads, DK=dim_k, DV=dim_v, BLOCK=block_size, BK=max(16, triton.next_power_of_2(dim_k)),
        BV=max(16, triton.next_power_of_2(dim_v)), HAS_DECAY=log_decay is not None,
        PRECISION=_precision(k.dtype), num_warps=launch.backward_warps_for(q.dtype), **launch.stage_settings(),
    )  # fmt: skip
    return dq, dk, dv, d_initial
