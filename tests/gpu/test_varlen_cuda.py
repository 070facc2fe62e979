"""Packed-document blocks through each ragged GPU kernel (attention/varlen.py) in bf16 against fp64.

Each kernel must be within 2x the error of the dense fused bf16 kernel on the same inputs without
documents (relative norm; lse: max absolute, at least 5e-4), forward (out, lse) and q/k/v gradients, on Ulysses-shaped blocks (the whole sequence,
causal, B = 2 with different documents) and TokenRing-shaped ones (every zigzag block pair the ring
plans, with rows that have no key). A kernel that fails its probe on this GPU / torch is skipped here
(it is never selected); the selection test fails if none passes.
"""

import pytest
import torch

from longloom.attention import varlen, varlen_plan
from longloom.attention.blocks import block_attention_backward, block_attention_forward, select_backend
from longloom.attention.reference import attention_with_lse
from longloom.parallel import sharding
from longloom.parallel.ring_plan import RingDocuments, plan_pair
from tests.parallel.documents import lengths_to_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HEADS, KV_HEADS, DIM = 8, 2, 128


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _ids(seq: int, seed: int) -> torch.Tensor:
    """[2, seq] ids: a one-token document, lengths that cross tile and chunk edges, one long document."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(2):
        lengths = [1, 300 + 37 * row, seq // 2] if row == 0 else [seq // 3]
        while sum(lengths) < seq:
            lengths.append(int(torch.randint(1, 900, (1,), generator=generator)))
        rows.append(lengths_to_ids(lengths, 10 * row)[:seq])
    return torch.stack(rows).cuda()


def _dense_error(q, k, v, causal, dout):
    """Relative errors (out, lse, dq, dk, dv) of the dense fused bf16 kernel without documents."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = attention_with_lse(*leaves, causal)
    want.backward(dout.double())
    out, lse = block_attention_forward(q, k, v, causal)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal)
    errors = [_rel(g, w) for g, w in zip((out, lse, *grads), (want, want_lse, *(x.grad for x in leaves)))]
    errors[1] = max((lse.double() - want_lse).abs().max().item(), 5e-4)  # lse: absolute, fp32-rounding floor
    return errors


def _kernel_or_skip(name: str) -> varlen.RaggedKernel:
    kernel = next(k for k in varlen.GPU_KERNELS if k.name == name)
    try:
        usable = varlen._agrees_with_emulation(kernel)
    except (RuntimeError, TypeError, AttributeError, ValueError, IndexError, NotImplementedError) as error:
        pytest.skip(f"{name} does not run on this GPU / torch {torch.__version__}: {error}")
    if not usable:
        pytest.skip(f"{name} disagrees with the emulation on torch {torch.__version__}: never selected here")
    return kernel


def _check_block(kernel, q, k, v, q_docs, k_docs, causal, bound, segments=None, dense_from=None):
    """`kernel` on one block within `bound` (2x the dense errors), rows without a key exact."""
    dense_backend = select_backend(q)

    def dense_forward(q, k, v, causal, scale):
        return block_attention_forward(q, k, v, causal, scale, dense_backend)

    def dense_backward(dout, q, k, v, out, lse, causal, scale):
        return block_attention_backward(dout, q, k, v, out, lse, causal, scale, dense_backend)

    plan = segments or varlen_plan.plan_segments(
        q_docs, k_docs, causal, dense_from or varlen_plan.DENSE_DOCUMENT_TOKENS
    )
    assert plan is not None
    plan = plan.to(q.device)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want, want_lse = attention_with_lse(*leaves, causal, None, q_docs, k_docs)
    dout = torch.randn_like(q)
    want.backward(dout.double())
    scale = DIM**-0.5
    out, lse = varlen.ragged_forward(q, k, v, plan, scale, kernel, dense_forward)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "rows without a key: lse -inf"
    finite = torch.isfinite(want_lse)
    final_lse = torch.where(finite, lse, torch.zeros_like(lse))  # as if other blocks gave them keys
    grads = varlen.ragged_backward(dout, q, k, v, out, final_lse, plan, scale, kernel, dense_backward)
    names = ("out", "lse", "dq", "dk", "dv")
    got_all = (out, lse[finite], *grads)
    want_all = (want, want_lse[finite], *(x.grad for x in leaves))
    for name, got, expected, limit in zip(names, got_all, want_all, bound):
        assert not bool(got.isnan().any()), f"{kernel.name} {name}: NaN"
        error = (got.double() - expected).abs().max().item() if name == "lse" else _rel(got, expected)
        assert error <= limit, f"{kernel.name} {name}: relative error {error:.3g} > 2x dense {limit / 2:.3g}"
    rows_without_keys = ~finite.transpose(1, 2)  # [B, Sq, Hq]
    assert bool((out[rows_without_keys] == 0).all()) and bool((grads[0][rows_without_keys] == 0).all())


