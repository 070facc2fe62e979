"""A toy model trained by a real DeepSpeed engine, and helpers to read its full training state.

Parameter sizes are deliberately odd (13, 37, ...) so ZeRO partitions cut parameters in the
middle and fragments of one parameter land on several ranks.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

GLOBAL_BATCH = 4


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(37, 12)
        self.up = nn.Linear(12, 13)
        self.norm = nn.LayerNorm(13)
        self.down = nn.Linear(13, 7, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.norm(self.up(self.embed(tokens))))).pow(2).mean()


def lr_factor(step: int) -> float:
    return min(1.0, (step + 1) / 3) * (0.9**step)


def build_engine(zero_stage: int, seed: int = 0, load_universal: bool = False, interleaved: bool = False):
    """DeepSpeed AdamW, or longloom's interleaved GPU/CPU AdamW as a client optimizer."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(seed)
    model = ToyModel()
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world if GLOBAL_BATCH % world == 0 else 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        # torch's AdamW, as the trainer configures it (offload/optimizer.py): DeepSpeed's FusedAdam would
        # JIT-compile its op inside the first test that builds this engine (~60 s on a fresh clone).
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.1, "torch_adam": True},
        },
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 2**31 - 1,
    }
    client = None
    if interleaved:
        from longloom.config import load_config
        from longloom.offload.optimizer import build_optimizer

        settings = [
            "offload.optimizer=interleaved",
            "train.lr=1e-2",
            "train.weight_decay=0.1",
            "offload.gpu_share=0.5",
        ]
        client = build_optimizer(load_config(None, settings), model.parameters())
        del config["optimizer"]
        config["zero_allow_untested_optimizer"] = True
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        optimizer=client,
        config=config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
        dist_init_required=False,
    )
    return engine


def batch(step: int) -> torch.Tensor:
    """This rank's share of global batch `step` (the global batch does not depend on the world size)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 37, (GLOBAL_BATCH, 5), generator=generator)
    per_rank = GLOBAL_BATCH // world
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def train(engine, first_step: int, last_step: int, after_step=None) -> list[float]:
    losses = []
    for step in range(first_step, last_step + 1):
        loss = engine(batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if after_step is not None:
            after_step(step)
    return losses


def full_state(engine) -> dict:
    """Full fp32 masters, model weights and Adam moments of every parameter (gathers; tests only)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", None) or optimizer
    out = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            entry = {
                "fp32": safe_get_full_fp32_param(p),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
            }
            if hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    entry["weight"] = p.detach().clone()
            else:
                entry["weight"] = p.detach().clone()
        else:
            entry = {
                "fp32": p.detach().clone(),
                "exp_avg": base.state[p]["exp_avg"].clone(),
                "exp_avg_sq": base.state[p]["exp_avg_sq"].clone(),
                "weight": p.detach().clone(),
            }
        out[name] = {k: v.detach().float().cpu().clone() for k, v in entry.items()}
    steps = [int(s["step"]) for s in base.state.values() if "step" in s]
    out["__scalars__"] = {
        "optimizer_step": max(steps),
        "lr": sorted({g["lr"] for g in base.param_groups}),  # group counts differ between optimizers
        "scheduler_last_epoch": engine.lr_scheduler.last_epoch,
        "global_steps": engine.global_steps,
    }
    return out


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual["__scalars__"] == expected["__scalars__"]
    assert set(actual) == set(expected)
    for name, entry in expected.items():
        if name == "__scalars__":
            continue
        for key, value in entry.items():
            torch.testing.assert_close(actual[name][key], value, rtol=0, atol=0, msg=f"{name}/{key}")


def rank_extra(step: int) -> dict:
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    return {
        "loader": {"position": step * 4, "epoch": 0},
        "rng": {str(rank): {"cpu": torch.get_rng_state(), "numbers": torch.rand(3, generator=generator)}},
        "config": {"train": {"zero_stage": 1}, "name": "toy"},
    }


def save_run(
    root: str, stage: int, asynchronous: bool, steps: int, keep: int = 3, interleaved: bool = False
) -> dict:
    """Trains `steps` steps with a lazy checkpoint after each; returns the final full state."""
    from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer

    engine = build_engine(stage, interleaved=interleaved)
    checkpointer = LazyAsyncCheckpointer(root, keep=keep, asynchronous=asynchronous)

    for step in range(1, steps + 1):
        loss = engine(batch(step))
        engine.backward(loss)
        checkpointer.wait_for_snapshot()
        engine.step()
        checkpointer.save(step=step, engine=engine, extra=rank_extra(step))
    checkpointer.close()
    return full_state(engine)
