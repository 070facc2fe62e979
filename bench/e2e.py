"""longloom vs the DeepSpeed ALST recipe, end to end on one machine: same model, tokens, ZeRO-3, CPU Adam, bf16.

    python bench/e2e.py --gpus 2 --seq-lens 131072 --out $OUT --prepare-only        # 8B HF folder in /tmp, once
    python bench/e2e.py --gpus 2 --seq-lens 131072 --steps 4 --systems alst --out $OUT --results /tmp/e2e.jsonl
    python bench/e2e.py --gpus 2 --seq-lens 131072 --steps 4 --systems longloom --out $OUT --results /tmp/e2e.jsonl
    python bench/e2e.py --out $OUT --results /tmp/e2e.jsonl --report-only --record   # table + ratios of all rows
    python bench/e2e.py --preset tiny --gpus 2 --seq-lens 256 --steps 3 --out /tmp/e2e   # CPU: harness check
    # 256K on 2 x H200 (256 GiB host): the layer inputs and a quarter of the attention outputs go to the host,
    # the other three quarters stay in GPU memory (all of them would need ~62 GiB more pinned host memory)
    python bench/e2e.py --gpus 2 --seq-lens 262144 --steps 3 --warmup 1 --systems longloom --out $OUT \
        --results /tmp/e2e.jsonl --longloom-override offload.activations=0.25 \
        --longloom-override offload.device_activations=0.75

Systems (--systems, any subset, each run in its own process tree with a timeout; logs under --out):
- longloom: `torchrun -m longloom.launch.torchrun <generated yaml>` (`python -m longloom train` on one GPU or
  with --launcher ray); native Llama, ulysses = GPUs, activations and optimizer offloaded, mlp_tiles auto
  (untiled where the memory estimate fits the GPU),
  ZeRO-3; tokens/s the median of metrics.jsonl after --warmup steps;
- longloom-hf: the same with model.source hf:<--hf-dir>, a transformers Llama folder of random bf16 weights
  built once (issue 17: within 5% of native);
- alst: bench/e2e_alst.py under torchrun: HF Llama + DeepSpeed's UlyssesSPAttentionHF, TiledMLP,
  TiledFusedLogitsLoss, checkpointed hidden states offloaded to host, ZeRO-3 + CPU Adam, loading the same
  folder as longloom-hf (on CPU the two agree in loss and grad norm to 4 digits: the same training).
Every system trains on bench/e2e_inputs.pattern_window (all labels valid). Time to first step: each output
line is timestamped as it arrives; phases are the first lines that mark them (below), step 1 the first
metrics line. Peak host memory is the sampled RSS of the whole process tree; peak GPU memory per process
from nvidia-smi (what the driver holds) beside torch's max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO_ROOT, append_record, launch_command, markdown_table
from bench.e2e_inputs import PRESETS, write_hf_folder, write_token_folder
from longloom.runtime.extensions import use_stable_extensions_dir

SYSTEMS = ("longloom", "longloom-hf", "alst")
ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# (phase, pattern) in the order they happen; a line `phase <name> ...` (bench/e2e_alst.py, and trainer
# phase lines when they exist) marks <name> too.
PHASE_MARKERS = [
    ("dist_init", re.compile(r"split: dp=")),
    ("model_init", re.compile(r"model: (native|hf:)")),
    ("op_build", re.compile(r"Loading extension module cpu_adam|Time to load cpu_adam|cpu_adam.*built")),
    ("engine_init", re.compile(r"DeepSpeed engine .*ready in")),  # longloom's Trainer.build phase lines
    ("data_ready", re.compile(r"(data \(.*\) ready|resumed from .*) in")),
    ("first_step", re.compile(r"\bstep +1 \|")),  # longloom's console line, printed when step 1 ends
]
PHASE_LINE = re.compile(r"\bphase[:= ]+([A-Za-z_][\w.-]*)")
CPU_THREADS_LINE = re.compile(r"CPU threads per worker: (\d+)")  # longloom's runtime/cpu_threads.py
# longloom's activation offload line (training/offload_report.py): the pool's pinning, and the part of it the
# forward waited for (the rest was made ahead on the pool's thread)
PINNING_LINE = re.compile(r"(?:page-locked|allocated) in ([\d.]+) s, ([\d.]+) s of it holding up the forward")
# longloom's first-step GPU memory line (training/gpu_memory_report.py): what each stream reserves
STREAMS_LINE = re.compile(r"reserved now by stream: (.*?); allocator retries")
STREAM_RESERVED = re.compile(r"(.+?) ([\d.]+) (B|KiB|MiB|GiB|TiB) \(")
UNIT_GIB = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 1024.0}


def stream_reserved_gib(line: str) -> dict[str, float] | None:
    """{stream name: GiB reserved} from the memory line, None if `line` is not it."""
    found = STREAMS_LINE.search(line)
    if found is None:
        return None
    streams = {}
    for part in found.group(1).split("), "):
        if entry := STREAM_RESERVED.match(part.strip()):
            streams[entry.group(1)] = round(float(entry.group(2)) * UNIT_GIB[entry.group(3)], 2)
    return streams


class Run:
    """One system's process tree: output lines timestamped into a log, memory sampled, killed on timeout."""

    def __init__(self, command: list[str], log: Path, env: dict, metrics_file: Path | None, timeout: float):
        self.command, self.log, self.env, self.metrics_file, self.timeout = (
            command,
            log,
            env,
            metrics_file,
            timeout,
        )
        self.marks: dict[str, float] = {}
        self.metrics: list[dict] = []
        self.host_peak = self.gpu_peak = 0.0
        self.tail: list[str] = []
        self.cpu_threads: str | None = None  # what longloom chose, from its log line
        self.pinning: tuple[float, float] | None = None  # (seconds pinning, of them holding up the forward)
        self.stream_reserved: dict[str, float] | None = None  # GiB each stream reserves after step 1

    def _mark(self, name: str, at: float) -> None:
        if name not in self.marks:
            self.marks[name] = at
            print(f"  [{at:7.1f} s] {name}", flush=True)

    def _sample(self, process: subprocess.Popen, started: float) -> None:
        while process.poll() is None:
            rss, pids = _process_tree(process.pid)
            self.host_peak = max(self.host_peak, rss)
            self.gpu_peak = max(self.gpu_peak, _gpu_used_gib(pids))
            if (
                self.metrics_file is not None
                and "first_step" not in self.marks
                and self.metrics_file.exists()
            ) and self.metrics_file.read_text().strip():
                self._mark("first_step", time.perf_counter() - started)
            time.sleep(1.0)

    def run(self) -> int:
        print("running:", " ".join(self.command), flush=True)
        started = time.perf_counter()
        env = {**self.env, "E2E_LAUNCH_TIME": str(time.time())}
        process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip
        sampler = threading.Thread(target=self._sample, args=(process, started), daemon=True)
        sampler.start()
        killed = []

        def kill() -> None:
            killed.append(True)
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(self.timeout, kill)
        timer.start()
        with self.log.open("w") as log:
            for line in process.stdout:
                at = time.perf_counter() - started
                log.write(f"[{at:8.2f}] {line}")
                self.tail = [*self.tail[-40:], line.rstrip()]
                for name, pattern in PHASE_MARKERS:
                    if pattern.search(line):
                        self._mark(name, at)
                if found := PHASE_LINE.search(line):
                    self._mark(found.group(1), at)
                if self.cpu_threads is None and (found := CPU_THREADS_LINE.search(line)):
                    self.cpu_threads = found.group(1)
                if self.pinning is None and (found := PINNING_LINE.search(line)):
                    self.pinning = (float(found.group(1)), float(found.group(2)))
                if self.stream_reserved is None:
                    self.stream_reserved = stream_reserved_gib(line)
                if line.startswith("metrics "):
                    self.metrics.append(json.loads(line[len("metrics ") :]))
                    if len(self.metrics) == 1:
                        self._mark("first_step", at)
        code = process.wait()
        timer.cancel()
        self.marks["exit"] = time.perf_counter() - started
        if killed:
            print(f"killed after --timeout {self.timeout:.0f} s", flush=True)
            code = 124
        if self.metrics_file is not None and self.metrics_file.exists():
            self.metrics = [
                json.loads(row) for row in self.metrics_file.read_text().splitlines() if row.strip()
            ]
        sampler.join(timeout=5)
        return code


