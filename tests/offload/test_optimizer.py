"""Optimizer offload: DeepSpeed config sections, the performance model, and InterleavedAdamW == AdamW."""

from __future__ import annotations

import pytest
import torch

import longloom.offload.optimizer as optimizer_module
from longloom.config import ConfigError, load_config
from longloom.offload.optimizer import (
    InterleavedAdamW,
    build_optimizer,
    interleave,
    optimizer_settings,
    split_into_subgroups,
)
from longloom.offload.update_rates import (
    UpdateRates,
    balanced_gpu_share,
    choose_gpu_share,
    measure_update_rates,
)
from longloom.training.plan import build_run_plan


def test_settings_none_cpu_interleaved():
    cfg = load_config(
        None, ["train.lr=3e-4", "train.betas=[0.9, 0.99]", "train.weight_decay=0.1", "train.zero_stage=2"]
    )
    plain = optimizer_settings(cfg)
    assert plain == {
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 3e-4,
                "betas": [0.9, 0.99],
                "eps": 1e-8,
                "weight_decay": 0.1,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": 2},
    }
    cfg.offload.optimizer = "cpu"
    offloaded = optimizer_settings(cfg)
    assert offloaded["zero_optimization"] == {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    # DeepSpeed picks its CPU Adam for offload only when torch_adam is not set.
    assert offloaded["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1},
    }
    cfg.offload.optimizer = "interleaved"
    interleaved = optimizer_settings(cfg)
    assert "optimizer" not in interleaved, "the client optimizer from build_optimizer is the optimizer"
    assert interleaved["zero_optimization"] == {"stage": 2} and interleaved["zero_allow_untested_optimizer"]


def test_cpu_offload_without_zero_names_the_key():
    with pytest.raises(ConfigError, match="train.zero_stage"):
        optimizer_settings(load_config(None, ["offload.optimizer=cpu", "train.zero_stage=0"]))


def test_balanced_share_equalises_both_sides():
    # CPU 4x slower than the GPU, PCIe fast enough: the GPU takes 4/5 of the elements.
    rates = UpdateRates(
        gpu_elements_per_s=4e9, cpu_elements_per_s=1e9, d2h_bytes_per_s=1e12, h2d_bytes_per_s=1e12
    )
    share = balanced_gpu_share(rates)
    assert share == pytest.approx(0.8)
    assert share / rates.gpu_elements_per_s == pytest.approx((1 - share) / rates.cpu_elements_per_s)
    # PCIe-bound: 8 bytes per element to the host at 8 GB/s = 1 G elem/s, slower than the 2 G elem/s CPU.
    slow_link = UpdateRates(
        gpu_elements_per_s=4e9, cpu_elements_per_s=2e9, d2h_bytes_per_s=8e9, h2d_bytes_per_s=1e12
    )
    assert balanced_gpu_share(slow_link) == pytest.approx(0.8)


def test_interleave_spreads_cpu_subgroups():
    assert interleave([10] * 8, 0.5) == [False, True] * 4
    assert interleave([10] * 4, 1.0) == [False] * 4
    assert interleave([10] * 4, 0.0) == [True] * 4
    flags = interleave([10] * 12, 0.25)
    assert flags.count(False) == 3 and flags[:4].count(False) == 1, flags


def test_subgroups_cover_parameters_in_order():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 30, 7, 7, 40, 1)]
    groups = split_into_subgroups(params, subgroups=4)
    assert [p for group in groups for p in group] == params
    assert len(groups) <= 4


def _toy_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (4,), (16, 8), (8,), (33,), (5, 5)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def _run_steps(optimizer, params, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (step + 1)  # what an LR scheduler does between steps
        optimizer.step()


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_interleaved_adamw_equals_torch_adamw(monkeypatch, share):
    monkeypatch.setattr(optimizer_module, "CHUNK_ELEMENTS", 7)  # several pipeline chunks per subgroup
    reference_params, params = _toy_params(), _toy_params()
    reference = torch.optim.AdamW(reference_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    groups = split_into_subgroups(params, subgroups=4)
    flags = interleave([sum(p.numel() for p in g) for g in groups], share)
    optimizer = InterleavedAdamW(
        [{"params": g, "on_cpu": f} for g, f in zip(groups, flags)],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
    )
    _run_steps(reference, reference_params, steps=4)
    _run_steps(optimizer, params, steps=4)
    for want, got in zip(reference_params, params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for want, got in zip(reference_params, params):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                optimizer.state[got][key], reference.state[want][key], rtol=1e-5, atol=1e-8
            )
        assert int(optimizer.state[got]["step"]) == 4


def test_interleaved_state_dict_round_trip():
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}

    def fresh(params):
        groups = split_into_subgroups(params, subgroups=3)
        flags = interleave([sum(p.numel() for p in g) for g in groups], 0.5)
        return InterleavedAdamW([{"params": g, "on_cpu": f} for g, f in zip(groups, flags)], **hyper)

    straight_params = _toy_params()
    straight = fresh(straight_params)
    _run_steps(straight, straight_params, steps=2, seed=1)
    _run_steps(straight, straight_params, steps=2, seed=2)

    first_params = _toy_params()
    first = fresh(first_params)
    _run_steps(first, first_params, steps=2, seed=1)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = fresh(resumed_params)
    resumed.load_state_dict(first.state_dict())
    for state in resumed.state.values():
        state["step"] = int(
            state["step"]
        )  # what longloom's universal loader writes for a non-torch optimizer
    _run_steps(resumed, resumed_params, steps=2, seed=2)
    for want, got in zip(straight_params, resumed_params):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_performance_model_measures_and_respects_fixed_share():
    rates = measure_update_rates(torch.device("cpu"), elements=1 << 14, repeats=1)
    for value in (
        rates.gpu_elements_per_s,
        rates.cpu_elements_per_s,
        rates.d2h_bytes_per_s,
        rates.h2d_bytes_per_s,
    ):
        assert 0 < value < float("inf")
    auto = choose_gpu_share(torch.device("cpu"), memory_cap=1.0)
    assert 0.0 < auto < 1.0
    assert choose_gpu_share(torch.device("cpu"), memory_cap=0.0) == 0.0  # the memory cap holds
    # The run plan measures for auto and keeps a fixed offload.gpu_share as it is.
    auto_plan = build_run_plan(load_config(None, ["offload.optimizer=interleaved"]), 1, torch.device("cpu"))
    assert 0.0 < auto_plan.gpu_share < 1.0 and auto_plan.gpu_share_source == "auto, measured"
    fixed = load_config(None, ["offload.optimizer=interleaved", "offload.gpu_share=0.3"])
    assert build_run_plan(fixed, 1, torch.device("cpu")).gpu_share == 0.3


def test_build_optimizer_only_for_interleaved():
    params = _toy_params()
    assert build_optimizer(load_config(None, ["offload.optimizer=cpu"]), params) is None
    cfg = load_config(None, ["offload.optimizer=interleaved", "offload.gpu_share=0.5", "train.lr=2e-3"])
    optimizer = build_optimizer(cfg, params)  # the fixed offload.gpu_share
    assert isinstance(optimizer, InterleavedAdamW)
    assert [p for g in optimizer.param_groups for p in g["params"]] == params
    assert {g["lr"] for g in optimizer.param_groups} == {2e-3}
    assert 0.2 < optimizer.gpu_share < 0.8
    assert build_optimizer(cfg, params, gpu_share=1.0).gpu_share == 1.0  # the plan's share wins
    with pytest.raises(ConfigError, match="offload.gpu_share=auto is measured by the run plan"):
        build_optimizer(load_config(None, ["offload.optimizer=interleaved"]), params)
