"""Write DeepSpeed's universal checkpoint layout (what `ds_to_universal` writes and `load_universal` reads).

Layout under the output folder: `zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt` (plus `step.pt` for
ZeRO-1/2), `zero/optimizer_state.pt` and model-states files; the converter writes
`latest_universal` next to the folder once it is complete.

From a DeepSpeed ZeRO checkpoint the output is, file for file, what `python -m
deepspeed.checkpoint.ds_to_universal` writes for the same input (no tensor or pipeline
parallelism): ZeRO-1/2 tensors as `{"cat_dim": 0, "param": <full-shape tensor>}` with the param
group's Adam step in `step.pt`; ZeRO-3 tensors as bare flat `[numel]` tensors and no `step.pt`;
`optimizer_state.pt` built from rank 0's optimizer file the way DeepSpeed builds it; the
model-states files copied. Only the work differs: tensors are gathered from the ranks' files by
flat range on a thread pool instead of through temporary per-fragment files.

From one of our checkpoints, which DeepSpeed cannot convert, tensors are written in the dict form
for every stage (it loads into ZeRO-1, 2 and 3 engines alike) with synthesised optimizer and
model states for both engine kinds.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from pathlib import Path

import torch

from longloom.checkpointing.deepspeed_format import DeepSpeedCheckpointReader

ADAM_STATES = ("fp32", "exp_avg", "exp_avg_sq")
# What ds_to_universal leaves out of rank 0's ZeRO-1/2 optimizer dict (held per rank, in fragments).
_SHARDED_ZERO12_STATES = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")


def write_deepspeed_universal(source, dst: Path, run_parallel) -> None:
    """Writes `source` (any reader) in DeepSpeed's universal layout under `dst`.

    `run_parallel(fn, items)` applies fn to every item (the converter's thread pool + progress).
    """
    dst = Path(dst)
    (dst / "zero").mkdir(parents=True, exist_ok=True)
    if isinstance(source, DeepSpeedCheckpointReader):
        _write_like_ds_to_universal(source, dst, run_parallel)
    else:
        _write_from_ours(source, dst, run_parallel)


def _write_like_ds_to_universal(source: DeepSpeedCheckpointReader, dst: Path, run_parallel) -> None:
    zero3 = source.zero_stage == 3

    def convert(name: str) -> None:
        folder = dst / "zero" / name
        folder.mkdir(parents=True, exist_ok=True)
        if not zero3:
            step = source.raw_step(name)
            if step is not None:
                torch.save(step, folder / "step.pt")
        for state in ADAM_STATES:
            tensor = source.read_full(name, state)
            if zero3:
                torch.save(tensor.reshape(-1), folder / f"{state}.pt")
            else:
                torch.save({"cat_dim": 0, "param": tensor}, folder / f"{state}.pt")

    run_parallel(convert, list(source.specs))
    optim = dict(source.optimizer_state(0))
    if zero3:
        optim["param_groups"] = optim["optimizer_state_dict"]["param_groups"]
    else:
        base_groups = optim["base_optimizer_state"]["param_groups"]
        optim = {key: value for key, value in optim.items() if key not in _SHARDED_ZERO12_STATES}
        optim["param_groups"] = base_groups
    torch.save(optim, dst / "zero" / "optimizer_state.pt")
    for file in source.model_state_files():
        shutil.copy2(file, dst / file.name)


def _write_from_ours(source, dst: Path, run_parallel) -> None:
    import deepspeed

    step = int(source.optimizer_step)

    def convert(name: str) -> None:
        folder = dst / "zero" / name
        folder.mkdir(parents=True, exist_ok=True)
        for state in source.states(name):
            torch.save({"param": source.read_full(name, state), "cat_dim": 0}, folder / f"{state}.pt")
        torch.save(step, folder / "step.pt")

    run_parallel(convert, list(source.specs))
    param_groups = [dict(group, params=[]) for group in source.param_groups]
    torch.save(
        {
            "ds_version": deepspeed.__version__,
            "zero_stage": _zero_stage(source),
            "dynamic_loss_scale": False,
            "overflow": False,
            "param_groups": param_groups,
            # ZeRO-3's universal loader reads the step and hyper-parameters from here.
            "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": param_groups},
        },
        dst / "zero" / "optimizer_state.pt",
    )
    counters = source.engine_counters
    model_states = {
        # In universal mode DeepSpeed restores module weights from zero/<param>/fp32.pt, so the
        # module dict stays empty (a full copy would need the whole model in memory at once).
        "module": {},
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [OrderedDict((name, torch.Size(spec.shape)) for name, spec in source.specs.items())],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": source.lr_scheduler,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": int(counters.get("skipped_steps", 0)),
        "global_steps": int(counters.get("global_steps", source.step)),
        "global_samples": int(counters.get("global_samples", 0)),
        "dp_world_size": int(source.meta.get("world_size", 1)),
        "mp_world_size": 1,
        "ds_version": deepspeed.__version__,
    }
    # Stage 1/2 engines read mp_rank_00_model_states.pt, stage 3 engines zero_pp_rank_0_mp_rank_00_....
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save(model_states, dst / name)


def _zero_stage(source) -> int:
    stage = source.meta.get("source", {}).get("zero_stage")
    return max(1, int(stage or 1))
