"""Lazy asynchronous checkpoints: reshard on load (world size and ZeRO stage), commit, fallback, pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from longloom.checkpointing.commit import COMMIT_FILE, CheckpointError, validate_checkpoint
from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer, find_latest_committed
from longloom.checkpointing.universal import CheckpointReader
from tests.checkpointing.toy import assert_states_equal, build_engine, full_state, save_run


def _load_worker(root: str, stage: int, interleaved: bool = False) -> tuple[dict, dict]:
    engine = build_engine(stage, seed=123, interleaved=interleaved)  # different initial weights
    path = find_latest_committed(Path(root))
    extra = LazyAsyncCheckpointer(root).load(path, engine)
    return full_state(engine), extra


@pytest.mark.parametrize(
    "save_world,save_stage,load_world,load_stage",
    [(2, 0, 4, 3), (2, 1, 4, 0), (2, 3, 4, 2), (4, 2, 2, 1), (2, 2, 1, 3)],
)
def test_reshard_on_load_restores_params_and_optimizer_state(
    distributed, tmp_path, save_world, save_stage, load_world, load_stage
):
    root = str(tmp_path / "checkpoints")
    saved = distributed(save_world, save_run, root, save_stage, True, 3)[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    results = distributed(load_world, _load_worker, root, load_stage)
    for rank, (state, extra) in enumerate(results):
        assert_states_equal(state, saved)
        source_rank = rank if rank < save_world else 0
        assert extra["loader"] == {"position": 12, "epoch": 0}
        assert extra["config"] == {"train": {"zero_stage": 1}, "name": "toy"}
        assert list(extra["rng"]) == [str(source_rank)]
        expected = torch.rand(3, generator=torch.Generator().manual_seed(source_rank))
        torch.testing.assert_close(extra["rng"][str(source_rank)]["numbers"], expected, rtol=0, atol=0)
        assert extra["rng"][str(source_rank)]["cpu"].dtype == torch.uint8


@pytest.mark.parametrize(
    "save_interleaved,save_stage,load_interleaved,load_stage", [(True, 0, False, 2), (False, 1, True, 0)]
)
def test_state_moves_between_deepspeed_adamw_and_interleaved_adamw(
    distributed, tmp_path, save_interleaved, save_stage, load_interleaved, load_stage
):
    root = str(tmp_path / "checkpoints")
    saved = distributed(2, save_run, root, save_stage, True, 2, 3, save_interleaved)[0]
    for state, _ in distributed(2, _load_worker, root, load_stage, load_interleaved):
        assert_states_equal(state, saved)


def test_sync_mode_writes_the_same_format(distributed, tmp_path):
    async_state = distributed(2, save_run, str(tmp_path / "a"), 1, True, 2)[0]
    sync_state = distributed(2, save_run, str(tmp_path / "s"), 1, False, 2)[0]
    assert_states_equal(sync_state, async_state)
    with CheckpointReader(tmp_path / "a" / "step-2") as a, CheckpointReader(tmp_path / "s" / "step-2") as s:
        assert a.meta["layout"] == s.meta["layout"] == "distributed"
        assert a.specs == s.specs
        for name in a.specs:
            for state in ("fp32", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(a.read_full(name, state), s.read_full(name, state), rtol=0, atol=0)


def test_keep_prunes_older_checkpoints_and_each_rank_writes_a_share(distributed, tmp_path):
    root = tmp_path / "checkpoints"
    distributed(2, save_run, str(root), 0, True, 4, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
    meta = validate_checkpoint(root / "step-4")
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["source"]["zero_stage"] == 0
    # Stage 0 holds full replicas; the write is still split: both rank files carry about half.
    sizes = sorted(info["bytes"] for info in meta["files"].values())
    assert len(sizes) == 2 and sizes[0] > 0.4 * sizes[1]
    leftovers = [
        p.name for p in (root / "step-4").iterdir() if p.name != COMMIT_FILE and p.name not in meta["files"]
    ]
    assert leftovers == []


def test_uncommitted_and_corrupt_checkpoints_fall_back_with_clear_errors(distributed, tmp_path):
    root = tmp_path / "checkpoints"
    distributed(2, save_run, str(root), 2, True, 3)
    assert find_latest_committed(root) == root / "step-3"

    # A data file cut short (e.g. a disk-full during a copy) invalidates step 3: fall back to 2.
    victim = min((root / "step-3").glob("*.safetensors"))
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="corrupt"):
        validate_checkpoint(root / "step-3")
    assert find_latest_committed(root) == root / "step-2"

    # A step whose marker never made it to disk (crash before commit) is never loaded.
    (root / "step-2" / COMMIT_FILE).unlink()
    with pytest.raises(CheckpointError, match="never committed"):
        CheckpointReader(root / "step-2")
    assert find_latest_committed(root) == root / "step-1"

    # A marker that is not JSON (torn write on a filesystem without atomic rename) is rejected.
    (root / "step-1" / COMMIT_FILE).write_text('{"format": "longloom-chec')
    with pytest.raises(CheckpointError, match="unreadable"):
        validate_checkpoint(root / "step-1")
    assert find_latest_committed(root) is None


def test_marker_is_the_index_and_holds_no_pickles(distributed, tmp_path):
    root = tmp_path / "checkpoints"
    distributed(2, save_run, str(root), 3, True, 1)
    meta = json.loads((root / "step-1" / COMMIT_FILE).read_text())
    assert meta["layout"] == "distributed" and meta["optimizer"]["step"] >= 1
    assert meta["params"]["up.weight"]["shape"] == [13, 12]
    pieces = meta["params"]["up.weight"]["pieces"]["fp32"]
    assert sum(numel for _, _, _, numel in pieces) == 13 * 12 and len(pieces) == 2  # ZeRO-3: one per rank
    assert all(path.suffix in {".safetensors", ".json"} for path in (root / "step-1").iterdir())


def test_bad_keep_raises():
    with pytest.raises(ValueError, match="checkpoint.keep"):
        LazyAsyncCheckpointer("unused", keep=0)
