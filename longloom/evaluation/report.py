"""The needle report: accuracy by length x depth as a table (stdout, Markdown, CSV), a heatmap PNG and JSON.

Accuracy of a cell = retrieved trials / trials (every answer token greedy-correct); the CSV also gives
the share of answer tokens right, which separates "almost" from "not at all". The JSON holds every
trial (passkey tokens, predicted tokens, needle position) for a closer look or a comparison of runs.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class NeedleTable:
    lengths: list[int]
    depths: list[float]
    trials: np.ndarray  # [lengths, depths] int
    retrieved: np.ndarray  # [lengths, depths] int
    answer_tokens: np.ndarray  # [lengths, depths] int
    answer_tokens_right: np.ndarray  # [lengths, depths] int

    @property
    def accuracy(self) -> np.ndarray:
        return self.retrieved / np.maximum(self.trials, 1)

    @property
    def token_accuracy(self) -> np.ndarray:
        return self.answer_tokens_right / np.maximum(self.answer_tokens, 1)


def tabulate(results: Sequence, lengths: Sequence[int], depths: Sequence[float]) -> NeedleTable:
    """Counts per (length, depth) cell from NeedleResult-like records."""
    shape = (len(lengths), len(depths))
    table = NeedleTable(
        list(lengths),
        list(depths),
        np.zeros(shape, int),
        np.zeros(shape, int),
        np.zeros(shape, int),
        np.zeros(shape, int),
    )
    for result in results:
        cell = (lengths.index(result.length), depths.index(result.depth))
        table.trials[cell] += 1
        table.retrieved[cell] += int(result.retrieved)
        table.answer_tokens[cell] += len(result.answer)
        table.answer_tokens_right[cell] += result.digits_right
    return table


def length_label(length: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if length % size == 0:
            return f"{length // size}{unit}"
    return str(length)


def _grid(table: NeedleTable, cells: np.ndarray) -> list[str]:
    """Rows: lengths; columns: depths; cells in %, then each length's mean."""
    header = "| length | " + " | ".join(f"{d:g}" for d in table.depths) + " | mean |"
    rule = "|---|" + "---|" * (len(table.depths) + 1)
    rows = [
        f"| {length_label(length)} | "
        + " | ".join(f"{100 * a:.0f}" for a in cells[i])
        + f" | {100 * cells[i].mean():.1f} |"
        for i, length in enumerate(table.lengths)
    ]
    return [header, rule, *rows]


def markdown(table: NeedleTable, title: str) -> str:
    """Whole passkeys retrieved (%), then answer digits right (%): a small model learns digits long
    before it gets all of a passkey right (chance: 1 in 90,000 for a passkey, about 1 in 10 a digit)."""
    trials = int(table.trials.max()) if table.trials.size else 0
    intro = f"{title}\n\nRetrieval accuracy (%) by length (rows) and needle depth (columns), {trials} trials a cell.\n"
    digits = (
        f"\nAnswer digits right (%) (teacher-forced greedy decoding; chance about 10%: "
        f"{int(table.answer_tokens_right.sum())} of {int(table.answer_tokens.sum())} digits).\n"
    )
    return (
        "\n".join([intro, *_grid(table, table.accuracy), digits, *_grid(table, table.token_accuracy)]) + "\n"
    )


def write_csv(table: NeedleTable, path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["length", "depth", "trials", "retrieved", "accuracy", "answer_token_accuracy"])
        for i, length in enumerate(table.lengths):
            for j, depth in enumerate(table.depths):
                writer.writerow(
                    [
                        length,
                        f"{depth:g}",
                        int(table.trials[i, j]),
                        int(table.retrieved[i, j]),
                        f"{table.accuracy[i, j]:.6f}",
                        f"{table.token_accuracy[i, j]:.6f}",
                    ]
                )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def write_heatmap(table: NeedleTable, path: Path, title: str) -> None:
    """Accuracy heatmap (lengths x depths), each cell annotated with its %; matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training host
    import matplotlib.pyplot as plt

    width = max(4.0, 0.7 * len(table.depths) + 2.0)
    height = max(2.5, 0.5 * len(table.lengths) + 1.5)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(table.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(table.depths)), [f"{d:g}" for d in table.depths])
    axes.set_yticks(range(len(table.lengths)), [length_label(n) for n in table.lengths])
    axes.set_xlabel("needle depth (0 = start of the haystack)")
    axes.set_ylabel("sequence length (tokens)")
    axes.set_title(textwrap.fill(title, width=int(12 * width)), fontsize=8)
    for i in range(len(table.lengths)):
        for j in range(len(table.depths)):
            axes.text(j, i, f"{100 * table.accuracy[i, j]:.0f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    results: Sequence, lengths: Sequence[int], depths: Sequence[float], out_dir: Path, stem: str, title: str
) -> dict[str, Path]:
    """Writes <stem>.md, .csv, .png and .json under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = tabulate(results, list(lengths), list(depths))
    paths = {suffix: out_dir / f"{stem}.{suffix}" for suffix in ("md", "csv", "png", "json")}
    paths["md"].write_text(markdown(table, title))
    write_csv(table, paths["csv"])
    write_heatmap(table, paths["png"], title)
    paths["json"].write_text(json.dumps({"title": title, "trials": [r.to_dict() for r in results]}, indent=1))
    return paths
