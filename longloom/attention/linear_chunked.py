"""Chunked causal linear attention with per-head decay in plain torch: the CPU path and the shared math.

Idea (as in Lightning Attention / GLA "chunk" form): cut the sequence into blocks of `block_size`;
inside a block the causal term is a small masked [c, c] matrix, and everything before the block is
summarised by a d_k x d_v memory state, so the cost is O(S * c * d) instead of O(S^2 * d).

Everything here is one primitive, the *scan*, which the backward and parallel/lasp2.py reuse:

  forward scan  (reverse=False), positions t = 0..S-1, initial state S0, lam = decay[h]:
      out_t = sum_{s <= t} lam^(t-s) (q_t . k_s) v_s  +  lam^(t+1) q_t S0
      final = lam^S S0 + sum_s lam^(S-1-s) k_s^T v_s                      (state after the last token)
  reverse scan  (reverse=True), the same read from the end (S0 enters after the last token):
      out_t = sum_{s >= t} lam^(s-t) (q_t . k_s) v_s  +  lam^(S-1-t) q_t S0
      final = lam^S S0 + sum_s lam^(s+1) k_s^T v_s                        (state before the first token)

The gradients of a forward scan are scans again (see `linear_attention_backward`):
dq = forward scan of (dO, v, k) from S0^T; dk = reverse scan of (v, dO, q) from dSf^T;
dv = reverse scan of (k, q, dO) from dSf, whose final state is the gradient of S0.
The Triton kernels (attention/triton_linear.py) implement the same scan, so both paths share this math.
States are [B, H, d_k, d_v] in fp32 (fp64 for fp64 inputs); tensors are [B, S, H, D].
"""

from __future__ import annotations

from typing import Protocol

import torch

