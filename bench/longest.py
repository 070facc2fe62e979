"""The longest sequence that trains 2 steps, longloom vs DeepSpeed ALST, by binary search on one machine.

    python bench/e2e.py --gpus 1 --seq-lens 32768 --out $OUT --prepare-only --systems alst      # 8B HF folder
    python bench/longest.py --gpus 1 --systems longloom --low 131072 --high 1048576 --max-probes 1 \
        --label interleaved-0.5 --longloom-override offload.optimizer=interleaved \
        --longloom-override offload.gpu_share=0.5 --out $OUT --results /tmp/longest.jsonl   # one probe
    python bench/longest.py --results /tmp/longest.jsonl --out $OUT --report-only --record    # the table
    python bench/longest.py --preset tiny --gpus 2 --low 256 --high 2048 --granularity 256 --out /tmp/l  # CPU

Each probe is one run of bench/e2e.py's harness (its own process tree, a timeout, host RSS of the tree
and GPU memory sampled) for `--steps` (2) steps at one length. The outcome of a probe:
- fits: exit 0 and every step's metrics written;
- does not fit: GPU out of memory, host out of memory (a worker killed by SIGKILL / bad_alloc / Ray's
  memory monitor), longloom's preflight refusing the memory estimate, or the --timeout (a time limit:
  its failure kind says "timeout", not memory);
- error: anything else (a bug, a bad setting): the search of that setting stops and says so.
The lengths are low, low + granularity, ..., high; the search bisects between the longest length that fits
and the shortest that does not (assumed monotonic: a fit above a failure is reported as inconsistent).
Every probe is appended to --results at once, so a search resumes where the last command stopped
(the GPU machine allows 10 minutes a command: --max-probes 1 per command); each command prints the
probes that remain. A setting is (system, GPUs, preset, --label); its overrides are recorded beside it.
On a lent GPU machine whose $OUT comes back empty each command, keep --results in the working tree (it
travels with it) and copy it to $OUT at the end of each command, then back into the tree here.
Time bounds what is measured too: an 8B probe spends ~3-4 minutes before step 1 (model, engine, first
step), so with a 10-minute command a long sequence can fail by --timeout before memory runs out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO_ROOT, append_record, launch_command, markdown_table
from bench.e2e import ENVIRONMENT, Run, alst_command, alst_environment, longloom_command, summarise
from bench.e2e_inputs import PRESETS, write_hf_folder, write_token_folder
from longloom.runtime.extensions import use_stable_extensions_dir

SYSTEMS = ("longloom", "alst")
FITS, NO_FIT, ERROR = "fits", "does not fit", "error"
# (failure kind, pattern in the log); the first that matches names a failed run.
FAILURE_KINDS = [
    (
        "refused: memory estimate",
        re.compile(r"estimated GPU memory per worker|pinned host memory needed: .* exceeds"),
    ),
    ("GPU OOM", re.compile(r"CUDA out of memory|OutOfMemoryError: CUDA|CUBLAS_STATUS_ALLOC_FAILED")),
    (
        "host OOM",
        re.compile(
            r"std::bad_alloc|Cannot allocate memory|\bMemoryError\b|ray\.exceptions\.OutOfMemoryError"
            r"|running low on memory|Signal 9 \(SIGKILL\)|exitcode\s*:\s*-9\b|[Oo]ut of memory: Killed process"
        ),
    ),
    ("CUDA OOM (pinned or driver)", re.compile(r"CUDA error: out of memory|cudaErrorMemoryAllocation")),
]


def classify(code: int, steps_done: int, steps: int, log_text: str) -> tuple[str, str]:
    """(outcome, failure kind) of one probe from its exit code, metrics rows and log."""
    if code == 0 and steps_done >= steps:
        return FITS, ""
    if code == 124:
        return NO_FIT, "timeout"
    for kind, pattern in FAILURE_KINDS:
        if pattern.search(log_text):
            return NO_FIT, kind
    if code in (-9, 137):  # SIGKILL from outside the harness: the kernel's OOM killer
        return NO_FIT, "host OOM (SIGKILL)"
    if code == 0:
        return ERROR, f"exit 0 after {steps_done} of {steps} steps"
    return ERROR, f"exit {code}"


def lengths(low: int, high: int, granularity: int) -> list[int]:
    if low <= 0 or high < low or granularity <= 0:
        raise ValueError(f"need 0 < --low <= --high and --granularity > 0; got {low}, {high}, {granularity}")
    return list(range(low, high + 1, granularity))


def search_state(candidates: list[int], outcomes: dict[int, str], low_first: bool = False) -> dict:
    """Bisection state: longest fit, first failure, next probe, probes left at most, inconsistency.

    low_first: probe the shortest length before bisecting (one probe settles a setting that never fits).
    """
    fits = [n for n in candidates if outcomes.get(n) == FITS]
    fails = [n for n in candidates if outcomes.get(n) == NO_FIT]
    errors = [n for n in candidates if outcomes.get(n) == ERROR]
    longest = max(fits, default=None)
    first_fail = min((n for n in fails if longest is None or n > longest), default=None)
    inconsistent = [n for n in fails if longest is not None and n < longest]
    lo = -1 if longest is None else candidates.index(longest)
    hi = len(candidates) if first_fail is None else candidates.index(first_fail)
    open_count = hi - lo - 1
    probe = None if errors or open_count <= 0 else candidates[(lo + hi) // 2]
    if probe is not None and low_first and candidates[0] not in outcomes:
        probe = candidates[0]
    return {
        "longest": longest,
        "first_fail": first_fail,
        "next": probe,
        "left": 0 if probe is None else math.ceil(math.log2(open_count + 1)),
        "inconsistent": inconsistent,
        "errors": errors,
    }


def setting_key(row: dict) -> tuple:
    return row["system"], row["gpus"], row["preset"], row["label"]


def run_probe(args, system: str, seq_len: int, env: dict) -> dict:
    """One run at seq_len: the e2e harness's row plus outcome and failure kind."""
    run_dir = args.out / f"{system}-{args.gpus}gpu-{args.label}-{seq_len}"
    run_dir.mkdir(parents=True, exist_ok=True)
    shape = PRESETS[args.preset]
    if system == "alst":
        command, metrics = alst_command(args, seq_len), None
        env = alst_environment(env, args.alst_cpu_threads)
    else:
        data = write_token_folder(
            args.out / f"data-{args.preset}-{seq_len}", seq_len, shape.vocab_size, args.steps + 2
        )
        command, metrics = longloom_command(args, system, seq_len, data, run_dir)
        metrics.unlink(missing_ok=True)
    run = Run(command, run_dir / "output.log", env, metrics, args.timeout)
    code = run.run()
    row = summarise(system, seq_len, args.gpus, code, run, warmup=0)
    outcome, kind = classify(code, len(run.metrics), args.steps, run.log.read_text(errors="replace"))
    if outcome != FITS:
        print(f"{system} at {seq_len}: {outcome} ({kind}); last lines of {run.log}:", flush=True)
        print("\n".join("    " + line for line in run.tail[-12:]), flush=True)
    settings = (
        f"ALST recipe (bench/e2e_alst.py), OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '1 (torchrun)')}"
    )
    if system == "longloom":  # bench/e2e.py's config, then the overrides
        base = (
            "e2e.py config (offload.activations=true offload.optimizer=cpu model.mlp_tiles=auto zero_stage=3)"
        )
        settings = " ".join([base, *args.longloom_override])
    alloc = env.get("PYTORCH_CUDA_ALLOC_CONF")
    return row | {
        "outcome": outcome, "kind": kind, "preset": args.preset, "label": args.label,
        "settings": settings + (f"; PYTORCH_CUDA_ALLOC_CONF={alloc}" if alloc else ""),
        "timeout_s": args.timeout, "grid": [args.low, args.high, args.granularity],
        "bench_command": launch_command(),
    }  # fmt: skip


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_rows(rows: list[dict]) -> list[dict]:
    """One summary per setting: the search state over the lengths of its latest probe's grid."""
    by_setting: dict[tuple, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(setting_key(row), []).append(row)
    summaries = []
    for key, probes in by_setting.items():
        latest = {r["seq_len"]: r for r in probes}  # a re-probe replaces the earlier outcome
        grid = lengths(*probes[-1]["grid"])
        state = search_state(grid, {n: r["outcome"] for n, r in latest.items()})
        at_longest = latest.get(state["longest"], {})
        failing = latest.get(state["first_fail"], {})
        summaries.append(
            {"key": key, "state": state, "at_longest": at_longest, "failing": failing, "probes": probes}
        )
    return summaries


HEADERS = ["system", "GPUs", "setting", "longest fitting", "first failing", "failure kind", "step s at longest",
           "GPU used GiB", "alloc GiB", "host RSS GiB", "pinned GiB", "host RSS at failure", "probes", "search"]  # fmt: skip


def table_row(summary: dict) -> list[str]:
    def num(value):
        return format(value, ".1f") if value else "-"

    (system, gpus, _preset, label), state = summary["key"], summary["state"]
    best, failing = summary["at_longest"], summary["failing"]
    if state["errors"]:
        search = f"stopped: error at {state['errors']} (see the log)"
    elif state["inconsistent"]:
        search = f"inconsistent: fails at {state['inconsistent']} below a fit"
    elif state["next"] is not None:
        search = f"open: next {state['next']}, <= {state['left']} probe(s) left"
    else:
        search = "done"
    grid = summary["probes"][-1]["grid"]
    longest = state["longest"] or f"none >= {grid[0]}"
    settings = (
        f"{label}: {best.get('settings') or failing.get('settings') or summary['probes'][-1]['settings']}"
    )
    return [system, gpus, settings, longest, state["first_fail"] or ("-" if state["next"] else f"none <= {grid[1]}"), failing.get("kind", "-"),
            num(best.get("step_s")), num(best.get("gpu_used_gib")), num(best.get("alloc_gib")),
            num(best.get("host_gib")), num(best.get("pinned_gib")), num(failing.get("host_gib")),
            len(summary["probes"]), search]  # fmt: skip


def report(args) -> None:
    rows = load_rows(args.results)
    if not rows:
        print(f"no probes in {args.results} yet")
        return
    summaries = summary_rows(rows)
    table = markdown_table(HEADERS, [table_row(s) for s in summaries])
    print(table)
    lines = []
    for gpus in sorted({s["key"][1] for s in summaries}):
        best = {
            system: max(
                (s["state"]["longest"] or 0 for s in summaries if s["key"][:2] == (system, gpus)), default=0
            )
            for system in SYSTEMS
        }
        open_ended = [
            s["key"][0]
            for s in summaries
            if s["key"][1] == gpus and s["state"]["longest"] and not s["state"]["first_fail"]
        ]
        if best["longloom"] and best["alst"]:
            ratio = best["longloom"] / best["alst"]
            bound = (
                f" (no failure up to --high for {', '.join(open_ended)}: a bound, not the longest)"
                if open_ended
                else ""
            )
            lines.append(
                f"- {gpus} GPU(s): longloom / alst longest = {ratio:.2f} (issue 18 target >= 1.5){bound}"
            )
        else:
            lines.append(
                f"- {gpus} GPU(s): longest longloom {best['longloom'] or '-'}, alst {best['alst'] or '-'}"
            )
    print("\n".join(lines))
    if args.record:
        commands = "\n".join(sorted({f"  - `{r.get('bench_command', '?')}`" for r in rows}))
        timeouts = ", ".join(sorted({str(r.get("timeout_s")) for r in rows}))
        what = (
            f"Longest sequence that trains {sorted({r['steps'] for r in rows if r['outcome'] == FITS} or {2})} "
            "steps (exit 0, every step's metrics), binary search over the lengths low..high by the granularity; "
            "model: Llama shape of the preset, ZeRO-3, bf16, every label valid (bench/e2e_inputs.py). A "
            "failure is GPU OOM, host OOM, longloom's preflight refusing its memory estimate, or the per-probe "
            f"timeout ({timeouts} s: a time limit, not memory). Memory columns: peaks at the longest fitting "
            "length (GPU used per nvidia-smi, torch's max allocated, host RSS of the whole process tree, "
            "torch's pinned host pool); host RSS at failure: the peak sampled before the failing run ended.\n\n"
            f"- presets: {', '.join(sorted({r['preset'] for r in rows}))}\n- probes run by:\n{commands}\n"
            + "\n".join(lines)
        )
        append_record(
            "Longest sequence: longloom vs DeepSpeed ALST", what, table, max(r["gpus"] for r in rows)
        )
        print("appended to BENCHMARKS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    parser.add_argument("--gpus", type=int, default=1, help="workers (GPUs, or CPU processes without CUDA)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--low", type=int, default=32768)
    parser.add_argument("--high", type=int, default=1048576)
    parser.add_argument("--granularity", type=int, default=32768)
    parser.add_argument(
        "--low-first",
        action="store_true",
        help="probe --low first (a setting that never fits costs one probe)",
    )
    parser.add_argument("--steps", type=int, default=2, help="steps a fitting run must finish")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds per probe (then: does not fit)")
    parser.add_argument(
        "--max-probes", type=int, default=0, help="probes per system in this command (0 = all)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, data, run outputs")
    parser.add_argument(
        "--hf-dir", type=Path, help="HF folder for alst (default /tmp/longloom-e2e-hf-<preset>)"
    )
    parser.add_argument(
        "--launcher", choices=["torchrun", "local", "ray"], help="default: local for 1, else torchrun"
    )
    parser.add_argument(
        "--longloom-override",
        action="append",
        help="a.b=v for longloom (default: offload.activations=true offload.optimizer=cpu model.mlp_tiles=auto, "
        "bench/e2e.py's settings; give e.g. offload.optimizer=interleaved offload.gpu_share=0.5 "
        "offload.activations=0.5 model.mlp_tiles=32)",
    )
    parser.add_argument("--label", default="default", help="name of this setting in the results and table")
    parser.add_argument(
        "--alst-cpu-threads", type=int, help="OMP_NUM_THREADS for ALST's ranks (default: torchrun's 1)"
    )
    parser.add_argument(
        "--alloc-conf",
        default="expandable_segments:True",
        help="PYTORCH_CUDA_ALLOC_CONF for both systems ('' leaves it unset; longloom's workers then set this)",
    )
    parser.add_argument(
        "--results", type=Path, help="JSON lines of every probe (default <out>/longest.jsonl)"
    )
    parser.add_argument("--report-only", action="store_true", help="run nothing: the table of --results")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"--systems {sorted(unknown)} unknown: choose from {', '.join(SYSTEMS)}")
    if args.granularity % args.gpus or args.low % args.gpus:
        parser.error(
            f"--low and --granularity must be divisible by --gpus {args.gpus} (SP shards the sequence)"
        )
    try:
        candidates = lengths(args.low, args.high, args.granularity)
    except ValueError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    args.results = args.results or args.out / "longest.jsonl"
    args.longloom_override = args.longloom_override or []
    args.launcher = args.launcher or ("local" if args.gpus == 1 else "torchrun")
    if args.report_only:
        report(args)
        return
    args.hf_dir = (args.hf_dir or Path(f"/tmp/longloom-e2e-hf-{args.preset}")).resolve()
    use_stable_extensions_dir()  # one build of the ops for every probe (bench/e2e.py)
    env = {**os.environ, **ENVIRONMENT, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    if args.alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    if "alst" in systems:  # the folder bench/e2e.py writes (same max positions: one folder for both)
        folder, seconds = write_hf_folder(args.hf_dir, PRESETS[args.preset], max(args.high, 1 << 20))
        print(
            f"HF folder {folder} ({'reused' if not seconds else f'written in {seconds:.0f} s'})", flush=True
        )
    started = time.perf_counter()
    for system in systems:
        key = (system, args.gpus, args.preset, args.label)
        for probe_count in range(10**6):
            probes = [r for r in load_rows(args.results) if setting_key(r) == key]
            state = search_state(candidates, {r["seq_len"]: r["outcome"] for r in probes}, args.low_first)
            if state["next"] is None:
                print(f"{system} ({args.label}, {args.gpus} GPU(s)): search done: longest {state['longest']}, "
                      f"first failing {state['first_fail']}", flush=True)  # fmt: skip
                break
            if args.max_probes and probe_count >= args.max_probes:
                print(f"{system} ({args.label}, {args.gpus} GPU(s)): next probe {state['next']}, at most "
                      f"{state['left']} probe(s) left; run this command again to continue", flush=True)  # fmt: skip
                break
            print(f"{system} ({args.label}): probing {state['next']} tokens ({state['left']} probe(s) left at most, "
                  f"{time.perf_counter() - started:.0f} s into this command)", flush=True)  # fmt: skip
            row = run_probe(args, system, state["next"], env)
            with args.results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    report(args)


if __name__ == "__main__":
    main()
