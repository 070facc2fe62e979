"""Packed-document blocks through aten's fused ragged (varlen) kernels, given a block's segment plan.

attention/varlen_plan.py cuts a block into ragged segments (one per document) and dense groups; here
they run: the ragged kernel over the THD layout [B * S, H, D], the dense fused kernel (cuDNN) on the
plan's rectangle and dense groups (a group of equal-length documents as one batch [count, length, H,
D]), and the rows without a partner are overwritten afterwards (out 0, lse -inf, zero gradients)
rather than trusting each kernel's empty-segment convention.

`RaggedKernel` is the one thing that differs between aten's flash varlen kernel and the plain-torch
emulation the CPU tests run through the same plumbing; a GPU kernel is used only after a one-time probe
against that emulation (attention/blocks.py). Flash varlen gives empty query segments lse +inf (cuDNN
ragged gave 0), hence the overwrite above.

Shapes: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; out like q; lse [B, Hq, Sq] fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longloom.attention.linear_chunked import compute_dtype
from longloom.attention.merge import merge_attention_partials
from longloom.attention.varlen_plan import (
    DenseGroup,
    SegmentPlan,
    dense_grid_floor,
    dense_run_length,
    plan_segments,
)


@dataclass(frozen=True)
class RaggedKernel:
    """One ragged attention kernel over the THD layout q [Tq, Hq, D], k/v [Tk, Hk, D], lse [Hq, Tq].

    forward(q, k, v, plan, scale) -> (out [Tq, Hq, D], lse [Hq, Tq] fp32);
    backward(dout, q, k, v, out, lse, plan, scale) -> (dq, dk, dv), dk/dv with k's heads.
    `grouped_kv`: whether it takes K/V with fewer heads than Q (else they are expanded here).
    """

    name: str
    forward: Callable
    backward: Callable
    grouped_kv: bool


def _segment_pairs(plan: SegmentPlan):
    cu_q, cu_k = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        if cu_q[i + 1] > cu_q[i] and cu_k[i + 1] > cu_k[i]:
            yield slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])


def _emulated_forward(q, k, v, plan, scale):
    """Plain torch math per segment (the CPU stand-in for the GPU kernels); empty rows left as garbage."""
    group = q.size(1) // k.size(1)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(
        (q.size(1), q.size(0)),
        float("nan"),
        dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
        device=q.device,
    )
    for q_rows, k_rows in _segment_pairs(plan):
        scores = torch.einsum("qhd,khd->hqk", q[q_rows], k[k_rows].repeat_interleave(group, 1)) * scale
        if plan.causal:
            scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
        segment_lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - segment_lse.unsqueeze(-1))
        out[q_rows] = torch.einsum("hqk,khd->qhd", probs, v[k_rows].repeat_interleave(group, 1)).to(q.dtype)
        lse[:, q_rows] = segment_lse.to(lse.dtype)
    return out, lse


def _emulated_backward(dout, q, k, v, out, lse, plan, scale):
    group = q.size(1) // k.size(1)
    dq, dk, dv = (
        torch.full_like(q, float("nan")),
        torch.full_like(k, float("nan")),
        torch.full_like(v, float("nan")),
    )
    for q_rows, k_rows in _segment_pairs(plan):
        k_full, v_full = k[k_rows].repeat_interleave(group, 1), v[k_rows].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[q_rows], k_full) * scale
        if plan.causal:
            scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.exp(scores - lse[:, q_rows].to(scores.dtype).unsqueeze(-1))
        dprobs = torch.einsum("qhd,khd->hqk", dout[q_rows], v_full)
        delta = (dout[q_rows] * out[q_rows]).sum(-1).transpose(0, 1).unsqueeze(-1)
        dscores = probs * (dprobs - delta) * scale
        dq[q_rows] = torch.einsum("hqk,khd->qhd", dscores, k_full)
        dk_full = torch.einsum("hqk,qhd->khd", dscores, q[q_rows])
        dv_full = torch.einsum("hqk,qhd->khd", probs, dout[q_rows])
        dk[k_rows] = dk_full.unflatten(1, (k.size(1), group)).sum(2)
        dv[k_rows] = dv_full.unflatten(1, (k.size(1), group)).sum(2)
    return dq, dk, dv


EMULATED = RaggedKernel("emulated", _emulated_forward, _emulated_backward, grouped_kv=True)


def _undefined_rng(device: torch.device) -> torch.Tensor:
    # No dropout: the philox state is an unused placeholder (as in attention/blocks.py's dense path).
    return torch.zeros((), dtype=torch.int64, device=device)


def _flash_forward(q, k, v, plan, scale):
    result = torch.ops.aten._flash_attention_forward(
        q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_q, plan.max_k, 0.0, plan.causal, False,
        scale=scale,
    )  # fmt: skip
    return result[0], result[1].reshape(q.size(1), q.size(0)).float()  # varlen lse is [Hq, Tq]


def _flash_backward(dout, q, k, v, out, lse, plan, scale):
    zero = _undefined_rng(q.device)
    return torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_q, plan.max_k, 0.0,
        plan.causal, zero, zero, scale=scale,
    )  # fmt: skip


FLASH_VARLEN = RaggedKernel("flash-varlen", _flash_forward, _flash_backward, grouped_kv=True)
# Why not cuDNN's ragged kernel (`aten._cudnn_attention_forward` with cu_seqlens): on torch 2.11 / H200
# it passed a small probe but hit an illegal memory access (which kills the CUDA context, so no probe
# or fallback can catch it) at 128K tokens in 8K or 128K segments, with and without GQA, and ran at
# 67 TFLOP/s in 2K segments; torch 2.13's own varlen_attn keeps it switched off. Flash varlen ran
# fwd+bwd at 331 / 316 / 263 TFLOP/s in 128K / 8K / 2K causal segments (32/8 heads, D 128).
GPU_KERNELS = (FLASH_VARLEN,)

DenseForward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]
]
DenseBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _expand(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=1)


def _batch(x: torch.Tensor, group: DenseGroup, rows: slice) -> torch.Tensor:
    """A dense group's rows of x [B, S, H, D] as a batch [count, S_doc, H, D] (a view)."""
    return x[group.row, rows].unflatten(0, (group.count, -1))