def _process_tree(pid: int) -> tuple[float, set[int]]:
    """(resident host GiB of `pid` and all its descendants, their pids); (0, {pid}) without psutil."""
    try:
        import psutil  # a DeepSpeed dependency
    except ImportError:
        return 0.0, {pid}
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
        rss = 0
        for member in tree:
            try:
                rss += member.memory_info().rss
            except psutil.Error:  # exited between the listing and the read
                pass
        return rss / 2**30, {member.pid for member in tree}
    except psutil.Error:
        return 0.0, {pid}


def _gpu_used_gib(pids: set[int]) -> float:
    """Largest GPU memory one of `pids` holds per nvidia-smi (each rank owns one GPU); 0 without it.

    In a container nvidia-smi may list host PIDs: then the largest entry of any process is taken (the
    benchmark runs alone on its GPUs).
    """
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return 0.0
    rows = [
        (int(pid), float(mib) / 1024)
        for pid, mib in (row.split(",") for row in out.splitlines() if "," in row)
    ]
    ours = [gib for pid, gib in rows if pid in pids]
    return max(ours or [gib for _, gib in rows], default=0.0)


def longloom_command(args, system: str, seq_len: int, data: Path, run_dir: Path) -> tuple[list[str], Path]:
    shape = PRESETS[args.preset]
    settings = {
        "model": {"source": f"hf:{args.hf_dir}", "mlp_tiles": "auto"}
        if system == "longloom-hf"
        else {"mlp_tiles": "auto"},
        "data": {"source": str(data), "seq_len": seq_len},
        "parallel": {"ulysses": args.gpus},
        "train": {
            "steps": args.steps, "lr": args.lr, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 3,
            "dtype": "bf16", "log_every": 1, "output_dir": str(run_dir / "train"),
        },
        "offload": {"activations": True, "optimizer": "cpu"},
        "checkpoint": {"interval": 0},
        "launch": {"backend": args.launcher, "workers": args.gpus},
    }  # fmt: skip
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    overrides = shape.native_overrides() if system == "longloom" else []
    if args.launcher == "torchrun":  # torchrun starts the workers; `longloom train` refuses this backend
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus)]
        command += ["--master-port", str(29500 + seq_len % 97), "-m", "longloom.launch.torchrun"]
    else:
        command = [sys.executable, "-m", "longloom", "train"]
    command += [str(config), *overrides, *args.longloom_override]
    return command, run_dir / "train" / "metrics.jsonl"


