"""Packed documents on one device: the reference, the block kernels (torch and Triton), the checks."""

import os

import pytest
import torch

from longloom.attention.blocks import block_attention_backward, block_attention_forward, document_attention
from longloom.attention.documents import check_document_ids, meeting_rows
from longloom.attention.reference import attention_with_lse, reference_attention, reference_linear_attention
from tests.parallel.documents import packed_document_ids


def _qkv(seq=40, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, seq, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, seq, kv_heads, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _per_document(fn, ids, *tensors):
    """Runs fn on each document of each batch row alone and puts the outputs back in place."""
    out = tensors[0].new_empty(*tensors[0].shape[:3], tensors[-1].size(-1))
    for row in range(ids.size(0)):
        for doc in ids[row].unique():
            where = (ids[row] == doc).nonzero().flatten()
            piece = fn(*(t[row : row + 1, where] for t in tensors))
            out[row, where] = piece[0]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_equals_each_document_alone(causal):
    q, k, v = _qkv()
    ids = packed_document_ids(40, 4)
    want = _per_document(lambda a, b, c: reference_attention(a, b, c, causal), ids, q, k, v)
    torch.testing.assert_close(
        reference_attention(q, k, v, causal, document_ids=ids), want, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("with_decay", [False, True])
def test_linear_reference_equals_each_document_alone(with_decay):
    q, k, v = _qkv(kv_heads=4)
    decay = torch.tensor([1.0, 0.9, 0.95, 0.8], dtype=torch.float64) if with_decay else None
    ids = packed_document_ids(40, 4, seed=1)
    want = _per_document(lambda a, b, c: reference_linear_attention(a, b, c, decay), ids, q, k, v)
    got = reference_linear_attention(q, k, v, decay, document_ids=ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


BLOCKS = [
    pytest.param(slice(0, 40), slice(0, 40), True, id="diagonal-causal"),
    pytest.param(slice(0, 40), slice(0, 40), False, id="diagonal-full"),
    pytest.param(slice(20, 40), slice(0, 20), False, id="later-queries"),  # rows without a key: lse -inf
    pytest.param(slice(0, 20), slice(13, 40), False, id="earlier-queries"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("q_rows, k_rows, causal", BLOCKS)
def test_block_kernels_match_the_reference(backend, q_rows, k_rows, causal):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip(
                "CPU tensors through Triton need TRITON_INTERPRET=1 (the CUDA test below covers GPUs)"
            )
    q, k, v = _qkv()
    ids = packed_document_ids(40, 4)
    q, k, v = q[:, q_rows], k[:, k_rows], v[:, k_rows]
    q_docs, k_docs = ids[:, q_rows], ids[:, k_rows]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_with_lse(*leaves, causal, None, q_docs, k_docs)
    dout = torch.randn_like(out)
    out.backward(dout)
    dtype = torch.float32 if backend == "triton" else torch.float64
    got_out, got_lse = block_attention_forward(
        *(t.to(dtype) for t in (q, k, v)), causal, None, backend, q_docs, k_docs
    )
    assert torch.equal(torch.isinf(got_lse), torch.isinf(lse)), "rows without a key must have lse -inf"
    finite = ~torch.isinf(lse)
    torch.testing.assert_close(got_lse[finite].double(), lse[finite], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_out.double(), out.detach(), rtol=0, atol=1e-5)
    # The backward of a block given the final lse: rows without a key here get finite lse from elsewhere.
    final_lse = torch.where(finite, lse, torch.zeros_like(lse))
    grads = block_attention_backward(
        *(t.to(dtype) for t in (dout, q, k, v, out.detach())), final_lse.to(dtype), causal, None, backend,
        q_docs, k_docs,
    )  # fmt: skip
    if bool(finite.all()):
        for got, want in zip(grads, (leaves[0].grad, leaves[1].grad, leaves[2].grad)):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    else:  # a query that sees no key of its document in this block contributes no gradient here
        assert torch.equal(
            grads[0][~finite.transpose(1, 2)], torch.zeros_like(grads[0][~finite.transpose(1, 2)])
        )


def test_document_attention_autograd_matches_reference():
    q, k, v = _qkv()
    ids = packed_document_ids(40, 4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = document_attention(*leaves, ids, causal=True)
    want_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = reference_attention(*want_leaves, True, document_ids=ids)
    dout = torch.randn_like(want)
    out.backward(dout)
    want.backward(dout)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for got, expected in zip(leaves, want_leaves):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-10)


def test_triton_tiles_walk_only_their_documents_keys():
    triton_flash = pytest.importorskip("longloom.attention.triton_flash")
    ids = torch.tensor([[0] * 20 + [1] * 20 + [2] * 8])  # tiles of 16: [0,16) [16,32) [32,48)
    start, stop = triton_flash._document_ranges(ids, ids, 16)
    assert start.tolist() == [[0, 0, 20]] and stop.tolist() == [[20, 40, 48]]


def test_meeting_rows_cut_blocks_to_shared_documents():
    q_docs = torch.tensor([[3, 3, 4, 5, 5], [2, 2, 2, 2, 2]])
    k_docs = torch.tensor([[1, 2, 3, 3, 3], [0, 0, 1, 1, 1]])
    assert meeting_rows(q_docs, k_docs) == (slice(0, 2), slice(2, 5))  # row 1 meets nothing
    assert meeting_rows(q_docs[1:], k_docs[1:]) is None


def test_bad_document_ids_raise_with_the_fix():
    q = torch.zeros(2, 6, 4, 8)
    with pytest.raises(ValueError, match=r"document_ids has shape \(2, 5\).*\[batch, seq_local\] = \(2, 6\)"):
        check_document_ids(torch.zeros(2, 5, dtype=torch.long), q, "test")
    with pytest.raises(ValueError, match=r"document_ids must be integers; got torch.float32"):
        check_document_ids(torch.zeros(2, 6), q, "test")
    ids = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 1, 3, 3]])
    with pytest.raises(ValueError, match=r"decrease at local position 3 of row 1 \(2 -> 1\).*never decrease"):
        check_document_ids(ids, q, "test")
    with pytest.raises(ValueError, match=r"cannot mask packed documents.*backend='triton'"):
        block_attention_forward(q, q, q, True, backend="flash", q_docs=ids, k_docs=ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled kernels")
@pytest.mark.parametrize("backend", ["triton", None])  # None: what select_backend picks (varlen)
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_document_kernels_bf16(causal, backend):
    """The GPU paths (Triton; the default, the ragged fused kernels) in bf16 against fp64, fwd and bwd."""
    torch.manual_seed(0)
    lengths = [1, 300, 700, 47, 1000]  # 2048 tokens; tile edges fall inside documents
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].cuda()
    q = torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2048, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = attention_with_lse(*leaves, causal, None, ids, ids)
    want.backward(dout.double())
    out, lse = block_attention_forward(q, k, v, causal, None, backend, q_docs=ids, k_docs=ids)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal, None, backend, q_docs=ids, k_docs=ids)
    for name, got, expected in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want, want_lse, *(x.grad for x in leaves))
    ):
        error = ((got.double() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, f"{name}: relative error {error:.3g}"
