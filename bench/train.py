"""End-to-end training throughput through `longloom train` (the launcher users run), from metrics.jsonl.

    python bench/train.py --workers 1 --record -- model.hidden=2048 data.seq_len=32768   # one GPU via Ray
    python bench/train.py --workers 4 --backend ray -- parallel.ulysses=4 ...             # 4 GPUs, NCCL

Runs `python -m longloom train configs/tiny.yaml <preset overrides> <your overrides>` with the chosen
launcher, then reports the median tokens/s, TFLOP/s per GPU, MFU and peak memory over the steps after
the first two (warm-up), the process-group backend the workers logged, and whether the run succeeded.

The data is bench/e2e_inputs.py's pattern (a random block of 1024 ids repeated in one document), written as a
prepared folder: every label is valid, so the loss is the mean over all tokens of the sample (the
passkey task trains on 5 tokens of each sample, a loss that says nothing). With linear warmup over the
first steps and gradient clipping at 1.0 the curve falls as the model learns to copy the block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import append_record, markdown_table
from bench.e2e_inputs import write_token_folder

VOCAB_SIZE = 32000

# A Llama with 1B-class width on one long sequence per step.
PRESET = [
    f"model.vocab_size={VOCAB_SIZE}",
    "model.hidden=2048",
    "model.layers=8",
    "model.heads=16",
    "model.kv_heads=4",
    "data.seq_len=32768",
    "train.steps=8",
    "train.lr=3e-4",
    "train.warmup_steps=2",
    "train.grad_clip=1.0",
    "train.micro_batch_size=1",
    "train.log_every=1",
    "train.zero_stage=1",
    "checkpoint.interval=0",
    "parallel.ulysses=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--backend", default="ray", choices=["ray", "auto", "local"])
    parser.add_argument("--record", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    output_dir = Path(tempfile.mkdtemp(prefix="longloom-train-bench-"))
    # data.seq_len and train.steps as the run will see them (a later override wins, as in the CLI).
    settings = dict(item.split("=", 1) for item in [*PRESET, *args.overrides] if "=" in item)
    seq_len, steps = int(settings["data.seq_len"]), int(settings["train.steps"])
    vocab = int(settings["model.vocab_size"])
    data = write_token_folder(output_dir / "data", seq_len, vocab, samples=steps * args.workers + 2)
    overrides = [
        *PRESET,
        f"data.source={data}",
        f"launch.workers={args.workers}",
        f"launch.backend={args.backend}",
        f"train.output_dir={output_dir}",
        *args.overrides,
    ]
    command = [sys.executable, "-m", "longloom", "train", "configs/tiny.yaml", *overrides]
    print("running:", " ".join(command), flush=True)
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    log = result.stdout + result.stderr
    (output_dir / "train.log").write_text(log)
    print(log[-6000:])
    backend_lines = [line for line in log.splitlines() if "backend" in line and "split:" in line]
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:] or rows
    tokens_per_s = statistics.median(row["tokens_per_s"] for row in timed)
    tflops = statistics.median(row["tflops_per_gpu"] for row in timed)
    mfu = statistics.median(row["mfu"] for row in timed) if "mfu" in timed[0] else float("nan")
    memory = max(row.get("memory_gb", 0.0) for row in rows)
    table = markdown_table(
        [
            "workers",
            "launcher",
            "exit",
            "backend (worker log)",
            "tokens/s",
            "TFLOP/s/GPU",
            "MFU",
            "peak GiB",
            "loss first -> last",
        ],
        [
            [
                args.workers,
                args.backend,
                result.returncode,
                backend_lines[0].split("split:")[-1].strip() if backend_lines else "?",
                f"{tokens_per_s:,.0f}",
                f"{tflops:.1f}",
                f"{mfu:.1%}",
                f"{memory:.1f}",
                f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}",
            ]
        ],
    )
    print(table)
    if args.record:
        what = (
            "`longloom train` end to end (DeepSpeed engine, activation checkpointing, token-weighted loss) on "
            "a repeated random block (every label valid: the loss is over all tokens), "
            f"overrides: `{' '.join(overrides[:-1])}`; median over steps 3..N from metrics.jsonl."
        )
        append_record("Training throughput through the launcher", what, table, args.workers)
        print("appended to BENCHMARKS.md")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