# A padded document (DenseGroup.padded_to): one causal document of L rows runs at R > L rows, its own
# first. Under the causal mask its queries see only keys before them, so rows L..R-1 change nothing of
# its output (they are the next rows of the block where those exist, zeros past its end). In backward
# those rows get lse +inf: their probabilities exp(s - lse) are 0, so dS = P (dP - delta) and P^T dO are
# 0 whatever their dout and out hold, and no gradient reaches the document's keys from them. Their dout
# and out are therefore the block's next rows as they are (views, no copies); only the small lse window
# is a copy. Their own dq/dk/dv are dropped. tests/gpu/test_varlen_cuda.py holds cuDNN to this.


def _zero_padded(x: torch.Tensor, rows: int, fill: float = 0.0, dim: int = 1) -> torch.Tensor:
    """x with `rows` along `dim`: itself if it has them, else a copy with `fill` after its own."""
    if x.size(dim) == rows:
        return x
    shape = list(x.shape)
    shape[dim] = rows
    padded = x.new_full(shape, fill)
    padded.narrow(dim, 0, x.size(dim)).copy_(x)
    return padded


def _padded_window(x: torch.Tensor, group: DenseGroup) -> torch.Tensor:
    """[1, padded_to, H, D]: the group's document and the rows after it in x [B, S, H, D]; a view where
    the block has those rows, else a copy with zeros past the document."""
    start, padded = group.q_rows.start, group.padded_to
    if start + padded <= x.size(1):
        return x[group.row : group.row + 1, start : start + padded]
    return _zero_padded(x[group.row : group.row + 1, group.q_rows], padded)


def _padded_forward(q, k, v, group: DenseGroup, scale: float, dense_forward: DenseForward):
    """(out [L, Hq, D], lse [Hq, L]) of a padded document."""
    length = group.q_rows.stop - group.q_rows.start
    out, lse = dense_forward(*(_padded_window(x, group) for x in (q, k, v)), True, scale)
    return out[0, :length], lse[0, :, :length]


def _padded_backward(dout, q, k, v, out, lse, group: DenseGroup, scale: float, dense_backward: DenseBackward):
    """(dq, dk, dv), each [L, H, D], of a padded document given the final out and lse."""
    one, rows, padded = slice(group.row, group.row + 1), group.q_rows, group.padded_to
    lse_window = _zero_padded(lse[one, :, rows], padded, float("inf"), dim=2)
    dout_window, q_window, k_window, v_window, out_window = (
        _padded_window(x, group) for x in (dout, q, k, v, out)
    )
    grads = dense_backward(dout_window, q_window, k_window, v_window, out_window, lse_window, True, scale)
    return tuple(grad[0, : rows.stop - rows.start] for grad in grads)


