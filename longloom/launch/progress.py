"""A progress bar on the launcher's terminal, fed by the run's metrics.jsonl.

Under Ray the training ranks are Ray workers: their stderr is not a terminal, so rank 0 draws no
bar (training/metrics.py) and only its step lines reach the driver, forwarded by Ray. The driver
does own the terminal, and rank 0 appends one JSON object per logged step to
`<output_dir>/metrics.jsonl`; following that file gives the driver a bar without any channel of
our own between the ranks and the driver. It needs the driver to see the output directory (the
embedded cluster, or storage the cluster shares); where it does not, the step lines still arrive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO


class MetricsFollower:
    """Reads the lines appended to `metrics.jsonl` since it was created and moves a tqdm bar to the newest step."""

    def __init__(self, metrics_path: Path, total_steps: int, stream: TextIO | None = None):
        from tqdm import tqdm

        self.path = metrics_path
        # A resumed run appends to the same file: only what this launch writes counts.
        self._offset = metrics_path.stat().st_size if metrics_path.exists() else 0
        self._partial = b""
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=stream or sys.stderr)

    def poll(self) -> None:
        """Consumes complete new lines (a line still being written waits for the next poll)."""
        try:
            with self.path.open("rb") as handle:
                if handle.seek(0, 2) < self._offset:  # the file was replaced: start over
                    self._offset = 0
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        newest = loss = rate = None
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours to judge: the trainer owns the file's format
            newest = record.get("step", newest)
            loss, rate = record.get("loss"), record.get("tokens_per_s")
        if newest is None:
            return
        self.bar.n = newest
        if loss is not None and rate is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.poll()
        self.bar.close()


def driver_progress(output_dir: str | Path, total_steps: int) -> MetricsFollower | None:
    """A follower when the driver's stderr is a terminal; None otherwise (logs and CI stay clean)."""
    if not sys.stderr.isatty():
        return None
    return MetricsFollower(Path(output_dir) / "metrics.jsonl", total_steps)
