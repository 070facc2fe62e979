"""Convergence on real text: the 483M bench model on 1 GPU, 2 GPUs with Ulysses 2 and with ring 2, loss curves compared.

    python bench/convergence.py --configs 1gpu --results shared/convergence --out $OUT        # 1 x H200
    python bench/convergence.py --configs ulysses2 --results shared/convergence --out $OUT    # 2 x H200
    python bench/convergence.py --configs ring2 --results shared/convergence --out $OUT       # 2 x H200
    python bench/convergence.py --configs 1gpu-tiled --results shared/convergence --out $OUT  # bf16 noise floor
    python bench/convergence.py --results shared/convergence --out $OUT --report-only --record  # PNG + table
    python bench/convergence.py --preset tiny --steps 20 --results /tmp/conv --out /tmp/conv   # CPU, gloo

The model is bench/train.py's preset (483M parameters: vocab 32000, hidden 2048, 8 layers, 16 query / 4 KV
heads, SwiGLU 5464), bf16, ZeRO-1, AdamW lr 3e-4 with warmup and cosine decay, clip 1.0, the same seed;
one sequence of --seq-len tokens a step (dp = 1 in every configuration, so every step sees the same
sample). The corpus: bench/convergence_corpus.py (the installed packages' documentation and docstrings,
deduplicated), tokenized by `longloom data prepare --tokenizer bytes` (byte ids < 259; the model keeps its
32000-row embedding, so its size is the bench model's). Each configuration is one command (the GPU machine
allows 10 minutes a command): its metrics.jsonl and the corpus manifest go to --results/<config>/; the
report compares each curve with the 1-GPU one: the mean over the last 100 steps of |loss - loss_1gpu| /
loss_1gpu (issue 18: below 1%, bf16 noise), refusing curves trained on another corpus (manifest sha256).
1gpu-tiled measures that noise: the 1-GPU run with its MLP in two token tiles, the same function rounded
differently, compared with 1gpu the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO_ROOT, append_record, launch_command, markdown_table
from bench.convergence_corpus import package_corpus
from bench.e2e import ENVIRONMENT, Run

# name: (workers, parallel settings)
CONFIGS = {
    "1gpu": (1, {"ulysses": 1, "ring": 1}),
    "ulysses2": (2, {"ulysses": 2, "ring": 1}),
    "ring2": (2, {"ulysses": 1, "ring": 2}),
    "1gpu-tiled": (1, {"ulysses": 1, "ring": 1}),
}
REFERENCE = "1gpu"
# The bf16 noise floor: the reference's own math regrouped (the MLP in two token tiles gives the same
# function, rounded differently). Its distance from the reference is what rounding alone does to a curve
# over these steps; a parallel configuration is judged against the target and shown beside this floor.
NOISE_FLOOR = "1gpu-tiled"
CONFIG_OVERRIDES = {NOISE_FLOOR: ["model.mlp_tiles=2"]}
PRESETS = {
    # bench/train.py's model (483M parameters), bf16 on GPU.
    "483m": {"model": {"vocab_size": 32000, "hidden": 2048, "layers": 8, "heads": 16, "kv_heads": 4},
             "seq_len": 16384, "dtype": "bf16", "corpus_mb": 32, "lr": 3e-4},
    # CPU check of the whole path (corpus, prepare, 3 configurations over gloo, report): seconds a step.
    "tiny": {"model": {"vocab_size": 259, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2},
             "seq_len": 256, "dtype": "fp32", "corpus_mb": 2, "lr": 3e-3},
}  # fmt: skip
TARGET = 0.01


def prepare_corpus(out: Path, megabytes: float) -> tuple[Path, dict]:
    """The package-documentation corpus under out/, tokenized into out/tokens (both reused when unchanged)."""
    text = out / f"corpus-text-{megabytes:g}mb"
    manifest = package_corpus(text, int(megabytes * 2**20))
    tokens = out / f"corpus-tokens-{megabytes:g}mb"
    stamp = tokens / "corpus-sha256"
    if not (stamp.exists() and stamp.read_text() == manifest["sha256"]):
        shutil.rmtree(tokens, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "longloom",
            "data",
            "prepare",
            str(text),
            str(tokens),
            "--tokenizer",
            "bytes",
        ]
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=REPO_ROOT)
        stamp.write_text(manifest["sha256"])
    print(
        f"corpus: {manifest['documents']} documents, {manifest['bytes'] / 2**20:.1f} MiB, sha256 "
        f"{manifest['sha256'][:12]} ({', '.join(f'{k} {v}' for k, v in manifest['versions'].items())})",
        flush=True,
    )
    return tokens, manifest


def train_command(args, name: str, data: Path, run_dir: Path) -> tuple[list[str], Path]:
    workers, parallel = CONFIGS[name]
    preset = PRESETS[args.preset]
    settings = {
        "model": dict(preset["model"]),
        "data": {"source": str(data), "seq_len": args.seq_len or preset["seq_len"]},
        "parallel": {"dp": 1, **parallel},
        "train": {
            "steps": args.steps, "micro_batch_size": 1, "lr": preset["lr"], "warmup_steps": max(1, args.steps // 10),
            "grad_clip": 1.0, "zero_stage": 1, "dtype": preset["dtype"], "seed": args.seed, "log_every": 1,
            "output_dir": str(run_dir / "train"),
        },
        "checkpoint": {"interval": 0},
        "launch": {"backend": "local" if workers == 1 else "torchrun", "workers": workers},
    }  # fmt: skip
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    if workers == 1:
        command = [sys.executable, "-m", "longloom", "train", str(config)]
    else:  # torchrun starts the workers (as bench/e2e.py does); `longloom train` refuses that backend
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers)]
        command += ["--master-port", str(29700 + list(CONFIGS).index(name)), "-m", "longloom.launch.torchrun"]
        command += [str(config)]
    return [*command, *CONFIG_OVERRIDES.get(name, []), *args.override], run_dir / "train" / "metrics.jsonl"


def relative_difference(curve: list[float], reference: list[float], last: int) -> float:
    """Mean over the last `last` common steps of |curve - reference| / reference."""
    steps = min(len(curve), len(reference))
    if steps == 0:
        raise ValueError("no common steps to compare")
    window = range(max(0, steps - last), steps)
    return sum(abs(curve[i] - reference[i]) / abs(reference[i]) for i in window) / len(window)


def load_curve(folder: Path) -> tuple[list[float], dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda row: row["step"])
    return [row["loss"] for row in rows], json.loads((folder / "run.json").read_text())


def run_config(args, name: str, data: Path, manifest: dict, env: dict) -> int:
    run_dir = args.out / f"convergence-{args.preset}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command, metrics = train_command(args, name, data, run_dir)
    run = Run(command, run_dir / "output.log", env, metrics, args.timeout)
    code = run.run()
    steps = len(run.metrics)
    if code != 0 or steps < args.steps:
        print(
            f"{name} FAILED (exit {code}, {steps} of {args.steps} steps); last lines of {run.log}:",
            flush=True,
        )
        print("\n".join("    " + line for line in run.tail[-15:]), flush=True)
        return code or 1
    result = args.results / name
    result.mkdir(parents=True, exist_ok=True)
    shutil.copy(metrics, result / "metrics.jsonl")
    shutil.copy(run.log, result / "output.log")
    step_times = sorted(row["step_time_s"] for row in run.metrics)
    info = {
        "config": name, "preset": args.preset, "steps": steps, "seq_len": args.seq_len or PRESETS[args.preset]["seq_len"],
        "workers": CONFIGS[name][0], "parallel": CONFIGS[name][1], "corpus": manifest, "exit": code,
        "median_step_s": step_times[len(step_times) // 2], "wall_s": run.marks["exit"],
        "overrides": [*CONFIG_OVERRIDES.get(name, []), *args.override], "bench_command": launch_command(),
    }  # fmt: skip
    (result / "run.json").write_text(json.dumps(info, indent=1))
    print(
        f"{name}: {steps} steps, loss {run.metrics[0]['loss']:.4f} -> {run.metrics[-1]['loss']:.4f}",
        flush=True,
    )
    return 0


def report(args) -> int:
    """Table of every configuration in --results against the 1-GPU curve, the PNG, and --record."""
    curves = {
        name: load_curve(args.results / name)
        for name in CONFIGS
        if (args.results / name / "run.json").exists()
    }
    if not curves:
        print(f"no finished configuration under {args.results}")
        return 1
    reference = curves.get(REFERENCE)
    rows, lines, ok = [], [], True
    for name, (losses, info) in curves.items():
        if reference is None or name == REFERENCE:
            diff = None
        elif info["corpus"]["sha256"] != reference[1]["corpus"]["sha256"]:
            raise SystemExit(
                f"{name} trained on another corpus (sha256 {info['corpus']['sha256'][:12]}) than {REFERENCE} "
                f"({reference[1]['corpus']['sha256'][:12]}): run every configuration on the same machine image, "
                "or re-run them with the same packages installed"
            )
        else:
            diff = relative_difference(losses, reference[0], args.last)
            if name == NOISE_FLOOR:
                lines.append(
                    f"- bf16 noise floor ({NOISE_FLOOR}, {' '.join(CONFIG_OVERRIDES[name])}): {diff:.3%}"
                )
            else:
                ok &= diff < TARGET
        parallel = ", ".join(f"{k}={v}" for k, v in info["parallel"].items())
        rows.append([name, info["workers"], parallel, info["preset"], info["seq_len"], info["steps"],
                     f"{losses[0]:.4f}", f"{sum(losses[-args.last:]) / len(losses[-args.last:]):.4f}",
                     "reference" if diff is None else f"{diff:.3%}", f"{info['median_step_s']:.3f}"])  # fmt: skip
    headers = ["config", "GPUs", "parallel", "preset", "seq", "steps", "loss step 1",
               f"mean loss last {args.last}", f"mean abs rel diff vs {REFERENCE} (last {args.last})", "median step s"]  # fmt: skip
    table = markdown_table(headers, rows)
    print(table)
    # the settings a run changed (train.grad_accum=2: two sequences a step) belong beside its curve
    lines[:0] = [
        f"- {name} ran with {' '.join(info['overrides'])}"
        for name, (_, info) in curves.items()
        if info.get("overrides")
    ]
    png = args.out / f"convergence-{next(iter(curves.values()))[1]['preset']}.png"
    plot(curves, png)
    print(f"loss curves: {png}")
    if reference is None:
        print(f"no {REFERENCE} curve yet: the differences need it (run --configs {REFERENCE})")
    else:
        lines.append(f"- every parallel curve within {TARGET:.0%} of {REFERENCE}: {'yes' if ok else 'NO'}")
        print("\n".join(lines))
    if args.record:
        manifest = next(iter(curves.values()))[1]["corpus"]
        commands = "\n".join(sorted({f"  - `{info['bench_command']}`" for _, info in curves.values()}))
        what = (
            "Convergence: the same model, data order and seed trained on 1 GPU, 2 GPUs with Ulysses 2, and with "
            "ring 2, and on 1 GPU with the MLP in 2 token tiles (the bf16 noise floor: the same function rounded "
            "differently) (dp = 1: every step the same sequence); loss = mean over all tokens of the step's sequence "
            f"(metrics.jsonl). Corpus: {manifest['what']}, {manifest['documents']} documents, "
            f"{manifest['bytes'] / 2**20:.1f} MiB, sha256 {manifest['sha256'][:16]}, packages "
            f"{', '.join(f'{k} {v}' for k, v in manifest['versions'].items())}; `longloom data prepare "
            f"--tokenizer bytes`. Plot: {png.name} in the bench output.\n\n- runs:\n{commands}\n"
            + "\n".join(lines)
        )
        append_record(
            "Convergence: 1 GPU vs Ulysses 2 vs ring 2",
            what,
            table,
            max(i["workers"] for _, i in curves.values()),
        )
        print("appended to BENCHMARKS.md")
    return 0 if ok else 1


def plot(curves: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axis, gap) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    reference = curves[REFERENCE][0] if REFERENCE in curves else None
    for index, (name, (losses, _)) in enumerate(curves.items()):
        color = f"C{index}"  # one colour per configuration in both panels
        axis.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1.0, color=color)
        if reference is not None and name != REFERENCE:  # the curves overlap: their gap, in percent
            steps = min(len(losses), len(reference))
            gap.plot(
                range(1, steps + 1),
                [100 * (losses[i] / reference[i] - 1) for i in range(steps)],
                label=name,
                linewidth=0.8,
                color=color,
            )
    axis.set_ylabel("training loss")
    axis.set_title("loss curves (same data order and seed)")
    axis.legend()
    gap.set_xlabel("step")
    gap.set_ylabel(f"vs {REFERENCE} (%)")
    for each in (axis, gap):
        each.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="483m")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, help="tokens a step (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--last", type=int, default=100, help="steps compared at the end of the curves")
    parser.add_argument("--timeout", type=float, default=560.0, help="seconds per configuration")
    parser.add_argument(
        "--results", type=Path, required=True, help="folder collecting every configuration's curve"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the corpus, runs, logs and the PNG"
    )
    parser.add_argument("--override", action="append", default=[], help="extra a.b=v for every configuration")
    parser.add_argument("--report-only", action="store_true", help="run nothing: table, PNG (and --record)")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := set(configs) - set(CONFIGS):
        parser.error(f"--configs {sorted(unknown)} unknown: choose from {', '.join(CONFIGS)}")
    args.out, args.results = args.out.resolve(), args.results.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        sys.exit(report(args))
    data, manifest = prepare_corpus(args.out, PRESETS[args.preset]["corpus_mb"])
    env = {**os.environ, **ENVIRONMENT, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    failed = [name for name in configs if run_config(args, name, data, manifest, env) != 0]
    code = report(args)
    sys.exit(1 if failed else code)


if __name__ == "__main__":
    main()
