"""The `longloom` command: train | launch | check | data | ckpt | bench.

User errors (a bad key, a missing folder, sizes that do not divide) print one short message naming
the value and the fix and exit with status 2; a deep stack trace is never the only message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from longloom.config import ConfigError, LongloomConfig, load_config, validate_layout
from longloom.data.prepare import add_prepare_arguments
from longloom.data.synthetic import build_dataset

USER_ERROR = 2


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 parallel.ulysses=2"
    )


def _load(args: argparse.Namespace, extra: list[str] | None = None) -> LongloomConfig:
    return load_config(args.config, list(args.overrides) + (extra or []))


def cmd_train(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from longloom.launch.dispatch import launch

    cfg = _load(args, extra)
    validate_layout(cfg)
    # Open the data once here: a missing folder or a vocabulary mismatch is reported before any worker
    # starts or anything is written under train.output_dir.
    build_dataset(cfg.data, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    return launch(cfg)


def cmd_launch(args: argparse.Namespace) -> int:
    """`longloom launch` = train through the Ray launcher (for `ray job submit` on a cluster)."""
    return cmd_train(args, extra=["launch.backend=ray"])


def cmd_check(args: argparse.Namespace) -> int:
    from longloom.offload.memory import check_host_memory, estimate_memory, format_estimate

    cfg = _load(args)
    dp, ulysses, ring = validate_layout(cfg)
    print(cfg.to_yaml(), end="")
    print(f"# split: {cfg.launch.workers} workers = dp {dp} x ulysses {ulysses} x ring {ring}")
    estimate = estimate_memory(cfg, cfg.launch.workers)
    print(format_estimate(estimate))
    check_host_memory(cfg, estimate)
    print("# config OK")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from longloom.data.prepare import prepare_from_args

    print(json.dumps(prepare_from_args(args), indent=2, default=str))
    return 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from longloom.checkpointing.convert import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else format_inspection(report))
    if not report["ok"]:  # not committed, damaged or a checksum mismatch: the report says which
        print(f"longloom: error: {report['error'] or 'the checkpoint is not usable'}", file=sys.stderr)
        return USER_ERROR
    return 0


def cmd_ckpt_convert(args: argparse.Namespace) -> int:
    from longloom.checkpointing.convert import convert_checkpoint

    convert_checkpoint(
        args.source, args.destination, to=args.to, progress=True, workers=args.workers, dtype=args.dtype
    )
    print(f"wrote {args.to} checkpoint to {args.destination}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in script.parent.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no benchmark {args.name!r} (bench/ has: {', '.join(available) or 'none'})")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longloom", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (embedded Ray cluster by default for >1 worker)")
    _add_config_arguments(train)
    train.set_defaults(handler=cmd_train)

    launch = commands.add_parser("launch", help="train through the Ray launcher (launch.backend=ray)")
    _add_config_arguments(launch)
    launch.set_defaults(handler=cmd_launch)

    check = commands.add_parser(
        "check", help="validate a config and estimate memory without starting workers"
    )
    _add_config_arguments(check)
    check.set_defaults(handler=cmd_check)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="text / JSONL / Parquet -> Arrow token shards")
    add_prepare_arguments(prepare)
    prepare.set_defaults(handler=cmd_data_prepare)

    ckpt = commands.add_parser("ckpt", help="checkpoint tools").add_subparsers(
        dest="ckpt_command", required=True
    )
    inspect = ckpt.add_parser("inspect", help="step, layout, tensors, sizes, committed or not")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="the full report as JSON")
    inspect.set_defaults(handler=cmd_ckpt_inspect)
    convert = ckpt.add_parser("convert", help="convert between longloom, universal, DeepSpeed and HF formats")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--to", required=True, choices=["universal", "deepspeed-universal", "hf"])
    convert.add_argument("--workers", type=int, default=None, help="parallel tensor readers/writers")
    convert.add_argument("--dtype", default=None, help="--to hf: dtype of the exported weights (e.g. bf16)")
    convert.set_defaults(handler=cmd_ckpt_convert)

    bench = commands.add_parser(
        "bench", help="run a GPU benchmark from bench/ (attention, ring, linear, ...)"
    )
    bench.add_argument("name")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"longloom: error: {error}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("longloom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
