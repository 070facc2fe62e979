"""Checkpoint cost on one GPU: time the training loop is blocked, step time, conversion time.

    python bench/checkpoint.py [--record]                    # 1.1B Llama, bf16, ~8-10 minutes on one H100
    python bench/checkpoint.py --parts conversion --record   # one part: blocked | every | conversion
    python bench/checkpoint.py --preset tiny --dir /tmp/x    # CPU smoke run (timings meaningless)
    python bench/checkpoint.py --preset small --parts flush  # CPU: background flush throughput
    python bench/checkpoint.py --preset small --parts flush --checksums on,off --dir /dev/shm/ll /tmp/ll
                                                            # checksum cost of the flush (no GPU needed)

Setup: a longloom Llama (preset 1b: hidden 2048, 20 layers, 16 heads, 8 KV heads, SwiGLU 5632,
vocab 32000 = 1.1B parameters) trained by DeepSpeed as the trainer does (bf16, ZeRO-1 on one rank,
DeepSpeed AdamW: fp32 master weights and two fp32 moments), sequence 8192 x micro batch 2, files
under --dir (local disk; everything is deleted afterwards). The state saved is the same for every
method: bf16 weights (not for ours: they are the fp32 masters rounded) + fp32 masters + exp_avg +
exp_avg_sq, about 14 bytes per parameter.

Blocked time per checkpoint (the time training cannot proceed), one checkpoint at a time:
- torch.save: synchronous `torch.save` of the state dict (GPU tensors, serialised via host).
- dcp.save: `torch.distributed.checkpoint.save`, synchronous.
- dcp.async_save: the time `async_save` takes to return (it stages the state to host memory
  first); the upload finishes in the background.
- deepspeed: `engine.save_checkpoint`, synchronous.
- ours: `LazyAsyncCheckpointer.save()` plus how much longer the next training step takes than a
  step without checkpoint (the snapshot copy overlaps forward/backward; the training stream only
  waits for it before the optimizer step). The flush to disk (with fsync) overlaps later steps.
  The first save pins the host pool (excluded: one-time).
Step time (median) with a checkpoint after every step: none, ours, dcp.async_save (waiting for
the previous upload before the next save, as required to bound memory). When the flush takes
longer than a step, this is bound by the disk, for every method.
Conversion of the same DeepSpeed checkpoint to DeepSpeed's universal layout: `python -m
deepspeed.checkpoint.ds_to_universal` (--num_extract_workers 8 --num_merge_workers 4) vs
`longloom ckpt convert --to deepspeed-universal` (8 threads); and ours -> our universal layout.

Flush throughput (part `flush`): `save()` + `wait()` repeated, one checkpoint at a time; the
background phase that writes the rank's file (pwrite + fsync) and computes the per-tensor
checksums (xxh3_64, overlapped with the write) is timed, and bytes written / its seconds is the
throughput (issue 14: checksums may cost at most 5% of it).

Checksum cost (part `flush` with `--checksums on,off`): no engine, no GPU; the host buffer (pinned
when CUDA is present) has the layout a single rank's checkpoint of the preset has (every parameter's
fp32 master, exp_avg, exp_avg_sq), and the flush itself (`write_tensor_file`: pwrite on 4 threads +
fsync) is timed with and without per-tensor checksums in alternating pairs (on-off, off-on, ...)
in one process, under each `--dir` (e.g. /dev/shm, where the write is a memory copy and hashing
costs most, and a disk folder). The loss is 1 - median over pairs of (time off / time on).

Targets (issue 7): ours blocked <= 2% of torch.save; conversion >= 3x faster than ds_to_universal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/checkpoint.py` finds longloom

import argparse
import logging
import shutil
import statistics
import subprocess
import time

import torch

from bench.common import append_record, markdown_table
from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer
from longloom.checkpointing.tensor_file import TensorFileLayout, write_tensor_file
from longloom.config import load_config
from longloom.conversion.convert import convert_checkpoint
from longloom.launch.env import device_for_rank, free_port, init_distributed
from longloom.models.llama import LlamaModel
from longloom.parallel import ParallelDims
from longloom.training.trainer import deepspeed_config, lr_lambda, resolve_dtype

PRESETS = {
    "1b": ["model.vocab_size=32000", "model.hidden=2048", "model.layers=20", "model.heads=16", "model.kv_heads=8",
           "model.intermediate=5632", "data.seq_len=8192", "train.micro_batch_size=2"],
    "small": ["model.vocab_size=32000", "model.hidden=512", "model.layers=4", "model.heads=8", "model.kv_heads=4",
              "data.seq_len=128", "train.micro_batch_size=1", "train.dtype=fp32"],
    "tiny": ["model.vocab_size=300", "model.hidden=64", "model.layers=2", "model.heads=4", "model.kv_heads=2",
             "data.seq_len=128", "train.micro_batch_size=2", "train.dtype=fp32"],
}  # fmt: skip


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Bench:
    def __init__(self, preset: str, work: Path):
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        if torch.cuda.is_available() and not torch.distributed.is_initialized():
            # DCP's async_save stages through a CPU backend: give the group gloo beside NCCL.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            for name in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(name, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            torch.distributed.init_process_group(
                "cpu:gloo,cuda:nccl", rank=0, world_size=1, device_id=device_for_rank()
            )
        init_distributed()
        self.device = device_for_rank()
        self.cfg = load_config(
            None, [*PRESETS[preset], "train.zero_stage=1", "model.activation_checkpointing=true"]
        )
        dtype = resolve_dtype(self.cfg, self.device)
        torch.manual_seed(0)
        model = LlamaModel(self.cfg.model, ParallelDims.build(dp=1, ulysses=1, ring=1))
        self.params = model.num_parameters()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=deepspeed_config(self.cfg, dtype),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg)),
            dist_init_required=False,
        )
        batch, seq = self.cfg.train.micro_batch_size, self.cfg.data.seq_len
        self.tokens = torch.randint(0, self.cfg.model.vocab_size, (batch, seq + 1), device=self.device)
        self.positions = torch.arange(seq, device=self.device).expand(batch, seq)
        self.work = work
        self.step_number = 0

    def checkpoint_bytes(self) -> int:
        """Bytes of a full DeepSpeed checkpoint of this state: bf16 weights + fp32 master and two moments."""
        return self.params * (2 + 3 * 4)

    def forward_backward(self) -> None:
        loss, _ = self.engine(self.tokens[:, :-1], self.positions, labels=self.tokens[:, 1:])
        self.engine.backward(loss)

    def step(self, checkpointer: LazyAsyncCheckpointer | None = None) -> None:
        self.forward_backward()
        if checkpointer is not None:
            checkpointer.wait_for_snapshot()
        self.engine.step()
        self.step_number += 1

    def timed_steps(self, count: int, checkpointer: LazyAsyncCheckpointer | None = None) -> list[float]:
        times = []
        for _ in range(count):
            sync()
            begin = time.perf_counter()
            self.step(checkpointer)
            sync()
            times.append(time.perf_counter() - begin)
        return times

    def state(self) -> dict:
        """Module weights + fp32 masters + Adam moments, the tensors each baseline saves."""
        base = getattr(self.engine.optimizer, "optimizer", None) or self.engine.optimizer
        masters = [p for group in base.param_groups for p in group["params"]]
        return {
            "model": self.engine.module.state_dict(),
            "master": {str(i): p.detach() for i, p in enumerate(masters)},
            "optimizer": {
                str(i): {k: v for k, v in base.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
                for i, p in enumerate(masters)
            },
        }


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def blocked_baselines(bench: Bench, rows: list, sizes: dict) -> None:
    import torch.distributed.checkpoint as dcp

    def measure(name: str, fn, out: Path) -> None:
        sync()
        begin = time.perf_counter()
        pending = fn(out)
        sync()
        rows.append([name, time.perf_counter() - begin])
        if pending is not None:  # async: the upload must finish before the files are counted
            begin = time.perf_counter()
            result = getattr(pending, "upload_completion", pending)
            result.result()
            rows[-1].append(f"upload finished {time.perf_counter() - begin:.1f} s later")
        sizes[name] = folder_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        print(f"  {name}: {rows[-1][1]:.2f} s blocked", flush=True)

    def torch_save(out: Path) -> None:
        torch.save(bench.state(), fresh(out) / "state.pt")

    def dcp_save(out: Path) -> None:
        dcp.save(bench.state(), checkpoint_id=fresh(out))

    def dcp_async_save(out: Path):
        return dcp.async_save(bench.state(), checkpoint_id=fresh(out))

    def deepspeed_save(out: Path) -> None:
        bench.engine.save_checkpoint(str(fresh(out)), tag="global_step1")

    measure("torch.save", torch_save, bench.work / "torch")
    measure("dcp.save", dcp_save, bench.work / "dcp")
    measure("dcp.async_save", dcp_async_save, bench.work / "dcpa")
    measure("deepspeed", deepspeed_save, bench.work / "ds")


def ours_blocked(bench: Bench, rows: list, sizes: dict, baseline_step: float) -> None:
    root = fresh(bench.work / "ours")
    checkpointer = LazyAsyncCheckpointer(root, keep=1)
    checkpointer.save(step=bench.step_number, engine=bench.engine)  # pins the host pool (one-time)
    bench.step(checkpointer)
    checkpointer.wait()
    blocked = []
    for _ in range(2):
        sync()
        begin = time.perf_counter()
        checkpointer.save(step=bench.step_number, engine=bench.engine)
        save_call = time.perf_counter() - begin
        next_step = bench.timed_steps(1, checkpointer)[0]
        blocked.append(save_call + max(0.0, next_step - baseline_step))
        checkpointer.wait()
    timings = checkpointer.last_timings
    rows.append(
        [
            "ours (lazy async)",
            statistics.median(blocked),
            (
                f"save() {timings['save_call'] * 1e3:.1f} ms; snapshot {timings['snapshot']:.2f} s and "
                f"write+fsync {timings['write']:.1f} s in the background"
            ),
        ]
    )
    sizes[rows[-1][0]] = folder_bytes(root / f"step-{bench.step_number - 1}")
    checkpointer.close()
    shutil.rmtree(root, ignore_errors=True)
    print(f"  ours: {rows[-1][1] * 1e3:.1f} ms blocked", flush=True)


def every_step(bench: Bench, steps: int) -> list:
    import torch.distributed.checkpoint as dcp

    rows = [["no checkpoint", statistics.median(bench.timed_steps(steps))]]
    root = fresh(bench.work / "ours-every")
    checkpointer = LazyAsyncCheckpointer(root, keep=1)
    times = []
    for _ in range(steps):
        sync()
        begin = time.perf_counter()
        bench.step(checkpointer)
        checkpointer.save(step=bench.step_number, engine=bench.engine)
        sync()
        times.append(time.perf_counter() - begin)
    checkpointer.close()
    rows.append(["ours, checkpoint every step", statistics.median(times[1:])])
    shutil.rmtree(root, ignore_errors=True)

    pending, times = None, []
    for index in range(steps):
        sync()
        begin = time.perf_counter()
        bench.step()
        if pending is not None:
            getattr(pending, "upload_completion", pending).result()
        pending = dcp.async_save(bench.state(), checkpoint_id=fresh(bench.work / f"dcp-every-{index % 2}"))
        sync()
        times.append(time.perf_counter() - begin)
    getattr(pending, "upload_completion", pending).result()
    rows.append(["dcp.async_save, checkpoint every step", statistics.median(times[1:])])
    for index in range(2):
        shutil.rmtree(bench.work / f"dcp-every-{index}", ignore_errors=True)
    return rows


def flush_throughput(bench: Bench, repeats: int) -> list:
    """Seconds of the background write phase (write + fsync + checksums) per checkpoint, and GB/s."""
    root = fresh(bench.work / "ours-flush")
    checkpointer = LazyAsyncCheckpointer(root, keep=1)
    checkpointer.save(step=1, engine=bench.engine)  # pins / allocates the host pool (one-time)
    checkpointer.wait()
    seconds, checksum_seconds, written = [], [], 0
    for step in range(2, repeats + 2):
        checkpointer.save(step=step, engine=bench.engine)
        checkpointer.wait()
        seconds.append(checkpointer.last_timings["write"])
        checksum_seconds.append(checkpointer.last_timings.get("checksum", float("nan")))
        written = folder_bytes(root / f"step-{step}")
    checkpointer.close()
    shutil.rmtree(root, ignore_errors=True)
    median = statistics.median(seconds)
    print(f"  flush: {written / 2**20:.0f} MiB in {median:.3f} s (median of {repeats})", flush=True)
    return [
        [
            "ours: background flush of one rank's file",
            f"{written / 2**20:.0f} MiB",
            f"{median:.3f} s",
            f"{written / median / 1e9:.2f} GB/s",
            f"{statistics.median(checksum_seconds):.3f} s",
            f"min {min(seconds):.3f} s, max {max(seconds):.3f} s over {repeats}",
        ]
    ]


def checkpoint_layout(preset: str) -> TensorFileLayout:
    """The file layout of a one-rank checkpoint of `preset`: fp32 master + two Adam moments per parameter."""
    cfg = load_config(None, PRESETS[preset])
    init_distributed()  # a one-process group: the model's parallel dims need one
    dims = ParallelDims.build(dp=1, ulysses=1, ring=1)
    with torch.device("meta"):  # shapes only: nothing allocated
        model = LlamaModel(cfg.model, dims)
    entries = [
        (f"{name}:{state}:0", torch.float32, (parameter.numel(),))
        for name, parameter in model.named_parameters()
        for state in ("fp32", "exp_avg", "exp_avg_sq")
    ]
    return TensorFileLayout(entries, metadata={"step": 1, "rank": 0})


def timed_flush(
    path: Path, layout: TensorFileLayout, pool: torch.Tensor, checksums: bool, hashing: list
) -> float:
    """Seconds of one flush (write_tensor_file); appends its hashing seconds to `hashing`."""
    timings = {}
    begin = time.perf_counter()
    write_tensor_file(path, layout, pool, timings=timings, checksums=checksums)
    elapsed = time.perf_counter() - begin
    if "checksum" in timings:
        hashing.append(timings["checksum"])
    path.unlink()  # both modes write a new file (tmpfs frees the pages), outside the timing
    return elapsed


def checksum_cost(preset: str, directories: list[Path], modes: list[str], pairs: int) -> list:
    """Flush seconds with and without checksums, alternating in pairs, per directory; rows for a table."""
    layout = checkpoint_layout(preset)
    pinned = torch.cuda.is_available()
    pool = torch.empty(layout.data_bytes, dtype=torch.uint8, pin_memory=pinned)
    pool.random_(0, 256)
    print(
        f"  flush of {layout.data_bytes / 2**20:.0f} MiB ({len(layout.slots)} tensors, "
        f"{'pinned' if pinned else 'pageable'} host buffer), {pairs} pairs per folder",
        flush=True,
    )
    rows = []
    for directory in directories:
        work = fresh(directory / "longloom-flush-bench")  # only this subfolder is deleted afterwards
        path = work / "flush.safetensors"
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        hashing: list[float] = []
        for mode in modes:  # warm-up: page cache, thread start-up
            timed_flush(path, layout, pool, mode == "on", hashing)
        hashing.clear()
        for index in range(pairs):
            for mode in modes if index % 2 == 0 else modes[::-1]:
                seconds[mode].append(timed_flush(path, layout, pool, mode == "on", hashing))
        shutil.rmtree(work, ignore_errors=True)
        ratios = [off / on for on, off in zip(seconds["on"], seconds["off"])]  # throughput on / off
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        loss = 100 * (1 - statistics.median(ratios))
        rates = {mode: layout.file_bytes / statistics.median(seconds[mode]) / 1e9 for mode in modes}
        rows.append(
            [
                str(directory),
                f"{rates['off']:.2f} GB/s",
                f"{rates['on']:.2f} GB/s",
                f"{statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})",
                f"{loss:.1f}%",
                f"{statistics.median(hashing):.3f} s" if hashing else "",
                "yes" if loss <= 5 else "NO",
            ]
        )
        print(
            f"  {directory}: off {rates['off']:.2f} GB/s, on {rates['on']:.2f} GB/s, loss {loss:.1f}%",
            flush=True,
        )
    return rows


def conversions(bench: Bench, universal: bool) -> list:
    source_root = fresh(bench.work / "conv-ds")
    bench.engine.save_checkpoint(str(source_root), tag="global_step1")
    source = source_root / "global_step1"
    rows = []
    begin = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
         "--output_folder", str(bench.work / "conv-theirs" / "global_step1"), "--inject_missing_state",
         "--num_extract_workers", "8", "--num_merge_workers", "4"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    theirs = time.perf_counter() - begin
    rows.append(["ds_to_universal (DeepSpeed ZeRO-1 -> DeepSpeed universal)", theirs, "1.0x"])
    shutil.rmtree(bench.work / "conv-theirs", ignore_errors=True)
    print(f"  ds_to_universal: {theirs:.1f} s", flush=True)
    begin = time.perf_counter()
    convert_checkpoint(
        source, bench.work / "conv-ours" / "global_step1", to="deepspeed-universal", progress=False
    )
    ours = time.perf_counter() - begin
    rows.append(["longloom convert --to deepspeed-universal (same source)", ours, f"{theirs / ours:.1f}x"])
    shutil.rmtree(bench.work / "conv-ours", ignore_errors=True)
    shutil.rmtree(source_root, ignore_errors=True)
    print(f"  ours: {ours:.1f} s", flush=True)

    if universal:
        root = fresh(bench.work / "conv-ours-src")
        checkpointer = LazyAsyncCheckpointer(root, keep=1, asynchronous=False)
        checkpointer.save(step=bench.step_number, engine=bench.engine)
        checkpointer.close()
        begin = time.perf_counter()
        convert_checkpoint(root, bench.work / "conv-universal", to="universal", progress=False)
        rows.append(
            ["longloom convert --to universal (from our checkpoint)", time.perf_counter() - begin, ""]
        )
        shutil.rmtree(bench.work / "conv-universal", ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows


PARTS = ("blocked", "every", "conversion", "flush")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument(
        "--dir",
        type=Path,
        nargs="+",
        default=[Path("/tmp/longloom-checkpoint-bench")],
        help="work folder (deleted afterwards); with --checksums: one comparison per folder, each in a "
        "subfolder longloom-flush-bench (only that is deleted)",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per step-time measurement")
    parser.add_argument("--flush-repeats", type=int, default=9, help="checkpoints timed by part `flush`")
    parser.add_argument(
        "--checksums",
        type=lambda text: text.split(","),
        help="on,off: part `flush` compares the flush with and without checksums (no engine, no GPU)",
    )
    parser.add_argument("--pairs", type=int, default=20, help="with --checksums: on/off pairs per folder")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="blocked time, step time, conversion, flush throughput",
    )
    parser.add_argument(
        "--universal", action="store_true", help="also time our checkpoint -> our universal layout"
    )
    parser.add_argument("--record", action="store_true", help="append each table to BENCHMARKS.md when done")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.checksums is not None:
        if sorted(args.checksums) != ["off", "on"] or args.parts != ["flush"] or args.pairs < 1:
            parser.error(
                f"--checksums {','.join(args.checksums)} --parts {' '.join(args.parts)} --pairs {args.pairs}: "
                "use --checksums on,off (or off,on) with --parts flush and --pairs >= 1"
            )
        checksum_table(args, started)
        return
    args.dir = args.dir[0]
    bench = Bench(args.preset, fresh(args.dir))
    print(
        f"model: {bench.params / 1e9:.2f}B parameters, preset {args.preset}, files under {args.dir}",
        flush=True,
    )
    what = (
        f"Checkpointing a {bench.params / 1e9:.2f}B-parameter Llama (preset {args.preset}, bf16, ZeRO-1 on one "
        f"rank, seq {bench.cfg.data.seq_len} x micro {bench.cfg.train.micro_batch_size}) to local disk "
        f"({args.dir}). See bench/checkpoint.py for what each row measures."
    )

    def report(title: str, table: str) -> None:
        """Print, and record at once: a later part running out of time must not lose this one."""
        print(table, flush=True)
        if args.record:
            append_record(f"Checkpoints: {title}", what, table, 1)

    try:
        bench.timed_steps(2)  # warm-up
        baseline = statistics.median(bench.timed_steps(args.steps))
        print(f"step without checkpoint: {baseline:.3f} s", flush=True)
        if "blocked" in args.parts:
            blocked, sizes = [], {}
            blocked_baselines(bench, blocked, sizes)
            ours_blocked(bench, blocked, sizes, baseline)
            reference = blocked[0][1]
            rows = [
                [row[0], f"{row[1]:.3f} s", f"{100 * row[1] / reference:.2f}%", f"{sizes[row[0]] / 2**30:.1f} GiB",
                 row[2] if len(row) > 2 else ""]
                for row in blocked
            ]  # fmt: skip
            headers = ["method", "blocked per checkpoint", "% of torch.save", "written", "notes"]
            report("time the training loop is blocked", markdown_table(headers, rows))
        if "every" in args.parts:
            step_rows = every_step(bench, args.steps)
            rows = [[name, f"{value:.3f} s", f"{value / step_rows[0][1]:.2f}x"] for name, value in step_rows]
            report(
                "step time with a checkpoint every step",
                markdown_table(["training loop", "median step time", "vs no checkpoint"], rows),
            )
        if "flush" in args.parts:
            headers = ["what", "written", "median flush", "throughput", "checksums (overlapped)", "spread"]
            report(
                "background flush throughput",
                markdown_table(headers, flush_throughput(bench, args.flush_repeats)),
            )
        if "conversion" in args.parts:
            # The DeepSpeed checkpoint plus ds_to_universal's temporary and final copies (~3x its size).
            needed = 3.2 * bench.checkpoint_bytes()
            free = shutil.disk_usage(args.dir).free
            if free < needed:
                raise SystemExit(
                    f"conversion: {free / 2**30:.0f} GiB free under {args.dir}, it needs ~{needed / 2**30:.0f} GiB; "
                    "pass --dir on a larger disk"
                )
            rows = [[a, f"{b:.1f} s", c] for a, b, c in conversions(bench, args.universal)]
            report(
                "conversion to DeepSpeed's universal layout",
                markdown_table(["conversion", "time", "speed-up"], rows),
            )
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"total bench time {time.perf_counter() - started:.0f} s")


def checksum_table(args, started: float) -> None:
    headers = [
        "folder",
        "flush, no checksums",
        "flush, checksums",
        "throughput on/off",
        "loss",
        "hashing (thread-summed)",
        "within 5%",
    ]
    table = markdown_table(headers, checksum_cost(args.preset, args.dir, args.checksums, args.pairs))
    print(table, flush=True)
    if args.record:
        what = (
            f"Background flush of a one-rank checkpoint of preset {args.preset} (write_tensor_file, 4 threads, "
            f"fsync) with vs without per-tensor xxh3_64 checksums, {args.pairs} alternating pairs per folder."
        )
        append_record("Checkpoints: checksum cost of the flush", what, table, 1)
    print(f"total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
