"""The driver's progress bar follows metrics.jsonl: only this launch's lines, only complete lines."""

from __future__ import annotations

import io
import json

from longloom.launch.progress import MetricsFollower, driver_progress


def record(step: int, loss: float) -> bytes:
    return (json.dumps({"step": step, "loss": loss, "tokens_per_s": 1000.0 * step}) + "\n").encode()


def test_follower_moves_to_the_newest_complete_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(record(7, 9.0))  # an earlier launch of the same run: not this launch's progress
    stream = io.StringIO()
    follower = MetricsFollower(path, total_steps=20, stream=stream)
    follower.poll()
    assert follower.bar.n == 0

    with path.open("ab") as handle:
        handle.write(record(1, 5.5) + record(2, 4.25) + b'{"step": 3, "lo')  # step 3 still being written
    follower.poll()
    assert follower.bar.n == 2
    assert "loss=4.2500" in stream.getvalue()

    with path.open("ab") as handle:
        handle.write(b'ss": 3.0, "tokens_per_s": 3000.0}\n')
    follower.poll()
    assert follower.bar.n == 3
    follower.close()
    assert "3/20" in stream.getvalue()


def test_follower_waits_for_a_file_that_does_not_exist_yet(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    follower = MetricsFollower(path, total_steps=5, stream=io.StringIO())
    follower.poll()
    assert follower.bar.n == 0
    path.parent.mkdir()
    path.write_bytes(record(4, 1.0))
    follower.poll()
    assert follower.bar.n == 4
    follower.close()


def test_no_bar_without_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert driver_progress(tmp_path, 10) is None
