"""The `longloom` command on bad input: a short message naming the value and the fix, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent


def _longloom(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "longloom", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_bad_input_exits_2_with_the_fix_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
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
        result = _longloom(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
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


def test_check_prints_resolved_config_and_memory_estimate():
    result = _longloom("check", "configs/tiny.yaml", "train.steps=7")
    assert result.returncode == 0, result.stderr
    assert "steps: 7" in result.stdout and "per GPU" in result.stdout and "config OK" in result.stdout