def alst_command(args, seq_len: int) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus)]
    torchrun += ["--master-port", str(29600 + seq_len % 97)]
    return [*torchrun, str(REPO_ROOT / "bench" / "e2e_alst.py"), "--hf-dir", str(args.hf_dir),
            "--seq-len", str(seq_len), "--steps", str(args.steps), "--lr", str(args.lr)]  # fmt: skip


def alst_environment(env: dict, cpu_threads: int | None) -> dict:
    """ALST's process environment: OMP_NUM_THREADS=cpu_threads if given (torchrun keeps a value it finds;
    it sets 1 only when the variable is unset)."""
    return env | {"OMP_NUM_THREADS": str(cpu_threads)} if cpu_threads else env


def summarise(system: str, seq_len: int, gpus: int, code: int, run: Run, warmup: int) -> dict:
    rows = run.metrics
    timed = rows[warmup:] or rows[-1:]
    steps = [row["step_time_s"] for row in timed]
    first = run.marks.get("first_step")
    phases = " ".join(f"{name} {at:.0f}" for name, at in sorted(run.marks.items(), key=lambda kv: kv[1]))
    return {
        "system": system, "gpus": gpus, "seq_len": seq_len, "exit": code, "steps": len(rows),
        "tokens_per_s": statistics.median(row["tokens_per_s"] for row in timed) if timed else None,
        "step_s": statistics.median(steps) if steps else None,
        "alloc_gib": max((row.get("memory_gb", 0.0) for row in rows), default=0.0),
        "reserved_gib": max((row.get("reserved_gb", 0.0) for row in rows), default=0.0),
        "gpu_used_gib": run.gpu_peak, "host_gib": run.host_peak,
        "pinned_gib": max((row.get("pinned_host_gb", 0.0) for row in rows), default=0.0),
        "loss": f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}" if rows else "-",
        "first_step_s": first, "phases": phases,
        "pinning_s": run.pinning[0] if run.pinning else None,
        "pinning_waited_s": run.pinning[1] if run.pinning else None,
        "stream_reserved_gib": run.stream_reserved,
    }  # fmt: skip


