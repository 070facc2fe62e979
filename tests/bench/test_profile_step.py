"""bench/profile_step.py's reading of a Chrome trace: categories, overlap and the optimizer's host span."""

import json

import pytest

from bench.profile_step import busy_ms, categorise, summarise


@pytest.mark.parametrize(
    "name, category",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", "attention"),
        ("ncclDevKernel_SendRecv(ncclDevComm*, unsigned long, ncclWork*)", "communication"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul"),
        ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda>", "copies"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::silu>", "other kernels"),
    ],
)
def test_kernel_names_fall_into_their_category(name, category):
    assert categorise(name) == category


def test_overlapping_kernels_count_once_in_the_busy_time():
    assert busy_ms([(0, 1000), (500, 1500), (3000, 4000), (3100, 3200)]) == pytest.approx(2.5)


def test_summary_of_a_trace(tmp_path):
    events = [
        {"ph": "X", "cat": "kernel", "name": "flash_fwd_kernel", "ts": 0, "dur": 4000},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllToAll", "ts": 1000, "dur": 2000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 5000, "dur": 1000},
        {
            "ph": "X",
            "cat": "user_annotation",
            "name": "Optimizer.step#DeepSpeedCPUAdam.step",
            "ts": 7000,
            "dur": 3000,
        },
        {"ph": "X", "cat": "cpu_op", "name": "Optimizer.step#DeepSpeedCPUAdam.step", "ts": 7000, "dur": 3000},
        {"ph": "i", "cat": "kernel", "name": "flash_fwd_kernel", "ts": 0},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    rows, busy = summarise(trace, wall_s=0.010)
    table = {name: (float(ms), float(share)) for name, ms, share in rows}
    assert table["attention"] == (4.0, 40.0) and table["communication"] == (2.0, 20.0)
    assert table["copies"] == (1.0, 10.0)
    assert table["optimizer step (host span)"] == (3.0, 30.0)  # the same span recorded twice counts once
    assert busy == pytest.approx(5.0)  # [0, 4) ms with the overlapping all-to-all, then [5, 6) ms