# A rectangle (a non-causal document share: queries of one block, keys of another) cannot be padded on
# its keys, which every query sees. It runs in two parts whose shapes cuDNN has seen before: its queries,
# zero-padded to the grid, against the longest grid run of its keys (dense_grid_floor: at least 97% of
# them at 32 per octave), and the few keys left on flash (blocks._dense), merged by their lse. The
# backward of each part, given the final out and lse, is its share of the gradients (as ring blocks are).


def _rectangle_forward(q, k, v, scale: float, dense_forward: DenseForward):
    """(out, lse) of one non-causal rectangle q [1, Lq, H, D] x k/v [1, Lk, Hk, D] on grid shapes."""
    queries, grid_keys = q.size(1), dense_grid_floor(k.size(1))
    padded_q = _zero_padded(q, dense_run_length(queries))
    out, lse = dense_forward(padded_q, k[:, :grid_keys], v[:, :grid_keys], False, scale)
    out, lse = out[:, :queries], lse[:, :, :queries]
    if grid_keys == k.size(1):
        return out, lse
    rest_out, rest_lse = dense_forward(q, k[:, grid_keys:], v[:, grid_keys:], False, scale)
    merged, merged_lse = merge_attention_partials(out, lse, rest_out, rest_lse, compute_dtype(q.dtype))
    return merged.to(q.dtype), merged_lse.to(lse.dtype)


def _rectangle_backward(dout, q, k, v, out, lse, scale: float, dense_backward: DenseBackward):
    """(dq, dk, dv) of one rectangle given the final out and lse (the parts of _rectangle_forward)."""
    queries, grid_keys = q.size(1), dense_grid_floor(k.size(1))
    rows = dense_run_length(queries)
    dq, dk, dv = dense_backward(
        _zero_padded(dout, rows), _zero_padded(q, rows), k[:, :grid_keys], v[:, :grid_keys],
        _zero_padded(out, rows), _zero_padded(lse, rows, float("inf"), dim=2), False, scale,
    )  # fmt: skip
    dq = dq[:, :queries]
    if grid_keys == k.size(1):
        return dq, dk, dv
    rest = dense_backward(dout, q, k[:, grid_keys:], v[:, grid_keys:], out, lse, False, scale)
    accumulation = compute_dtype(q.dtype)
    dq = (dq.to(accumulation) + rest[0].to(accumulation)).to(dq.dtype)
    return dq, torch.cat((dk, rest[1]), 1), torch.cat((dv, rest[2]), 1)


def _whole_block_group(plan: SegmentPlan, q: torch.Tensor, k: torch.Tensor) -> DenseGroup | None:
    """The plan's only work where it is one dense group filling the block (B = 1, fixed-length packing
    cut at document edges), else None: then its results are the block's, as views."""
    if plan.ragged_work or len(plan.dense_groups) != 1 or q.size(0) != 1:
        return None
    group = plan.dense_groups[0]
    fills = group.q_rows == slice(0, q.size(1)) and group.k_rows == slice(0, k.size(1))
    return group if fills and group.padded_to is None else None


def _dense_group_forward(q, k, v, group: DenseGroup, causal: bool, scale: float, dense_forward: DenseForward):
    """(out [rows, Hq, D], lse [Hq, rows]) of a dense group's query rows: a padded document, or a batch
    of equal documents (its results flattened back to rows: views for out)."""
    if group.padded_to is not None:
        return _padded_forward(q, k, v, group, scale, dense_forward)
    out, lse = dense_forward(
        _batch(q, group, group.q_rows), _batch(k, group, group.k_rows), _batch(v, group, group.k_rows),
        causal, scale,
    )  # fmt: skip
    return out.flatten(0, 1), lse.transpose(0, 1).flatten(1)


def _dense_group_backward(
    dout, q, k, v, out, lse, group: DenseGroup, causal: bool, scale: float, dense_backward: DenseBackward
):
    """(dq [q rows, Hq, D], dk / dv [k rows, Hk, D]) of a dense group, given the final out and lse."""
    if group.padded_to is not None:
        return _padded_backward(dout, q, k, v, out, lse, group, scale, dense_backward)
    q_rows, k_rows = group.q_rows, group.k_rows
    group_lse = lse[group.row, :, q_rows].unflatten(1, (group.count, -1)).transpose(0, 1).contiguous()
    grads = dense_backward(
        _batch(dout, group, q_rows), _batch(q, group, q_rows), _batch(k, group, k_rows),
        _batch(v, group, k_rows), _batch(out, group, q_rows), group_lse, causal, scale,
    )  # fmt: skip
    return tuple(grad.flatten(0, 1) for grad in grads)


