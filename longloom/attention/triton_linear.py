"""Triton chunked causal linear attention with per-head decay: the scan of attention/linear_chunked.py.

Idea (the "fused chunk" form of Lightning Attention / GLA): one program owns one (batch, head,
d_v tile) and walks the sequence block by block with the d_k x d_v state in registers (fp32). Per
block of c tokens it computes the intra-block causal term (q k^T masked by lam^(i-j), times v), adds
Q times the incoming state (scaled by lam^(i+1)), and accumulates the state (lam^c S + K^T V with
keys scaled by lam^(c-1-j)). The reverse flag walks from the end with the mirrored weights, which
makes dq, dk, dv scans too (linear_chunked.linear_attention_backward), so one kernel serves forward
and backward. Without outputs the same kernel only accumulates states (LASP-2's M and dM).

Long local sequences give few programs (B * H * d_v / BV); `segments` cuts the sequence into pieces
that run in parallel from zero states, chains their states (attention/triton_linear_chain.py: one
sequential pass over the piece states), and runs again from the chained states: the LASP-2 idea
applied inside one GPU. `segments=None` (the default) takes `auto_segments`: just enough pieces for
~2 programs per SM, each still walking thousands of tokens. `segments="fine"` takes `fine_segments`:
pieces down to one or two blocks (flash-linear-attention's chunk structure: a light sequential pass
over chunk states, then tens of thousands of independent output programs); opt-in until measured.

Dots take the inputs' dtype (bf16 on GPU) with fp32 accumulation; fp32 inputs use exact fp32 dots.
Runs on CPU under TRITON_INTERPRET=1 (the tests); tensors are [B, S, H, D], states [B, H, d_k, d_v].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longloom.attention.linear_chunked import DEFAULT_BLOCK_SIZE, compute_dtype
from longloom.attention.triton_linear_chain import triton_chain_states


@triton.jit
def head_log_decay(LOG_DECAY, h, HAS_DECAY: tl.constexpr):
    """log(lam) of head h (fp32), 0 without decay."""
    log_decay = 0.0
    if HAS_DECAY:
        log_decay = tl.load(LOG_DECAY + h).to(tl.float32)
    return log_decay


@triton.jit
def block_rows(block, seq_len, offs_i, BLOCK: tl.constexpr):
    """(tokens in the block, their sequence rows as int64, which of the BLOCK rows exist)."""
    start = block * BLOCK
    length = tl.minimum(seq_len - start, BLOCK)
    return length, (start + offs_i).to(tl.int64), offs_i < length


@triton.jit
def state_tile(
    pid_bh, pid_k, pid_v, HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr
):  # fmt: skip
    """(b, h, offs_k, offs_v, mask_k, mask_v, state_mask) of a program's [d_k tile pid_k, d_v tile pid_v] of
    the state of (batch row, head) pid_bh: b and h as int64 (pointer arithmetic), the tile's offsets, which
    of them are in range, and the in-range [BK, BV] entries."""
    b = (pid_bh // HEADS).to(tl.int64)
    h = (pid_bh % HEADS).to(tl.int64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    return b, h, offs_k, offs_v, mask_k, mask_v, mask_k[:, None] & mask_v[None, :]


@triton.jit
def walk_block(step, num_blocks, REVERSE: tl.constexpr):
    """The block a walk visits at `step`: first to last, or last to first when REVERSE."""
    block = step
    if REVERSE:
        block = num_blocks - 1 - step
    return block


@triton.jit
def load_initial_state(
    STATE_IN, b, h, stride_ib, stride_ih, stride_ik, stride_iv, offs_k, offs_v, state_mask,
    HAS_INITIAL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """[BK, BV] fp32: the (b, h) tile of the state a walk starts from; zeros without one."""
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL:
        tile = (
            STATE_IN
            + b * stride_ib
            + h * stride_ih
            + offs_k[:, None] * stride_ik
            + offs_v[None, :] * stride_iv
        )
        state = tl.load(tile, mask=state_mask, other=0.0).to(tl.float32)
    return state


@triton.jit
def intra_block_weight(log_decay, offs_i, HAS_DECAY: tl.constexpr, REVERSE: tl.constexpr):
    """[BLOCK, BLOCK]: lam^|i-j| where query row i reads key column j (j <= i; j >= i reversed), else 0."""
    if REVERSE:
        distance = offs_i[None, :] - offs_i[:, None]
    else:
        distance = offs_i[:, None] - offs_i[None, :]
    causal = distance >= 0
    # One return: the constexpr branch only picks the weight (Triton compiles the taken branch alone).
    weight = tl.where(causal, 1.0, 0.0)
    if HAS_DECAY:
        weight = tl.where(causal, tl.exp(log_decay * tl.maximum(distance, 0).to(tl.float32)), 0.0)
    return weight


@triton.jit
def load_block_rows(base, rows, stride_s, offs_d, row_mask, mask_d):
    """[BLOCK, D tile] of one (batch, head): rows `rows` (masked) of a [B, S, H, D] tensor at `base`."""
    return tl.load(
        base + rows[:, None] * stride_s + offs_d[None, :], mask=row_mask[:, None] & mask_d[None, :], other=0.0
    )


@triton.jit
def add_block_to_state(
    state,
    k,
    v,
    log_decay,
    length,
    position,
    row_mask,
    HAS_DECAY: tl.constexpr,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """lam^length S + sum_j w_j k_j^T v_j, w_j = lam^(length-1-j) (lam^(j+1) walking backwards)."""
    if HAS_DECAY:
        length_f = length.to(tl.float32)
        if REVERSE:
            key_weight = tl.exp(log_decay * (position + 1.0))
        else:
            key_weight = tl.exp(log_decay * tl.maximum(length_f - 1.0 - position, 0.0))
        k = (k * tl.where(row_mask, key_weight, 0.0)[:, None]).to(v.dtype)
        state = state * tl.exp(log_decay * length_f)
    return state + tl.dot(tl.trans(k), v, input_precision=PRECISION)


@triton.jit
def _linear_scan_kernel(
    Q,
    K,
    V,
    O,
    STATE_IN,
    STATE_OUT,
    LOG_DECAY,
    seq_len,
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
    STORE_OUTPUT: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One flat grid axis (CUDA caps axis 1 at 65535; fine segmentation gives B * G * H beyond that),
    # d_v tiles fastest so the tiles of one (batch, head) run side by side and share Q/K in L2.
    tiles_v = tl.cdiv(DV, BV)
    pid_v = tl.program_id(0) % tiles_v
    pid_bh = tl.program_id(0) // tiles_v
    b, h, offs_k, offs_v, mask_k, mask_v, state_mask = state_tile(pid_bh, 0, pid_v, HEADS, DK, DV, BK, BV)
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

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    intra_weight = intra_block_weight(log_decay, offs_i, HAS_DECAY, REVERSE)
    position = offs_i.to(tl.float32)

    num_blocks = tl.cdiv(seq_len, BLOCK)
    for step in range(num_blocks):
        block = walk_block(step, num_blocks, REVERSE)
        length, rows, row_mask = block_rows(block, seq_len, offs_i, BLOCK)
        k = load_block_rows(k_base, rows, stride_ks, offs_k, row_mask, mask_k)
        v = load_block_rows(v_base, rows, stride_vs, offs_v, row_mask, mask_v)
        length_f = length.to(tl.float32)
        if STORE_OUTPUT:
            q = load_block_rows(q_base, rows, stride_qs, offs_k, row_mask, mask_k)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra_weight
            out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
            # Q times the incoming state: lam^(i+1) from where the state entered (lam^(c-1-i) reversed).
            if HAS_DECAY:
                if REVERSE:
                    query_weight = tl.exp(log_decay * (length_f - 1.0 - position))
                else:
                    query_weight = tl.exp(log_decay * (position + 1.0))
                q = (q * query_weight[:, None]).to(k.dtype)
            out += tl.dot(q, state.to(k.dtype), input_precision=PRECISION)
            tl.store(
                o_base + rows[:, None] * stride_os + offs_v[None, :],
                out.to(O.dtype.element_ty),
                mask=row_mask[:, None] & mask_v[None, :],
            )
        state = add_block_to_state(
            state, k, v, log_decay, length, position, row_mask, HAS_DECAY, REVERSE, PRECISION
        )

    if STORE_FINAL:
        state_out = STATE_OUT + (b * HEADS + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        tl.store(state_out, state, mask=state_mask)


def _launch(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    reverse: bool,
    block_size: int,
    store_final: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    batch, seq, heads, dim_k = k.shape
    dim_v = v.size(-1)
    state_dtype = compute_dtype(k.dtype)
    out = None if q is None else torch.empty(batch, seq, heads, dim_v, dtype=q.dtype, device=q.device)
    final = (
        torch.empty(batch, heads, dim_k, dim_v, dtype=state_dtype, device=k.device) if store_final else None
    )
    block_v = max(16, min(64, triton.next_power_of_2(dim_v)))
    dummy = k  # never read or written when its flag is off
    state_in = dummy if initial_state is None else initial_state
    state_strides = (0, 0, 0, 0) if initial_state is None else initial_state.stride()
    q_ = dummy if q is None else q
    o_ = dummy if out is None else out
    grid = (triton.cdiv(dim_v, block_v) * batch * heads,)
    _linear_scan_kernel[grid](
        q_,
        k,
        v,
        o_,
        state_in,
        dummy if final is None else final,
        dummy if log_decay is None else log_decay,
        seq,
        q_.stride(0),
        q_.stride(1),
        q_.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o_.stride(0),
        o_.stride(1),
        o_.stride(2),
        *state_strides,
        HEADS=heads,
        DK=dim_k,
        DV=dim_v,
        BLOCK=block_size,
        BK=max(16, triton.next_power_of_2(dim_k)),
        BV=block_v,
        HAS_DECAY=log_decay is not None,
        HAS_INITIAL=initial_state is not None,
        STORE_OUTPUT=q is not None,
        STORE_FINAL=store_final,
        REVERSE=reverse,
        PRECISION="ieee" if k.dtype in (torch.float32, torch.float64) else None,
        num_warps=4,
    )
    return out, final


def auto_segments(batch: int, seq: int, heads: int, dim_v: int, device: torch.device) -> int:
    """Pieces to cut each sequence into so that the GPU has ~2 programs per SM; 1 on CPU."""
    if device.type != "cuda":
        return 1
    programs = batch * heads * triton.cdiv(dim_v, max(16, min(64, triton.next_power_of_2(dim_v))))
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    segments = 1
    while programs * segments * 2 <= target and seq % (segments * 2) == 0 and seq // (segments * 2) >= 2048:
        segments *= 2
    return segments


def fine_segments(seq: int, dim_k: int, dim_v: int, itemsize: int, block_size: int) -> int:
    """The finest segmentation whose piece states fit the memory rule: seq / piece tokens, or 1.

    The piece length is the smallest multiple of `block_size` that divides `seq` and whose fp32
    piece states (d_k x d_v per piece and head) take no more memory than the K and V they summarise
    (piece x (d_k + d_v) x itemsize per head): piece >= 4 d_k d_v / ((d_k + d_v) itemsize). The
    chain then holds two such tensors (piece states, incoming states) for a moment, i.e. at most 2x
    the bytes of K and V: at 64K tokens, H = 32, d = 128, bf16 that is 128-token pieces (512 of
    them, 1 GiB of states each), and 64-token pieces (one per block) for fp32 or d = 64. This rule
    scales with the sequence and the head size, unlike a fixed byte cap; at d <= 128 it leaves each
    output program 1 or 2 blocks to walk, i.e. 32K output programs at 64K tokens, H = 32 (fla's
    structure). No multiple of `block_size` below `seq` fits: 1 (one walk).
    The price is state traffic: each scan writes, reads, writes and reads again the fp32 states
    (piece states, then incoming), ~4 GiB per scan at that size beside ~2 GiB of Q, K, V, O, so a
    coarser count (an int `segments`) may win; bench/linear.py --segments measures both.
    """
    state_bytes = 4 * dim_k * dim_v
    piece = block_size
    while piece * (dim_k + dim_v) * itemsize < state_bytes or seq % piece:
        piece += block_size
        if piece >= seq:
            return 1
    return seq // piece


def triton_linear_scan(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    segments: int | str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Same contract as linear_chunked.chunked_linear_scan; out in q's dtype, final state fp32.

    `segments`: pieces to cut each sequence into, an int that divides the sequence length; None:
    `auto_segments` (few long pieces, 1 on CPU); "fine": `fine_segments` (pieces of one or two blocks).
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"Triton block_size must be a power of two >= 16; got {block_size}")
    dtype = k.dtype
    q, v = (None if q is None else q.to(dtype)), v.to(dtype)
    # Kernels read rows with a unit stride along head_dim; projections already give that.
    q, k, v = (None if x is None else (x if x.stride(-1) == 1 else x.contiguous()) for x in (q, k, v))
    log_decay = None if log_decay is None else log_decay.float().contiguous()
    batch, seq, heads, _ = k.shape
    if segments is None:
        segments = auto_segments(batch, seq, heads, v.size(-1), k.device)
    elif segments == "fine":
        segments = fine_segments(seq, k.size(-1), v.size(-1), k.element_size(), block_size)
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be a positive int, None or 'fine'; got {segments!r}")
    if seq % segments:
        raise ValueError(f"segments {segments} must divide the sequence length {seq}")
    if segments == 1:
        out, final = _launch(q, k, v, log_decay, initial_state, reverse, block_size, store_final=True)
        return out, final  # type: ignore[return-value]

    def pieces(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, D] -> [B * G, S / G, H, D], a view
        return x.reshape(batch * segments, seq // segments, *x.shape[2:])

    _, piece_states = _launch(None, pieces(k), pieces(v), log_decay, None, reverse, block_size, True)
    piece_states = piece_states.view(batch, segments, *piece_states.shape[1:]).transpose(0, 1)  # type: ignore[union-attr]
    incoming, final = triton_chain_states(
        piece_states, log_decay, seq // segments, initial_state, reverse, with_incoming=q is not None
    )
    del piece_states  # at fine segmentation as large as K and V: free it before the output launch
    if incoming is None:
        return None, final
    # incoming is laid out like the piece states ([B, G, ...] in memory), so this is a view.
    incoming = incoming.transpose(0, 1).reshape(batch * segments, *incoming.shape[2:])
    out, _ = _launch(pieces(q), pieces(k), pieces(v), log_decay, incoming, reverse, block_size, False)
    return out.view(batch, seq, heads, -1), final  # type: ignore[union-attr]
