"""Host -> storage write throughput of the checkpoint writer (tensor_file.write_tensor_file), by thread count.

    python bench/storage_write.py --dir /tmp /dev/shm --gib 8 --threads 1 4 8 16 [--record]

The lazy checkpointer's flush is this call on a pinned host buffer: header, parallel `os.pwrite`
of contiguous ranges, fsync. With a checkpoint every step the step time is bound by it, so this is
what picks `WRITE_THREADS`. Each (dir, threads) writes a fresh file twice; the table shows the median
GB/s (10^9 bytes / s) including the fsync. The file is deleted afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` finds longloom

import argparse
import statistics
import time

import torch

from bench.common import append_record, markdown_table
from longloom.checkpointing.tensor_file import TensorFileLayout, write_tensor_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, nargs="+", default=[Path("/tmp")])
    parser.add_argument("--gib", type=float, default=8.0, help="bytes per file, GiB")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    nbytes = int(args.gib * (1 << 30))
    pinned = torch.cuda.is_available()  # as the checkpointer's snapshot pool
    data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    data.fill_(7)  # touch every page before timing
    layout = TensorFileLayout([("data", torch.uint8, (nbytes,))])
    rows = []
    for directory in args.dir:
        path = directory / "longloom-storage-write.safetensors"
        for threads in args.threads:
            rates = []
            for _ in range(args.repeats):
                path.unlink(missing_ok=True)
                begin = time.perf_counter()
                write_tensor_file(path, layout, data, threads=threads)
                rates.append(nbytes / (time.perf_counter() - begin) / 1e9)
            path.unlink(missing_ok=True)
            rows.append(
                [
                    str(directory),
                    threads,
                    f"{statistics.median(rates):.2f}",
                    " ".join(f"{r:.2f}" for r in rates),
                ]
            )
            print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
    table = markdown_table(["directory", "threads", "GB/s (median)", "runs"], rows)
    print(table)
    if args.record:
        what = (
            f"write_tensor_file of one {args.gib:g} GiB {'pinned ' if pinned else ''}host buffer (pwrite of "
            "contiguous ranges from N threads, then fsync), fresh file each run."
        )
        append_record("Checkpoint writer: storage write throughput by threads", what, table, world_size=1)


if __name__ == "__main__":
    main()
