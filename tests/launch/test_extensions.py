"""DeepSpeed's ops: one folder per environment, chosen by the package, built once, with a message.

The chosen folder is the one scripts/setup builds into (<sys.prefix>/torch-extensions), so these
tests find the ops built and build nothing; the build path itself runs on a stand-in op builder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longloom.runtime import extensions
from longloom.runtime.extensions import (
    CPU_ADAM_OP,
    CPU_COLLECTIVES_OP,
    build_deepspeed_ops,
    needed_ops,
    stable_extensions_dir,
    use_stable_extensions_dir,
)
from tests.launch.conftest import REPO, subprocess_env


def test_folder_is_inside_the_environment_or_a_keyed_user_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert stable_extensions_dir() == tmp_path / "venv" / "torch-extensions"
    # A system Python whose prefix we cannot write to: a user cache folder keyed by the versions.
    read_only = tmp_path / "system"
    read_only.mkdir()
    monkeypatch.setattr(sys, "prefix", str(read_only))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    chosen = stable_extensions_dir()
    assert chosen.parent == tmp_path / "cache" / "longloom" / "torch-extensions"
    import deepspeed
    import torch

    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert chosen.name == f"{py}-torch{torch.__version__}-deepspeed{deepspeed.__version__}"


def test_user_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert use_stable_extensions_dir() == tmp_path / "mine"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert use_stable_extensions_dir() == stable_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(stable_extensions_dir())


def _environment_with_ninja(tmp_path: Path) -> Path:
    """A stand-in environment's bin/ holding python and its own ninja (the `ninja` package's)."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "ninja"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_ops_are_built_by_the_environments_ninja_whatever_path_finds_first(monkeypatch, tmp_path):
    bin_dir = _environment_with_ninja(tmp_path)
    system = tmp_path / "usr-bin"  # PATH of a `.venv/bin/python` started directly: the system's ninja
    system.mkdir()
    (system / "ninja").write_text("#!/bin/sh\n")
    (system / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(system))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ops"))
    use_stable_extensions_dir()
    assert os.path.samefile(shutil.which("ninja"), bin_dir / "ninja")
    # Only ninja: the folder put first holds nothing else (a bare `python` still finds what it found).
    assert os.environ["PATH"] == f"{tmp_path / 'ops' / 'ninja-bin'}{os.pathsep}{system}"
    assert sorted(path.name for path in (tmp_path / "ops" / "ninja-bin").iterdir()) == ["ninja"]
    # A second process (or import) finds the link made and PATH already right: nothing added twice.
    use_stable_extensions_dir()
    assert os.environ["PATH"].count("ninja-bin") == 1


def test_path_is_left_alone_without_an_environment_ninja(monkeypatch, tmp_path):
    bin_dir = _environment_with_ninja(tmp_path)
    (bin_dir / "ninja").unlink()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin")
    extensions.use_environment_ninja(tmp_path / "ops")
    assert os.environ["PATH"] == "/usr/bin"
    assert not (tmp_path / "ops").exists()


def test_needed_ops():
    assert needed_ops("none", on_cpu=True) == [CPU_COLLECTIVES_OP]
    assert needed_ops("cpu", on_cpu=False) == [CPU_ADAM_OP]
    assert needed_ops("interleaved", on_cpu=True) == [CPU_COLLECTIVES_OP, CPU_ADAM_OP]
    assert needed_ops("none", on_cpu=False) == []


class _StandInBuilder:
    """An op builder whose build writes the library torch's loader would write, and counts builds."""

    name = "longloom_test_op"
    builds = 0

    def is_compatible(self, verbose: bool) -> bool:
        return True

    def load(self, verbose: bool):
        type(self).builds += 1
        folder = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / self.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.name}.so").write_bytes(b"")


def test_builds_once_with_a_message(monkeypatch, tmp_path, caplog):
    import deepspeed.accelerator

    class Accelerator:
        def create_op_builder(self, name):
            return _StandInBuilder()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    with caplog.at_level(logging.WARNING, logger=extensions.__name__):
        assert build_deepspeed_ops(["StandInBuilder"]) == ["longloom_test_op"]
        assert build_deepspeed_ops(["StandInBuilder"]) == []
    assert _StandInBuilder.builds == 1
    assert f"building DeepSpeed op longloom_test_op once into {tmp_path}" in caplog.text


def test_a_fresh_process_uses_the_environments_folder_and_builds_nothing():
    # What a torchrun or Ray worker does first: import longloom, then prepare the process.
    script = (
        "import json, os\n"
        "from longloom.config import load_config\n"
        "from longloom.launch.worker_setup import prepare_worker_process\n"
        "from longloom.runtime.extensions import build_deepspeed_ops, CPU_COLLECTIVES_OP\n"
        "prepare_worker_process(load_config(None, []))\n"
        "import shutil\n"
        "ninja = shutil.which('ninja')\n"
        "print(json.dumps([os.environ['TORCH_EXTENSIONS_DIR'], build_deepspeed_ops([CPU_COLLECTIVES_OP]), ninja]))\n"
    )
    env = {key: value for key, value in subprocess_env().items() if key != "TORCH_EXTENSIONS_DIR"}
    # A PATH without the environment's bin/ (nor the folder this process put first): the system's ninja.
    env["PATH"] = os.pathsep.join(
        folder
        for folder in env["PATH"].split(os.pathsep)
        if "ninja-bin" not in folder and folder != os.path.dirname(sys.executable)
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    folder, built, ninja = json.loads(done.stdout.splitlines()[-1])
    assert folder == str(Path(sys.prefix) / "torch-extensions")
    assert built == []
    own_ninja = Path(sys.executable).parent / "ninja"
    if own_ninja.is_file():  # the environment's ninja, whatever this test's PATH finds first
        assert os.path.samefile(ninja, own_ninja), ninja
    assert "building DeepSpeed op" not in done.stderr
    if not any((Path(folder) / "deepspeed_shm_comm").glob("*.so")):
        pytest.fail(f"scripts/setup should have built the CPU collectives into {folder}")
