"""bench/linear_blocks.py: its --launch values, and a variant that fails the fp64 check is reported, not timed."""

import argparse

import pytest
import torch

pytest.importorskip("triton")
blocks_bench = pytest.importorskip("bench.linear_blocks")


def test_launch_option_values():
    variant = blocks_bench.parse_variant("128:8:4:-:32")
    assert variant.block_size == 128
    launch = variant.launch
    assert (launch.output_warps, launch.backward_warps, launch.stages, launch.state_tile) == (8, 4, None, 32)
    assert blocks_bench.parse_variant("64:4:4:2:64").launch.stages == 2
    for bad in ("64:4:4:2", "48:4:4:2:64", "64:4:4:2:24", "64:0:4:2:64", "64:-:4:2:64", "a:b:c:d:e"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"BLOCK:OUTPUT_WARPS.*got '{bad}'"):
            blocks_bench.parse_variant(bad)


def test_sweep_times_exact_variants_and_reports_a_wrong_one(monkeypatch, capsys):
    # Under the Triton interpreter (fp32: the interpreter's bf16 is not the GPU's). Blocks of 32 are made
    # wrong by a wrapper around the forward; its row must carry the failure and no time.
    real_forward = blocks_bench.block_parallel_forward

    def forward(q, k, v, log_decay, initial, block_size, launch):
        out, final = real_forward(q, k, v, log_decay, initial, block_size, launch)
        return (out + 1e-3 if block_size == 32 else out), final

    monkeypatch.setattr(blocks_bench, "block_parallel_forward", forward)
    args = blocks_bench.parse_args(
        ["--seq", "128", "--heads", "2", "--head-dim", "16", "--dtype", "fp32", "--check-seq", "128",
         "--launch", "64:4:4:-:16", "32:4:4:2:16", "--iters", "1", "--warmup", "0"]
    )  # fmt: skip
    rows = blocks_bench.sweep_rows(
        args, blocks_bench.make_decay(2, True, torch.device("cpu")), torch.device("cpu")
    )
    assert [row[0] for row in rows] == [variant.label() for variant in args.launch]
    assert all(float(cell) > 0 for cell in rows[0][1:4]) and rows[0][4] == ""
    assert rows[1][1:] == ["-", "-", "-", "failed its fp64 check"]
    assert "above 2x the single-GPU error" in capsys.readouterr().out
