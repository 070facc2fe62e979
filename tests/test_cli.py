"""The `longloom` command on bad input: a short message naming the value and the fix, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from longloom.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


def _longloom(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "longloom", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_bad_input_exits_2_with_the_fix_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    # In this process (`main` returns the exit code; a subprocess costs seconds of imports each); the
    # first case also runs as a real `longloom` process, for the process's own exit status and stderr.
    cases = [
        (["train", "configs/tiny.yaml", "model.hiden=3"], "unknown config key 'model.hiden'"),
        (
            ["train", "configs/tiny.yaml", f"data.source={tmp_path / 'missing'}", f"train.output_dir={out}"],
            "longloom data prepare",
        ),
        (["train", "configs/tiny.yaml", "data.seq_len=511", f"train.output_dir={out}"], "data.seq_len=512"),
        (["check", "configs/tiny.yaml", "launch.workers=3"], "launch.workers=3"),
        (["train", "configs/missing.yaml"], "does not exist"),
    ]
    for args, message in cases:
        code = main(args)
        stderr = capsys.readouterr().err
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert "Traceback" not in stderr
    args, message = cases[0]
    result = _longloom(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_data_prepare_names_existing_parquet_columns(tmp_path):
    pq.write_table(pa.table({"body": ["hello world"]}), tmp_path / "x.parquet")
    result = _longloom("data", "prepare", str(tmp_path / "x.parquet"), str(tmp_path / "shards"))
    assert result.returncode == 2
    assert "columns: body" in result.stderr and "--text-column" in result.stderr
    assert not (tmp_path / "shards").exists()
    ok = _longloom(
        "data", "prepare", str(tmp_path / "x.parquet"), str(tmp_path / "shards"), "--text-column", "body"
    )
    assert ok.returncode == 0, ok.stderr
    assert '"documents": 1' in ok.stdout


def test_check_prints_resolved_config_and_memory_estimate(capsys):
    # In this process: a real process's exit status and stderr are checked by the test above.
    code = main(["check", "configs/tiny.yaml", "train.steps=7"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "steps: 7" in out and "per GPU" in out and "config OK" in out


def _one_message(returncode: int, stderr: str) -> str:
    """Exit 2 and exactly one message on stderr, without a traceback."""
    assert returncode == 2, (returncode, stderr)
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("longloom: error: "), stderr
    return lines[0]


def _in_process(capsys, *args: str) -> str:
    """`longloom ARGS` in this process (a subprocess costs seconds of imports); its one error message."""
    code = main(list(args))
    return _one_message(code, capsys.readouterr().err)


def _subprocess(*args: str) -> str:
    result = _longloom(*args)
    return _one_message(result.returncode, result.stderr)


def test_check_refuses_configs_that_cannot_run(tmp_path, capsys):
    missing = _in_process(capsys, "check", "configs/tiny.yaml", f"data.source={tmp_path / 'nowhere'}")
    assert "nowhere' does not exist" in missing and "longloom data prepare" in missing
    # About a million GiB of activations per worker: refused against the GPU, or this host's memory without one.
    huge = [
        "model.hidden=65536",
        "model.heads=64",
        "model.kv_heads=64",
        "model.layers=512",
        "data.seq_len=1048576",
    ]
    memory = _in_process(capsys, "check", "configs/tiny.yaml", *huge)
    assert "GiB" in memory and "parallel.ulysses" in memory
    (tmp_path / "file").write_text("x")
    output = _in_process(
        capsys, "check", "configs/tiny.yaml", f"train.output_dir={tmp_path / 'file' / 'run'}"
    )
    assert "train.output_dir=" in output and "not a folder" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_yaml_syntax_error_is_one_message_and_debug_shows_the_traceback(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  hidden: 64\n train: {steps: 3\n")
    message = _in_process(capsys, "train", str(config))
    assert "broken.yaml' is not valid YAML: line 3" in message
    # A real process: --debug's traceback and the exit status.
    debug = _longloom("--debug", "check", str(config))
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "is not valid YAML" in debug.stderr


def test_strict_values_are_refused_on_the_command_line(capsys):
    steps = _in_process(capsys, "check", "configs/tiny.yaml", "train.steps=true")
    assert "'train.steps'=True" in steps and ">= 1" in steps
    share = _in_process(capsys, "check", "configs/tiny.yaml", "offload.gpu_share=1.5")
    assert "'offload.gpu_share'=1.5" in share and "> 0 and <= 1 or 'auto'" in share


def test_data_prepare_into_its_own_source_or_a_file_is_refused(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("precious source text")
    (tmp_path / "target.bin").write_text("not a folder")
    assert "is the data source itself" in _subprocess("data", "prepare", str(raw), str(raw), "--overwrite")
    for destination in (tmp_path, tmp_path / "target.bin"):
        message = _in_process(capsys, "data", "prepare", str(raw), str(destination), "--overwrite")
        assert "choose" in message
    assert (raw / "a.txt").read_text() == "precious source text"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "raw", "target.bin"]


def test_ckpt_convert_to_a_file_is_one_message(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for destination in (tmp_path / "file", tmp_path / "file" / "inside"):
        message = _in_process(
            capsys, "ckpt", "convert", str(tmp_path / "any"), str(destination), "--to", "universal"
        )
        assert "file" in message and "folder was expected" in message
    assert (tmp_path / "file").read_text() == "not a folder"


def test_check_plans_for_another_machine(tmp_path, capsys):
    # The 8B model on 2 x H200 hosts (140.4 GiB each, 256 GiB of host memory), planned from this CPU machine.
    base = [
        "check",
        "configs/llama8b-1m.yaml",
        "launch.workers=2",
        "parallel.ulysses=2",
        f"train.output_dir={tmp_path / 'run'}",
        "checkpoint.interval=0",
    ]
    h200_x2 = ["--gpus-per-host", "2", "--gpu-memory-gib", "140.4", "--host-memory-gib", "256"]
    fits = [*base, "data.seq_len=393216", "offload.optimizer=interleaved", "offload.device_activations=0.5"]
    assert main([*fits, *h200_x2]) == 0
    printed = capsys.readouterr().out
    assert (
        "# planned for: hosts with 2 GPUs of 140.40 GiB (the planned GPU) and 256.00 GiB of memory" in printed
    )
    assert "per host (2 workers)" in printed and "# config OK" in printed
    # LASP-2H at 1M tokens: the layer inputs alone exceed what two workers may pin on a 256 GiB host.
    million = [*base, "data.seq_len=1048576", "model.layer_pattern=LLLS"]
    refused = _in_process(capsys, *million, *h200_x2)
    assert "pinned host memory needed:" in refused and "(2 workers x" in refused
    assert "exceeds the 204.80 GiB allowed (80% of the host's 256.00 GiB)" in refused
    # On 16 GiB GPUs the GPU estimate refuses first.
    small = _in_process(
        capsys, *million, "--gpus-per-host", "1", "--gpu-memory-gib", "16", "--host-memory-gib", "64"
    )
    assert "more than the planned GPU has (16.00 GiB)" in small
    partial = _in_process(capsys, *fits, "--gpus-per-host", "2")
    assert (
        "needs all three of --gpus-per-host, --gpu-memory-gib, --host-memory-gib: add --gpu-memory-gib"
        in partial
    )
    negative = _in_process(capsys, *fits, *h200_x2[:3], "-1", *h200_x2[4:])
    assert "--gpu-memory-gib must be positive; got -1.0" in negative
    assert not (tmp_path / "run").exists()
