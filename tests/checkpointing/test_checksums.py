"""Checksums catch a checkpoint whose tensor bytes changed; paths in checkpoints stay inside them;
damaged markers and DeepSpeed files give one message; conversions appear whole or not at all."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from longloom.checkpointing.commit import COMMIT_FILE, CheckpointError, prune, validate_checkpoint
from longloom.checkpointing.deepspeed_format import DeepSpeedCheckpointReader, load_deepspeed_file
from longloom.checkpointing.resume import find_latest_verified
from longloom.checkpointing.universal import CheckpointReader
from longloom.cli import main
from longloom.conversion.convert import convert_checkpoint, format_inspection, inspect_checkpoint
from longloom.conversion.hf_export import parse_export_dtype
from tests.checkpointing.toy import save_run


def corrupt_a_tensor(step_dir: Path, prefix: str = "") -> tuple[str, str]:
    """Overwrites 16 bytes inside the first stored tensor whose key starts with `prefix` (sizes unchanged).

    Returns (file name, tensor key). The bytes become float32 NaNs, what a bad disk could leave.
    """
    for file in sorted(step_dir.glob("rank-*.safetensors")):
        with open(file, "r+b") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            keys = [
                k
                for k, v in header.items()
                if k.startswith(prefix) and k != "__metadata__" and v["dtype"] == "F32"
            ]
            keys = [k for k in keys if header[k]["data_offsets"][1] - header[k]["data_offsets"][0] >= 16]
            if not keys:
                continue
            key = keys[0]
            begin, _ = header[key]["data_offsets"]
            handle.seek(8 + length + begin)
            handle.write(struct.pack("<4f", *[float("nan")] * 4))
            return file.name, key
    raise AssertionError(f"no tensor of 16+ bytes starting with {prefix!r} in {step_dir}")


@pytest.fixture(scope="module")
def saved_root(tmp_path_factory) -> Path:
    """Three committed steps of the toy model, 2 ranks, ZeRO-1 (written once for this module)."""
    from tests.conftest import run_distributed

    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    run_distributed(2, save_run, str(root), 1, True, 3)
    return root


@pytest.fixture
def root(saved_root, tmp_path) -> Path:
    copy = tmp_path / "checkpoints"
    shutil.copytree(saved_root, copy)
    return copy


def test_flipped_tensor_bytes_are_found_by_inspect_resume_and_convert(root, tmp_path, capsys, caplog):
    for step in (1, 2, 3):
        report = inspect_checkpoint(root / f"step-{step}")
        assert report["ok"] and report["checksums"] == "verified"
    meta = validate_checkpoint(root / "step-3")
    assert all(len(record["checksums"]["tensors"]) > 1 for record in meta["files"].values())

    file, key = corrupt_a_tensor(root / "step-3", prefix="up.weight")
    validate_checkpoint(root / "step-3")  # sizes and headers alone do not see it

    report = inspect_checkpoint(root / "step-3")
    assert not report["ok"] and report["corrupt"][0]["tensor"] == key and report["corrupt"][0]["file"] == file
    assert "CORRUPT" in format_inspection(report) and key in format_inspection(report)
    assert main(["ckpt", "inspect", str(root / "step-3")]) == 2
    out = capsys.readouterr()
    assert key in out.out and file in out.out
    root_report = inspect_checkpoint(root)
    assert not root_report["ok"] and root_report["latest_committed"] == str(root / "step-2")
    assert main(["ckpt", "inspect", str(root / "step-2")]) == 0

    with caplog.at_level(logging.WARNING):
        assert find_latest_verified(root) == root / "step-2"
    assert "step-3" in caplog.text and key in caplog.text and "resuming from" in caplog.text

    # A conversion reads every tensor whole and checks it: the damaged one stops it, leaving nothing.
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        convert_checkpoint(root / "step-3", tmp_path / "out" / "u", to="universal", progress=False)
    assert not (tmp_path / "out").exists()
    # From the checkpoints/ folder, the newest checkpoint that verifies is converted.
    convert_checkpoint(root, tmp_path / "u2", to="universal", progress=False)
    assert inspect_checkpoint(tmp_path / "u2")["ok"] and CheckpointReader(tmp_path / "u2").step == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # keep=1 after committing step 3 never removes the verified checkpoint a run resumed from.
    prune(root, keep=1, committed_step=3, protect=root / "step-1")
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-3"]


def test_damaged_markers_and_non_checkpoints_give_one_message(root, tmp_path, capsys):
    marker = root / "step-3" / COMMIT_FILE
    text = marker.read_text()
    for damaged, expected in [
        (text[: len(text) // 2], "unreadable"),
        ("", "unreadable"),
        ("[1, 2]", "not a longloom checkpoint marker"),
        (json.dumps({**json.loads(text), "files": 3}), "damaged"),
    ]:
        marker.write_text(damaged)
        report = inspect_checkpoint(root / "step-3")
        assert not report["ok"] and expected in report["error"]
        assert main(["ckpt", "inspect", str(root / "step-3")]) == 2
    # A marker naming a file outside its folder is refused, not followed.
    meta = json.loads(text)
    name = next(iter(meta["files"]))
    meta["files"][f"../{name}"] = meta["files"].pop(name)
    marker.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        validate_checkpoint(root / "step-3")

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert main(["ckpt", "inspect", str(tmp_path / "junk")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert main(["ckpt", "inspect", str(tmp_path / "nothing-here")]) == 2


def test_deepspeed_latest_outside_the_folder_and_invalid_files_are_refused(tmp_path):
    folder = tmp_path / "ds"
    (folder / "global_step1").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    torch.save({"optimizer_state_dict": {}}, outside / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    for tag in ("../elsewhere", str(outside), "global_step1/../../elsewhere"):
        (folder / "latest").write_text(tag)
        with pytest.raises(CheckpointError, match="refusing to follow"):
            DeepSpeedCheckpointReader(folder)
        assert main(["ckpt", "inspect", str(folder)]) == 2

    garbage = folder / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    garbage.write_bytes(b"\x00garbage, not a torch file" * 10)
    with pytest.raises(CheckpointError, match="not a readable DeepSpeed checkpoint file") as error:
        DeepSpeedCheckpointReader(folder / "global_step1")
    assert str(garbage) in str(error.value)
    garbage.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match=str(garbage)):
        load_deepspeed_file(garbage, required=("optimizer_state_dict",))
    torch.save([1, 2, 3], garbage)  # a valid torch file holding no state dict
    with pytest.raises(CheckpointError, match="lacks \\['optimizer_state_dict'\\]"):
        DeepSpeedCheckpointReader(folder / "global_step1")
    assert (
        main(["ckpt", "convert", str(folder / "global_step1"), str(tmp_path / "out"), "--to", "universal"])
        == 2
    )
    assert not (tmp_path / "out").exists()


def test_export_dtype_names_and_failed_convert_leaves_no_destination(root, tmp_path):
    assert (
        parse_export_dtype("bf16") == parse_export_dtype("bfloat16") == parse_export_dtype("torch.bfloat16")
    )
    assert parse_export_dtype("fp16") == torch.float16 and parse_export_dtype("FP32") == torch.float32
    with pytest.raises(CheckpointError, match="bf16, fp16 or fp32"):
        parse_export_dtype("int8")
    with pytest.raises(CheckpointError, match="--to hf only"):
        convert_checkpoint(root / "step-3", tmp_path / "u", to="universal", dtype="bf16")
    # The toy model has no Llama config: --to hf fails after the destination was started.
    with pytest.raises(ValueError, match="no model configuration"):
        convert_checkpoint(
            root / "step-3", tmp_path / "a" / "b" / "hf", to="hf", progress=False, dtype="bf16"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    # An existing folder that holds something is never touched.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_checkpoint(root / "step-3", tmp_path / "taken", to="universal")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        convert_checkpoint(root / "step-3", tmp_path / "file", to="universal")
