"""One preflight for `train` and `check`: layout, data, output folder and memory, before any worker starts."""

import errno
import types

import numpy as np
import pytest
import torch

from longloom import cli, preflight
from longloom.config import ConfigError, load_config
from longloom.data.arrow import ShardWriter, write_index
from longloom.data.tokenize import EOS_ID
from longloom.offload.memory import GIB

HUGE_MODEL = [
    "model.hidden=65536",
    "model.heads=64",
    "model.kv_heads=64",
    "model.layers=512",
    "data.seq_len=1048576",
]


def _cfg(tmp_path, *overrides):
    return load_config("configs/tiny.yaml", [f"train.output_dir={tmp_path / 'runs' / 'x'}", *overrides])


@pytest.fixture
def fake_gpu(monkeypatch):
    """One 80 GiB CUDA device as far as torch.cuda's queries go."""
    properties = types.SimpleNamespace(total_memory=80 * GIB, name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    return properties


def test_a_runnable_config_passes_and_says_what_it_could_not_check(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = preflight.preflight(_cfg(tmp_path))
    assert report.split == (1, 2, 1) and report.estimate["per_gpu"]["total"] > 0
    assert report.notes == [
        "GPU memory not checked: no CUDA device on this machine (the run trains on its CPU)"
    ]
    assert not (tmp_path / "runs").exists()  # checked, not created


def test_memory_is_checked_against_the_gpu(tmp_path, fake_gpu):
    with pytest.raises(
        ConfigError, match=r"estimated GPU memory per worker: .* GPU 0 \(Fake GPU\) has \(80.00 GiB\)"
    ):
        preflight.preflight(_cfg(tmp_path, *HUGE_MODEL))
    assert preflight.preflight(_cfg(tmp_path)).notes == []


def test_memory_is_checked_against_the_host_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"no GPU here, so the run would train on this machine's CPU: 2 workers x"
    ):
        preflight.preflight(_cfg(tmp_path, *HUGE_MODEL))


def test_memory_on_a_remote_cluster_is_not_guessed(tmp_path, fake_gpu):
    report = preflight.preflight(_cfg(tmp_path, *HUGE_MODEL, "launch.address=ray://head:10001"))
    assert any(
        "GPU and host memory not checked" in note and "ray://head:10001" in note for note in report.notes
    )


def test_output_dir_must_be_a_writable_folder_and_nothing_is_left(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"train.output_dir='.*file' is a file, not a folder"):
        preflight.check_output_dir(
            _cfg(tmp_path, f"train.output_dir={tmp_path / 'file'}"), preflight.PreflightReport()
        )

    def read_only(prefix, dir):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(preflight.tempfile, "mkdtemp", read_only)
    with pytest.raises(
        ConfigError, match=r"cannot be written: '.*' refuses new files \(Read-only file system\)"
    ):
        preflight.check_output_dir(_cfg(tmp_path), preflight.PreflightReport())
    monkeypatch.undo()
    preflight.check_output_dir(_cfg(tmp_path), preflight.PreflightReport())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


def test_checks_are_a_list_that_a_new_check_joins(tmp_path):
    assert preflight.PREFLIGHT_CHECKS == [
        preflight.check_hf_model,
        preflight.check_layout,
        preflight.check_data,
        preflight.check_eval_data,
        preflight.check_output_dir,
        preflight.check_resume,
        preflight.check_memory,
    ]
    seen = []
    preflight.preflight(
        _cfg(tmp_path), checks=[preflight.check_layout, lambda cfg, report: seen.append(report.split)]
    )
    assert seen == [(1, 2, 1)]


def test_train_refuses_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr("longloom.launch.dispatch.launch", lambda cfg: launched.append(cfg) or 0)
    missing = tmp_path / "missing"
    code = cli.main(
        ["train", "configs/tiny.yaml", f"data.source={missing}", f"train.output_dir={tmp_path / 'run'}"]
    )
    assert code == 2 and launched == []
    assert "missing' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert cli.main(["train", "configs/tiny.yaml", f"train.output_dir={tmp_path / 'run'}"]) == 0
    assert len(launched) == 1


def test_user_errors_and_bugs_are_told_apart():
    message = cli.describe_user_error(PermissionError(errno.EACCES, "Permission denied", "/data/out"))
    assert (
        message
        == "Permission denied: '/data/out': check its permissions, or choose a path you may read / write"
    )
    assert "disk is full" in cli.describe_user_error(OSError(errno.ENOSPC, "No space left on device", "/x"))
    assert "is a file where a folder" in cli.describe_user_error(
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x")
    )
    assert cli.describe_user_error(ConfigError("train.steps=0 ...")) == "train.steps=0 ..."
    assert cli.describe_user_error(RuntimeError("a bug")) is None
    assert cli.describe_user_error(OSError(errno.EIO, "I/O error")) is None


def test_data_outside_the_models_vocabulary_is_refused_before_launch(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    writer = ShardWriter(folder)
    writer.add(np.asarray([*range(100), 400, EOS_ID] * 10, dtype=np.int32))  # 400: outside bytes' 259 ids
    write_index(folder, {"eos_id": EOS_ID, "vocab_size": 259, "tokenizer": "bytes", "shards": writer.close()})
    args = [
        "check",
        "configs/tiny.yaml",
        f"data.source={folder}",
        "data.seq_len=64",
        f"train.output_dir={tmp_path / 'r'}",
    ]
    assert cli.main(args) == 2
    assert "shard-00000.arrow' holds token id 400" in capsys.readouterr().err
    # In range of the data's tokenizer, but the model's embedding is smaller.
    (folder / "index.json").unlink()
    (folder / "shard-00000.arrow").unlink()
    writer = ShardWriter(folder)
    writer.add(np.asarray([*range(100), EOS_ID] * 10, dtype=np.int32))
    write_index(folder, {"eos_id": EOS_ID, "vocab_size": 259, "tokenizer": "bytes", "shards": writer.close()})
    assert cli.main([*args, "model.vocab_size=200"]) == 2
    assert "set model.vocab_size=259" in capsys.readouterr().err
    assert cli.main(args) == 0