@pytest.mark.parametrize("name", [kernel.name for kernel in varlen.GPU_KERNELS])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense_from", [None, 1024])  # 1024: the long documents run on the dense kernel
def test_ulysses_shaped_block(name, causal, dense_from):
    """The whole gathered sequence at once (document_attention under Ulysses), B = 2, GQA."""
    kernel = _kernel_or_skip(name)
    torch.manual_seed(0)
    seq = 4096
    q = torch.randn(2, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, seq, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bound = [2 * e for e in _dense_error(q, k, v, causal, torch.randn_like(q))]
    _check_block(kernel, q, k, v, *(2 * [_ids(seq, 0)]), causal, bound, dense_from=dense_from)


@pytest.mark.parametrize("name", [kernel.name for kernel in varlen.GPU_KERNELS])
def test_padded_documents_on_the_dense_kernel(name):
    """Long documents off the length grid run padded through cuDNN: as views of the rows after them, and
    as zero-padded copies where the block ends first (varlen_plan.dense_run_length)."""
    kernel = _kernel_or_skip(name)
    torch.manual_seed(2)
    seq = 4096
    ids = torch.stack([lengths_to_ids([1500, 2596]), lengths_to_ids([3000, 1096], 10)]).cuda()
    plan = varlen_plan.plan_segments(ids, ids, True, dense_from=1024)
    padded = [(group.q_rows.start, group.padded_to) for group in plan.dense_groups]
    assert padded == [(0, 1504), (1500, 2624), (0, 3008), (3000, 1120)]  # 2nd and 4th: past the end
    q = torch.randn(2, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, seq, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bound = [2 * e for e in _dense_error(q, k, v, True, torch.randn_like(q))]
    _check_block(kernel, q, k, v, ids, ids, True, bound, segments=plan)


@pytest.mark.parametrize("name", [kernel.name for kernel in varlen.GPU_KERNELS])
def test_a_rectangle_on_grid_shapes(name):
    """A ring block's share of one document (1500 queries x 2600 keys, not causal) runs as 1504 x 2560 on
    cuDNN and 1500 x 40 on flash, merged (varlen.py)."""
    kernel = _kernel_or_skip(name)
    torch.manual_seed(3)
    q_docs = lengths_to_ids([1500, 548], 5)[None].cuda()
    k_docs = lengths_to_ids([400, 2600], 4)[None].cuda()
    plan = varlen_plan.plan_segments(q_docs, k_docs, False)
    assert plan.rectangle == (slice(0, 1500), slice(400, 3000))
    q = torch.randn(1, 2048, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3000, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bound = [
        2 * e for e in _dense_error(q[:, :1500], k[:, 400:], v[:, 400:], False, torch.randn_like(q[:, :1500]))
    ]
    _check_block(kernel, q, k, v, q_docs, k_docs, False, bound, segments=plan)


@pytest.mark.parametrize("name", [kernel.name for kernel in varlen.GPU_KERNELS])
def test_tokenring_shaped_blocks(name):
    """Every zigzag block pair of a 2-rank ring (diagonal causal, off-diagonal rows without keys)."""
    kernel = _kernel_or_skip(name)
    torch.manual_seed(1)
    world, seq = 2, 8192
    ids = _ids(seq, 1)
    full = [
        torch.randn(2, seq, heads, DIM, device="cuda", dtype=torch.bfloat16)
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    ]
    shards = [[sharding.shard_tensor(t, 1, r, world, "zigzag") for t in (ids, *full)] for r in range(world)]
    host = torch.stack([shard[0] for shard in shards]).cpu()
    documents = RingDocuments(host=host, device=host.cuda(), ragged=True)  # blocks on the varlen backend
    local = seq // world
    dense_bound = {}
    for causal in (True, False):  # dense error at the diagonal's and an off-diagonal's shape
        q, k, v = (t[:, :local] for t in shards[0][1:])
        dense_bound[causal] = [2 * e for e in _dense_error(q, k, v, causal, torch.randn_like(q))]
    blocks = 0
    for q_owner in range(world):
        for kv_owner in range(world):
            plan = plan_pair(q_owner, kv_owner, world, "zigzag", True, local, documents)
            if plan is None:
                continue
            arguments = documents.block(plan, q_owner, kv_owner)
            assert "segments" in arguments  # varlen: the plan comes from the host ids
            q = shards[q_owner][1][:, plan.q_rows]
            k, v = (t[:, plan.kv_rows] for t in shards[kv_owner][2:])
            _check_block(
                kernel, q, k, v, arguments["q_docs"], arguments["k_docs"], plan.causal, dense_bound[plan.causal],
                segments=arguments["segments"],
            )  # fmt: skip
            blocks += 1
    assert blocks >= 3


def test_select_backend_prefers_a_ragged_kernel_that_passed_its_probe():
    q = torch.zeros(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    kernel = varlen.ragged_kernel()
    assert kernel is not None, f"no ragged kernel passed its probe on torch {torch.__version__}"
    assert select_backend(q, documents=True) == "varlen"
    assert select_backend(q.float(), documents=True) == "triton"  # fp32: the Triton kernel
