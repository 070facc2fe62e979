"""bench/linear.py's "triton-scan segments=X" and "triton-blocks" rows: the option's values and the timed
functions' gradients."""

import argparse

import pytest
import torch

from longloom.attention.reference import reference_linear_attention

pytest.importorskip("triton")
linear_bench = pytest.importorskip("bench.linear")


def test_segments_option_values():
    assert linear_bench.parse_args(["--segments", "auto", "fine", "8"]).segments == ["auto", "fine", "8"]
    assert [linear_bench.parse_segments(value) for value in ("auto", "fine", "8")] == [None, "fine", 8]
    for bad in ("0", "finer", "-2"):
        with pytest.raises(
            argparse.ArgumentTypeError, match=f"auto, fine or a positive piece count; got '{bad}'"
        ):
            linear_bench.parse_segments(bad)


def test_blocks_launch_option_values():
    args = linear_bench.parse_args(["--blocks-launch", "8:8:2", "4:8:1"])
    assert args.blocks_launch == ["8:8:2", "4:8:1"]
    launch = linear_bench.parse_block_launch("8:4:3")
    assert (launch.output_warps, launch.backward_warps, launch.stages) == (8, 4, 3)
    for bad in ("8:8", "8:0:2", "a:b:c"):
        with pytest.raises(
            argparse.ArgumentTypeError, match=f"OUTPUT_WARPS:BACKWARD_WARPS:STAGES.*got '{bad}'"
        ):
            linear_bench.parse_block_launch(bad)


@pytest.mark.parametrize("row", ["fine", "blocks"])
def test_triton_rows_are_exact_forward_and_backward(row):
    # fine: two 64-token pieces (fine_segments at S=128, d=16, fp32); blocks: two 64-token blocks in
    # parallel. Under the Triton interpreter.
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, 128, 2, 16, generator=generator) / 4 for _ in range(4))
    decay = torch.tensor([0.9, 1.0])
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    want = reference_linear_attention(*leaves, decay.double())
    want.backward(grad_out.double())
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    if row == "fine":
        out = linear_bench.TritonScanAttention.apply(*inputs, decay, "fine")
    else:
        out = linear_bench.TritonBlocksAttention.apply(*inputs, decay)
    out.backward(grad_out)
    for name, got, expected in zip(
        ("out", "dq", "dk", "dv"), [out, *(x.grad for x in inputs)], [want, *(x.grad for x in leaves)]
    ):
        error = (got.double() - expected).abs().max().item()
        assert error <= 2e-5 * expected.abs().max().item(), f"{name}: max abs error {error:.3g}"
