"""bench/detached.sh: a job started detached outlives its `start`, `wait` reports its exit status once it
ended and says when it still runs, and bad use is refused with the fix."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "detached.sh"


def detached(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DETACHED_DIR": str(tmp_path / "jobs")},
        cwd=tmp_path,
        timeout=60,
    )


def test_a_job_runs_in_the_callers_folder_and_its_exit_status_is_reported(tmp_path):
    started = detached(
        tmp_path, "start", "job", "--", "bash", "-c", "sleep 1; pwd; echo made > made.txt; exit 7"
    )
    assert started.returncode == 0 and "started job" in started.stdout
    ended = detached(tmp_path, "wait", "job", "30")
    assert ended.returncode == 0, ended.stdout
    assert str(tmp_path) in ended.stdout and "job ended: exit 7" in ended.stdout
    assert (tmp_path / "made.txt").read_text() == "made\n"


def test_wait_says_when_the_job_still_runs_and_a_second_start_is_refused(tmp_path):
    assert detached(tmp_path, "start", "slow", "--", "sleep", "20").returncode == 0
    running = detached(tmp_path, "wait", "slow", "1")
    assert running.returncode == 3 and "slow still running after 1 s" in running.stdout
    again = detached(tmp_path, "start", "slow", "--", "true")
    assert again.returncode == 2 and "still running" in again.stderr
    pid = int((tmp_path / "jobs" / "slow" / "pid").read_text())
    subprocess.run(["kill", "--", f"-{pid}"], check=False)  # its own session and process group


def test_bad_use_names_the_fix(tmp_path):
    assert "usage:" in detached(tmp_path, "run", "x").stderr
    assert "no command after --" in detached(tmp_path, "start", "x", "--").stderr
    assert "no such job" in detached(tmp_path, "wait", "never", "1").stderr
    assert "SECONDS must be a whole number" in detached(tmp_path, "wait", "never", "soon").stderr