HEADERS = ["system", "GPUs", "seq", "CPU threads", "exit", "tokens/s", "step s", "alloc GiB", "reserved GiB", "GPU used GiB",
           "host RSS GiB", "pinned GiB", "loss first -> last", "to step 1 s", "phases (s from launch)"]  # fmt: skip


def table_row(r: dict) -> list[str]:
    def num(value, fmt):
        return format(value, fmt) if value else "-"

    system = f"{r['system']} [{r['label']}]" if r.get("label") else r["system"]
    return [system, r["gpus"], r["seq_len"], r.get("cpu_threads") or "-", r["exit"], num(r["tokens_per_s"], ",.0f"), num(r["step_s"], ".2f"),
            num(r["alloc_gib"], ".1f"), num(r["reserved_gib"], ".1f"), num(r["gpu_used_gib"], ".1f"),
            num(r["host_gib"], ".1f"), num(r["pinned_gib"], ".1f"), r["loss"], num(r["first_step_s"], ".0f"),
            r["phases"]]  # fmt: skip


def ratios(results: list[dict]) -> list[str]:
    """The issues' ratios between unlabelled rows, and each labelled longloom row against the unlabelled one."""
    lines = []
    done = [r for r in results if r["exit"] == 0]
    by = {(r["system"], r["gpus"], r["seq_len"]): r["tokens_per_s"] for r in done if not r.get("label")}
    for gpus, seq_len in sorted({(r["gpus"], r["seq_len"]) for r in results}):
        for a, b, what in (
            ("longloom", "alst", "target >= 1.5"),
            ("longloom-hf", "longloom", "target >= 0.95"),
        ):
            if by.get((a, gpus, seq_len)) and by.get((b, gpus, seq_len)):
                ratio = by[a, gpus, seq_len] / by[b, gpus, seq_len]
                lines.append(f"- {gpus} GPU(s), {seq_len} tokens: {a} / {b} tokens/s = {ratio:.3f} ({what})")
    for r in done:
        base = by.get((r["system"], r["gpus"], r["seq_len"]))
        if r.get("label") and base:
            lines.append(
                f"- {r['gpus']} GPU(s), {r['seq_len']} tokens: {r['system']} [{r['label']}] / {r['system']} "
                f"tokens/s = {r['tokens_per_s'] / base:.3f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    parser.add_argument("--gpus", type=int, default=2, help="workers (GPUs, or CPU processes without CUDA)")
    parser.add_argument("--seq-lens", default="131072,262144")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, data, run outputs")
    parser.add_argument(
        "--hf-dir", type=Path, help="cache of the HF model folder (default: <out>/hf-<preset>)"
    )
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds per system run")
    parser.add_argument(
        "--launcher",
        choices=["torchrun", "local", "ray"],
        help="longloom's launch.backend (default: local for 1 worker, else torchrun)",
    )
    parser.add_argument("--longloom-override", action="append", default=[], help="extra a.b=v for longloom")
    parser.add_argument(
        "--label",
        help="names a variant (e.g. lasp2h with --longloom-override model.layer_pattern=LLLS): its rows are "
        "compared with the unlabelled rows of the same system, not with ALST",
    )
    parser.add_argument(
        "--alst-cpu-threads",
        type=int,
        help="OMP_NUM_THREADS for ALST's ranks (CPU Adam's threads); default: torchrun's, 1 per rank. "
        "longloom picks its own (launch.cpu_threads auto: the cores / the ranks)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="JSON lines of every row so far (default <out>/results.jsonl); rows of earlier commands that "
        "used the same file join the table, the ratios and --record (one system per command fits 10 min)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: table (and --record) of --results"
    )
    parser.add_argument("--prepare-only", action="store_true", help="build the HF folder and data, then exit")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"--systems {sorted(unknown)} unknown: choose from {', '.join(SYSTEMS)}")
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    if bad := [s for s in seq_lens if s % args.gpus]:
        parser.error(
            f"--seq-lens {bad} must be divisible by --gpus {args.gpus} (Ulysses shards the sequence)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    args.launcher = args.launcher or ("local" if args.gpus == 1 else "torchrun")
    args.results = args.results or args.out / "results.jsonl"
    if args.report_only:
        report(args, [])
        return
    args.hf_dir = (args.hf_dir or Path(f"/tmp/longloom-e2e-hf-{args.preset}")).resolve()
    # One build of DeepSpeed's CPU Adam (~1 min) for every system, run and later command in this Python
    # environment: its own folder (a shared /tmp one was rebuilt whenever another environment used it).
    use_stable_extensions_dir()
    env = {**os.environ, **ENVIRONMENT, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    shape = PRESETS[args.preset]
    if {"longloom-hf", "alst"} & set(systems):
        # A fixed context length keeps one folder for every --seq-lens (it does not change the weights).
        folder, seconds = write_hf_folder(args.hf_dir, shape, max(*seq_lens, 1 << 20))
        print(
            f"HF folder {folder} ({'reused' if not seconds else f'written in {seconds:.0f} s'})", flush=True
        )
    data = {
        seq_len: write_token_folder(
            args.out / f"data-{args.preset}-{seq_len}", seq_len, shape.vocab_size, args.steps + 2
        )
        for seq_len in seq_lens
    }
    if args.prepare_only:
        return
    results = []
    for seq_len in seq_lens:
        for system in systems:
            suffix = f"-{args.label}" if args.label else ""
            run_dir = args.out / f"{system}-{args.gpus}gpu-{seq_len}{suffix}"
            run_dir.mkdir(parents=True, exist_ok=True)
            run_env = env
            if system == "alst":
                command, metrics = alst_command(args, seq_len), None
                run_env = alst_environment(env, args.alst_cpu_threads)
            else:
                command, metrics = longloom_command(args, system, seq_len, data[seq_len], run_dir)
                metrics.unlink(missing_ok=True)
            run = Run(command, run_dir / "output.log", run_env, metrics, args.timeout)
            code = run.run()
            if code != 0:
                print(
                    f"{system} at {seq_len} tokens FAILED (exit {code}); last lines of {run.log}:", flush=True
                )
                print("\n".join("    " + line for line in run.tail[-15:]), flush=True)
            row = summarise(system, seq_len, args.gpus, code, run, args.warmup)
            row |= {"preset": args.preset, "steps_timed": f"{args.warmup + 1}..{args.steps}"}
            row["label"] = args.label
            row["cpu_threads"] = run_env.get("OMP_NUM_THREADS", "1") if system == "alst" else run.cpu_threads
            row["bench_command"] = launch_command()
            results.append(row)
            with args.results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    report(args, results)
    sys.exit(0 if all(r["exit"] == 0 for r in results) else 1)


def report(args, results: list[dict]) -> None:
    """Table and ratios of every row in --results (this command's and earlier ones'), recorded with --record."""
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    rows = rows or results
    table = markdown_table(HEADERS, [table_row(r) for r in rows])
    print(table)
    print("\n".join(ratios(rows)))
    if args.record:
        commands = "\n".join(sorted({f"  - `{r.get('bench_command', '?')}`" for r in rows}))
        what = (
            "End to end, Llama shape of the preset below, ZeRO-3 + CPU Adam, bf16, same tokens (a repeated "
            "random block, every label valid), same weights for longloom-hf and alst; tokens/s and step s are "
            "medians over the timed steps; phases are seconds from launch to the first line marking each.\n\n"
            f"- preset: {', '.join(sorted({r.get('preset', '?') for r in rows}))}; timed steps: "
            f"{', '.join(sorted({r.get('steps_timed', '?') for r in rows}))}\n"
            f"- rows measured by:\n{commands}\n" + "\n".join(ratios(rows))
        )
        append_record("End to end: longloom vs DeepSpeed ALST", what, table, max(r["gpus"] for r in rows))
        print("appended to BENCHMARKS.md")


if __name__ == "__main__":
    main()
