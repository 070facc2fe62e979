"""Triton chaining of piece states: `linear_chunked.chain_states` as one kernel instead of a torch loop.

Idea: when attention/triton_linear.py cuts a sequence into G pieces (up to one per block, the
structure of flash-linear-attention's chunk kernels), each piece's zero-state scan leaves its own
state, and the state entering piece n is
    incoming[n] = lam^length * incoming[n - 1] + states[n - 1],   incoming[first] = initial or 0
(walked from the last piece when `reverse`). A torch loop over G costs G tiny launches of d_k x d_v
adds (thousands at 64K tokens with 64-token pieces); here one program per (batch, head, d_k tile,
d_v tile) keeps the running state in registers and walks the G pieces, reading each piece state
once and writing each incoming state once, so the chain costs one pass over the states' memory.

Same contract and values as chain_states: states [N, B, H, d_k, d_v] in any strides (a transposed
view of the scan's [B * N, H, d_k, d_v] output is read in place), incoming in the same layout as
states, final [B, H, d_k, d_v] contiguous, all in the states' dtype (fp32, fp64 for fp64 tests).
Runs on CPU under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longloom.attention.linear_chunked import decay_powers

# 32 x 32 tiles: at d_k = d_v = 128 a (batch, head) gives 16 programs, so B * H = 32 fills an H200's
# 132 SMs ~4 times; each step moves 4 KiB in and 4 KiB out, small enough to stay in registers.
CHAIN_TILE = 32


@triton.jit
def _chain_states_kernel(
    STATES,
    INCOMING,
    FINAL,
    INITIAL,
    PIECE_DECAY,
    pieces,
    stride_sn,
    stride_sb,
    stride_sh,
    stride_sk,
    stride_sv,
    stride_in,
    stride_ib,
    stride_ih,
    stride_ik,
    stride_iv,
    stride_0b,
    stride_0h,
    stride_0k,
    stride_0v,
    HEADS: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    REVERSE: tl.constexpr,
    STORE_INCOMING: tl.constexpr,
):
    pid_kv = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tiles_v = tl.cdiv(DV, BV)
    b = (pid_bh // HEADS).to(tl.int64)
    h = (pid_bh % HEADS).to(tl.int64)
    offs_k = (pid_kv // tiles_v) * BK + tl.arange(0, BK)
    offs_v = (pid_kv % tiles_v) * BV + tl.arange(0, BV)
    tile_mask = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
    acc_dtype = INCOMING.dtype.element_ty

    running = tl.zeros([BK, BV], dtype=acc_dtype)
    if HAS_INITIAL:
        initial = INITIAL + b * stride_0b + h * stride_0h
        initial += offs_k[:, None] * stride_0k + offs_v[None, :] * stride_0v
        running = tl.load(initial, mask=tile_mask, other=0.0).to(acc_dtype)
    piece_decay = 1.0
    if HAS_DECAY:
        piece_decay = tl.load(PIECE_DECAY + h).to(acc_dtype)

    states = STATES + b * stride_sb + h * stride_sh
    states += offs_k[:, None] * stride_sk + offs_v[None, :] * stride_sv
    incoming = INCOMING + b * stride_ib + h * stride_ih
    incoming += offs_k[:, None] * stride_ik + offs_v[None, :] * stride_iv
    # Pointers step piece by piece (64-bit pointer arithmetic: no int32 overflow of piece * stride).
    if REVERSE:
        last = tl.cast(pieces - 1, tl.int64)  # pieces == 1 arrives as a constexpr
        states += last * stride_sn
        incoming += last * stride_in
    for _ in range(pieces):
        local = tl.load(states, mask=tile_mask, other=0.0).to(acc_dtype)
        if STORE_INCOMING:
            tl.store(incoming, running, mask=tile_mask)
        # The same two operations, in the same order, as chain_states: states[n] + running * lam^length.
        if HAS_DECAY:
            running = running * piece_decay
        running = local + running
        if REVERSE:
            states -= stride_sn
            incoming -= stride_in
        else:
            states += stride_sn
            incoming += stride_in

    final = FINAL + (b * HEADS + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    tl.store(final, running, mask=tile_mask)


def triton_chain_states(
    states: torch.Tensor,
    log_decay: torch.Tensor | None,
    length: int,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
    with_incoming: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Same arguments, results and values as linear_chunked.chain_states, in one Triton launch.

    states: [N, B, H, d_k, d_v] (any strides; fp32, or fp64). Returns (incoming, laid out like
    `states`, and final [B, H, d_k, d_v]). `log_decay` [H] or None; pieces are `length` tokens.
    `with_incoming=False` (a scan without outputs needs only the final state): incoming is None and
    never written, which saves a write as large as the states.
    """
    if states.dim() != 5:
        raise ValueError(f"states must be [pieces, batch, heads, d_k, d_v]; got {tuple(states.shape)}")
    pieces, batch, heads, dim_k, dim_v = states.shape
    # preserve_format: a transposed view stays transposed. Without incoming, a never-written stand-in.
    incoming = torch.empty_like(states) if with_incoming else states
    final = torch.empty(batch, heads, dim_k, dim_v, dtype=states.dtype, device=states.device)
    # lam^length per head, computed exactly as chain_states does (in log_decay's dtype, then the states').
    piece_decay = decay_powers(log_decay, torch.tensor(length, device=states.device))
    piece_decay = None if piece_decay is None else piece_decay.to(states.dtype).contiguous()
    initial = None if initial_state is None else initial_state.to(states.dtype)
    block_k = max(16, min(CHAIN_TILE, triton.next_power_of_2(dim_k)))
    block_v = max(16, min(CHAIN_TILE, triton.next_power_of_2(dim_v)))
    grid = (triton.cdiv(dim_k, block_k) * triton.cdiv(dim_v, block_v), batch * heads)
    _chain_states_kernel[grid](
        states,
        incoming,
        final,
        states if initial is None else initial,  # never read without HAS_INITIAL
        states if piece_decay is None else piece_decay,
        pieces,
        *states.stride(),
        *incoming.stride(),
        *((0, 0, 0, 0) if initial is None else initial.stride()),
        HEADS=heads,
        DK=dim_k,
        DV=dim_v,
        BK=block_k,
        BV=block_v,
        HAS_DECAY=piece_decay is not None,
        HAS_INITIAL=initial is not None,
        REVERSE=reverse,
        STORE_INCOMING=with_incoming,
        num_warps=2,
    )
    return (incoming if with_incoming else None), final