def ragged_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SegmentPlan,
    scale: float,
    kernel: RaggedKernel,
    dense_forward: DenseForward,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32) of a packed-document block through `kernel`."""
    batch, seq_q, heads, dim = q.shape
    if plan.rectangle is not None:
        q_rows, k_rows = plan.rectangle
        if q_rows == slice(0, seq_q) and k_rows == slice(0, k.size(1)):  # one document: the dense kernel
            return dense_forward(q, k, v, plan.causal, scale)
        part = (q[:, q_rows], k[:, k_rows], v[:, k_rows])
        if plan.causal or batch > 1:
            part_out, part_lse = dense_forward(*part, plan.causal, scale)
        else:
            part_out, part_lse = _rectangle_forward(*part, scale, dense_forward)
        out = q.new_zeros(batch, seq_q, heads, v.size(-1))
        lse = torch.full((batch, heads, seq_q), float("-inf"), dtype=part_lse.dtype, device=q.device)
        out[:, q_rows] = part_out.to(out.dtype)
        lse[:, :, q_rows] = part_lse
        return out, lse
    whole = _whole_block_group(plan, q, k)
    if whole is not None:  # no copy into a block-sized output
        part_out, part_lse = _dense_group_forward(q, k, v, whole, plan.causal, scale, dense_forward)
        return part_out.unsqueeze(0), part_lse.unsqueeze(0)
    group = 1 if kernel.grouped_kv else heads // k.size(2)
    if plan.ragged_work:
        out, lse = kernel.forward(
            q.reshape(batch * seq_q, heads, dim),
            _expand(k.reshape(-1, k.size(2), dim), group),
            _expand(v.reshape(-1, v.size(2), v.size(3)), group),
            plan,
            scale,
        )
    else:  # every row is a dense group's (written below) or has no partner (filled here)
        out = q.new_empty(batch * seq_q, heads, v.size(-1))
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty((heads, batch * seq_q), dtype=lse_dtype, device=q.device)
    # In place: the kernels' outputs are fresh tensors. Out 0 and lse -inf add nothing to the merge.
    if plan.queries_without_keys is not None:
        out.masked_fill_(plan.queries_without_keys[:, None, None], 0.0)
        lse.masked_fill_(plan.queries_without_keys[None, :], float("-inf"))
    lse = lse.reshape(heads, batch, seq_q).transpose(0, 1).contiguous()
    out = out.reshape(batch, seq_q, heads, -1)
    for group in plan.dense_groups:
        part_out, part_lse = _dense_group_forward(q, k, v, group, plan.causal, scale, dense_forward)
        out[group.row, group.q_rows] = part_out.to(out.dtype)
        lse[group.row, :, group.q_rows] = part_lse.to(lse.dtype)
    return out, lse


def ragged_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: SegmentPlan,
    scale: float,
    kernel: RaggedKernel,
    dense_backward: DenseBackward,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the block given the final out and lse; dk/dv with k's heads."""
    batch, seq_q, heads, dim = q.shape
    if plan.rectangle is not None:
        q_rows, k_rows = plan.rectangle
        if q_rows == slice(0, seq_q) and k_rows == slice(0, k.size(1)):
            return dense_backward(dout, q, k, v, out, lse, plan.causal, scale)
        part = (dout[:, q_rows], q[:, q_rows], k[:, k_rows], v[:, k_rows], out[:, q_rows], lse[:, :, q_rows])
        if plan.causal or batch > 1:
            parts = dense_backward(*part, plan.causal, scale)
        else:
            parts = _rectangle_backward(*part, scale, dense_backward)
        grads = [
            torch.zeros(full.shape, dtype=part.dtype, device=part.device)
            for full, part in zip((q, k, v), parts)
        ]
        grads[0][:, q_rows], grads[1][:, k_rows], grads[2][:, k_rows] = parts
        return grads[0], grads[1], grads[2]
    whole = _whole_block_group(plan, q, k)
    if whole is not None:
        grads = _dense_group_backward(dout, q, k, v, out, lse, whole, plan.causal, scale, dense_backward)
        dq, dk, dv = (grad.unsqueeze(0) for grad in grads)
        return dq, dk, dv
    kv_heads = k.size(2)
    group = 1 if kernel.grouped_kv else heads // kv_heads
    flat_q = batch * seq_q
    if plan.ragged_work:
        final_lse = lse if lse.dtype == torch.float64 else lse.float()
        dq, dk, dv = kernel.backward(
            dout.to(q.dtype).reshape(flat_q, heads, dim),
            q.reshape(flat_q, heads, dim),
            _expand(k.reshape(-1, kv_heads, dim), group),
            _expand(v.reshape(-1, kv_heads, v.size(3)), group),
            out.to(q.dtype).reshape(flat_q, heads, -1),
            final_lse.transpose(0, 1).reshape(heads, flat_q).contiguous(),
            plan,
            scale,
        )
    else:  # every row is a dense group's (written below) or has no partner (zeroed here)
        group = 1
        dq = q.new_empty(flat_q, heads, dim)
        dk = k.new_empty(batch * k.size(1), kv_heads, dim)
        dv = v.new_empty(batch * v.size(1), kv_heads, v.size(3))
    if group > 1:  # the copies of each K/V head sum back
        dk, dv = (g.unflatten(1, (kv_heads, group)).sum(2) for g in (dk, dv))
    if plan.queries_without_keys is not None:
        dq.masked_fill_(plan.queries_without_keys[:, None, None], 0.0)
    if plan.keys_without_queries is not None:
        dk.masked_fill_(plan.keys_without_queries[:, None, None], 0.0)
        dv.masked_fill_(plan.keys_without_queries[:, None, None], 0.0)
    dq, dk, dv = dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    for group in plan.dense_groups:
        parts = _dense_group_backward(dout, q, k, v, out, lse, group, plan.causal, scale, dense_backward)
        dq[group.row, group.q_rows], dk[group.row, group.k_rows], dv[group.row, group.k_rows] = parts
    return dq, dk, dv