DEFAULT_BLOCK_SIZE = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or fp64 when the inputs are fp64 (the test references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_decay_of(decay: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """log(decay) [H] in `dtype`; None stands for decay 1 (no decay). Powers are exp(n * log), n >= 0."""
    return None if decay is None else torch.log(decay.to(dtype))


def decay_powers(log_decay: torch.Tensor | None, exponents: torch.Tensor) -> torch.Tensor | None:
    """lam[h] ** exponents -> [H, *exponents.shape]; exponents must be >= 0 so nothing overflows."""
    if log_decay is None:
        return None
    return torch.exp(log_decay.view(-1, *([1] * exponents.dim())) * exponents.to(log_decay.dtype))


class Scan(Protocol):
    def __call__(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor,
        log_decay: torch.Tensor | None,
        initial_state: torch.Tensor | None = None,
        reverse: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor]: ...


def sequence_state(
    k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None, reverse: bool = False
) -> torch.Tensor:
    """The final state of a scan from a zero state: sum_s w_s k_s^T v_s -> [B, H, d_k, d_v].

    w_s = lam^(S-1-s) (forward) or lam^(s+1) (reverse). One matmul over the sequence: this is the
    per-rank memory state that LASP-2 all-gathers (M = K^T V, or dM = Q^T dO in the backward).
    """
    dtype = compute_dtype(k.dtype)
    k, v = k.to(dtype), v.to(dtype)
    positions = torch.arange(k.size(1), device=k.device)
    weights = decay_powers(log_decay, positions + 1 if reverse else k.size(1) - 1 - positions)
    if weights is not None:
        k = k * weights.t().unsqueeze(-1)  # [S, H, 1]
    return torch.einsum("bshk,bshv->bhkv", k, v)


def chain_states(
    states: torch.Tensor,
    log_decay: torch.Tensor | None,
    length: int,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chains zero-state scans of consecutive pieces of `length` tokens into one scan's states.

    states: [N, B, H, d_k, d_v], piece n's own final state, pieces in sequence order. Returns
    (incoming [N, B, H, d_k, d_v]: the state entering each piece, final: the state after the last
    piece walked), walking from the first piece (from the last when `reverse`) with
    incoming[next] = lam^length * incoming[previous] + states[previous], starting at initial_state or 0.
    """
    piece_decay = decay_powers(log_decay, torch.tensor(length, device=states.device))
    running = torch.zeros_like(states[0]) if initial_state is None else initial_state.to(states.dtype)
    incoming = torch.empty_like(states)
    for n in reversed(range(states.size(0))) if reverse else range(states.size(0)):
        incoming[n] = running
        running = states[n] + (running if piece_decay is None else running * piece_decay.view(-1, 1, 1))
    return incoming, running


def _scan_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    state: torch.Tensor,
    reverse: bool,
    c: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan over S // c full blocks of c tokens (S == blocks * c), all blocks' local terms at once."""
    batch, seq, heads, _ = q.shape
    blocks = seq // c

    def by_block(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, D] -> [B, H, N, c, D]
        return x.view(batch, blocks, c, heads, x.size(-1)).permute(0, 3, 1, 2, 4)

    qb, kb, vb = by_block(q), by_block(k), by_block(v)
    i = torch.arange(c, device=q.device)
    distance = (i[None, :] - i[:, None]) if reverse else (i[:, None] - i[None, :])  # [c (out), c (key)]
    causal = distance >= 0
    mask = decay_powers(log_decay, distance.clamp(min=0))  # [H, c, c]
    mask = causal.to(q.dtype) if mask is None else torch.where(causal, mask, torch.zeros_like(mask))
    mask = mask if mask.dim() == 2 else mask[None, :, None]  # broadcast over [B, H, N]
    scores = torch.einsum("bhnik,bhnjk->bhnij", qb, kb) * mask
    out = torch.einsum("bhnij,bhnjv->bhniv", scores, vb)

    # Weights of the state terms: distance of each query to where the incoming state enters, and of
    # each key to where the outgoing state leaves (the block's end, or its start when reversed).
    query_weight = decay_powers(log_decay, c - 1 - i if reverse else i + 1)  # [H, c]
    key_weight = decay_powers(log_decay, i + 1 if reverse else c - 1 - i)
    if key_weight is not None:
        kb = kb * key_weight[None, :, None, :, None]
        qb = qb * query_weight[None, :, None, :, None]
    block_states = torch.einsum("bhnjk,bhnjv->nbhkv", kb, vb)  # [N, B, H, d_k, d_v]
    incoming, state = chain_states(block_states, log_decay, c, state, reverse)
    out = out + torch.einsum("bhnik,nbhkv->bhniv", qb, incoming)
    return out.permute(0, 2, 3, 1, 4).reshape(batch, seq, heads, v.size(-1)), state


def chunked_linear_scan(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(out [B, S, H, d_v] in the compute dtype or None when q is None, final state [B, H, d_k, d_v]).

    See the module docstring for the exact formula. A sequence that is not a multiple of
    `block_size` is scanned as its full blocks plus one shorter block, chained through the state.
    """
    dtype = compute_dtype(k.dtype)
    batch, seq, heads, dim_k = k.shape
    dim_v = v.size(-1)
    log_decay = None if log_decay is None else log_decay.to(dtype)
    if q is None:
        state = sequence_state(k, v, log_decay, reverse)
        if initial_state is not None:
            total_decay = decay_powers(log_decay, torch.tensor(seq, device=k.device))
            carried = initial_state.to(dtype)
            state = state + (carried if total_decay is None else carried * total_decay.view(-1, 1, 1))
        return None, state
    state = (
        torch.zeros(batch, heads, dim_k, dim_v, dtype=dtype, device=k.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    full = seq - seq % block_size
    pieces = [(0, full, block_size), (full, seq, seq - full)]
    pieces = [piece for piece in pieces if piece[1] > piece[0]]
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(pieces)
    # A reverse scan enters from the end, so the trailing piece goes first.
    for index in reversed(range(len(pieces))) if reverse else range(len(pieces)):
        start, stop, block = pieces[index]
        outputs[index], state = _scan_blocks(
            q[:, start:stop].to(dtype),
            k[:, start:stop].to(dtype),
            v[:, start:stop].to(dtype),
            log_decay,
            state,
            reverse,
            block,
        )
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], state


def transpose_state(state: torch.Tensor | None) -> torch.Tensor | None:
    """[B, H, d_k, d_v] -> [B, H, d_v, d_k]: the state of the scan whose keys and values swap roles."""
    return None if state is None else state.transpose(-1, -2)


def linear_attention_backward(
    scan: Scan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    final_state_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a forward scan: (dq, dk, dv, d_initial_state), via three scans of `scan`'s kind.

    dq_t = sum_{s<=t} lam^(t-s) (dO_t . v_s) k_s + lam^(t+1) dO_t S0^T          forward scan (dO, v, k)
    dk_s = sum_{t>=s} lam^(t-s) (v_s . dO_t) q_t + lam^(S-1-s) v_s dSf^T        reverse scan (v, dO, q)
    dv_s = sum_{t>=s} lam^(t-s) (k_s . q_t) dO_t + lam^(S-1-s) k_s dSf          reverse scan (k, q, dO)
    and dS0 = lam^S dSf + sum_t lam^(t+1) q_t^T dO_t, the final state of the dv scan.
    """
    dq, _ = scan(grad_out, v, k, log_decay, transpose_state(initial_state), reverse=False)
    dk, _ = scan(v, grad_out, q, log_decay, transpose_state(final_state_grad), reverse=True)
    dv, d_initial_state = scan(k, q, grad_out, log_decay, final_state_grad, reverse=True)
    return dq, dk, dv, d_initial_state  # type: ignore[return-value]


def chunked_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention on one device: (out [B, S, H, d_v] in q's dtype, final state fp32).

    Not differentiable by autograd; parallel/lasp2.py wraps it (with group=None for one device).
    """
    out, state = chunked_linear_scan(
        q, k, v, log_decay_of(decay, compute_dtype(q.dtype)), initial_state, block_size=block_size
    )
    return out.to(q.dtype), state  # type: ignore[union-attr]


def document_segments(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[N, L] non-decreasing ids -> per row, the (start, stop) of each document's run, in order."""
    host = document_ids.cpu()
    segments = []
    for row in host:
        starts = [0] + ((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()
        segments.append(list(zip(starts, starts[1:] + [row.numel()])))
    return segments


def document_scan(
    scan: Scan,
    segments: list[list[tuple[int, int]]],
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`scan` with the state (and its decay) restarting at every document start (packed samples).

    Row n of q/k/v [N, L, H, D] is cut into its `segments[n]` (document_segments); each is scanned on
    its own: the initial state enters only the first segment walked (the first document, or the last
    when `reverse`), the others start from zero, and the final state is that of the last segment walked
    (only its document carries on past the row). The backward of this scan is the same construction,
    so `linear_attention_backward(partial(document_scan, scan, segments), ...)` is exact too.
    """
    outputs, finals = [], []
    for row, row_segments in enumerate(segments):
        entering = None if initial_state is None else initial_state[row : row + 1]
        pieces: list[torch.Tensor | None] = [None] * len(row_segments)
        order = reversed(range(len(row_segments))) if reverse else range(len(row_segments))
        for index in order:
            piece, rows = slice(*row_segments[index]), slice(row, row + 1)
            pieces[index], final = scan(
                None if q is None else q[rows, piece],
                k[rows, piece],
                v[rows, piece],
                log_decay,
                entering,
                reverse,
            )
            entering = None  # the next document starts from nothing
        finals.append(final)
        if q is not None:
            outputs.append(torch.cat(pieces, dim=1))  # type: ignore[arg-type]
    return (None if q is None else torch.cat(outputs)), torch.cat(finals)


def chain_document_states(
    states: torch.Tensor,
    log_decay: torch.Tensor | None,
    length: int,
    first_ids: torch.Tensor,
    last_ids: torch.Tensor,
    reverse: bool = False,
) -> torch.Tensor:
    """`chain_states` (from a zero state) for pieces that hold packed documents; returns incoming.

    states: [N, B, H, d_k, d_v] of `document_scan`s (only a piece's last document, or first when
    `reverse`); first_ids / last_ids [N, B]: the document ids at each piece's ends. The running state
    crosses from one piece into the next only where a document continues across their edge, and a
    piece passes on the state it received only if it is one document throughout.
    """
    piece_decay = decay_powers(log_decay, torch.tensor(length, device=states.device))
    links = (last_ids[:-1] == first_ids[1:]).to(states.dtype)  # [N - 1, B]: edge n | n + 1 continues
    whole = (first_ids == last_ids).to(states.dtype)  # [N, B]
    running = torch.zeros_like(states[0])
    incoming = torch.empty_like(states)
    for n in reversed(range(states.size(0))) if reverse else range(states.size(0)):
        edge = (n if n < states.size(0) - 1 else None) if reverse else (n - 1 if n > 0 else None)
        carried = torch.zeros_like(running) if edge is None else running * links[edge].view(-1, 1, 1, 1)
        incoming[n] = carried
        if piece_decay is not None:
            carried = carried * piece_decay.view(-1, 1, 1)
        running = states[n] + carried * whole[n].view(-1, 1, 1, 1)
    return incoming