_probed: dict[str, RaggedKernel | None] = {}


def ragged_kernel() -> RaggedKernel | None:
    """The first of GPU_KERNELS that this GPU and torch build run correctly (probed once), else None.

    aten's ragged entry points are private and change between torch releases (argument lists, the lse
    layout, GQA support), so each is trusted only if a small ragged case (GQA, documents present on one
    side only, causal and not, B = 2) equals the plain-torch emulation, forward and backward.
    """
    if "kernel" not in _probed:
        _probed["kernel"] = None
        for kernel in GPU_KERNELS:
            try:
                agrees = _agrees_with_emulation(kernel)
            except (RuntimeError, TypeError, AttributeError, ValueError, IndexError, NotImplementedError):
                agrees = False
            if agrees:
                _probed["kernel"] = kernel
                break
    return _probed["kernel"]


def _probe_cases() -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    # Two batch rows with different documents; the off-diagonal pair has documents on one side only.
    diagonal = torch.tensor([[0] * 40 + [1] * 70 + [2] * 18, [0] * 5 + [1] * 123])
    later = torch.tensor([[2] * 30 + [3] * 98, [1] * 128])
    earlier = torch.tensor([[0] * 20 + [1] * 60 + [2] * 48, [0] * 100 + [1] * 28])
    return [(diagonal, diagonal, True), (later, earlier, False)]


def _agrees_with_emulation(kernel: RaggedKernel) -> bool:
    generator = torch.Generator(device="cuda").manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    def dense_unused(*args):
        raise RuntimeError("probe cases have no rectangle")

    for q_docs, k_docs, causal in _probe_cases():
        plan = plan_segments(q_docs, k_docs, causal)
        if plan is None or plan.rectangle is not None:
            return False
        plan = plan.to(torch.device("cuda"))
        q, k, v, dout = (
            random(2, 128, 4, 64),
            random(2, 128, 2, 64),
            random(2, 128, 2, 64),
            random(2, 128, 4, 64),
        )
        out, lse = ragged_forward(q, k, v, plan, 0.125, kernel, dense_unused)
        want_out, want_lse = ragged_forward(
            q.float(), k.float(), v.float(), plan, 0.125, EMULATED, dense_unused
        )
        grads = ragged_backward(dout, q, k, v, out, lse, plan, 0.125, kernel, dense_unused)
        want_grads = ragged_backward(
            dout.float(),
            q.float(),
            k.float(),
            v.float(),
            want_out,
            want_lse,
            plan,
            0.125,
            EMULATED,
            dense_unused,
        )
        if grads[1].shape != k.shape or grads[2].shape != v.shape or lse.shape != want_lse.shape:
            return False
        if not torch.equal(torch.isinf(lse), torch.isinf(want_lse)):
            return False
        finite = torch.isfinite(want_lse)
        pairs = [(out, want_out), (lse[finite], want_lse[finite]), *zip(grads, want_grads)]
        if not all(torch.allclose(got.float(), want.float(), rtol=3e-2, atol=3e-2) for got, want in pairs):
            return False
    return True
