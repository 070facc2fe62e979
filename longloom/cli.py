"""The `longloom` command: train | launch | check | data | ckpt | eval | bench.

User errors (a bad key, a missing folder, sizes that do not divide, a file that cannot be written)
print one short message naming the value and the fix and exit with status 2, without a traceback;
`longloom --debug ...` shows the traceback as well. Any other exception is a bug and keeps its traceback.
`train` and `check` run the same preflight (longloom/preflight.py) before any worker starts.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import yaml

from longloom.config import ConfigError, LongloomConfig, load_config
from longloom.data.prepare import add_prepare_arguments
from longloom.evaluation.needle_run import add_needle_arguments
from longloom.preflight import describe_notes, preflight

USER_ERROR = 2
logger = logging.getLogger("longloom")

# OSErrors that describe the user's files or machine, not a bug, with what to do about them.
_OS_ERROR_FIXES: dict[type[OSError], str] = {
    FileNotFoundError: "check the path",
    PermissionError: "check its permissions, or choose a path you may read / write",
    IsADirectoryError: "it is a folder where a file was expected: pass a file",
    NotADirectoryError: "it (or a part of the path) is a file where a folder was expected: check the path",
    FileExistsError: "it already exists: remove it or choose another path",
}
_ERRNO_FIXES = {
    errno.ENOSPC: "the disk is full: free space or choose another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose another disk",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "check its permissions, or choose a path you may read / write",
}


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
    # Everything a worker would reject deterministically is reported here, before any worker starts,
    # anything is written under train.output_dir, or launch.max_failures retries what cannot pass.
    report = preflight(cfg)
    for note in report.notes:
        logger.info("note: %s", note)
    return launch(cfg)


def cmd_launch(args: argparse.Namespace) -> int:
    """`longloom launch` = train through the Ray launcher (for `ray job submit` on a cluster)."""
    return cmd_train(args, extra=["launch.backend=ray"])


MACHINE_FLAGS = {
    "gpus_per_host": "--gpus-per-host",
    "gpu_memory_gib": "--gpu-memory-gib",
    "host_memory_gib": "--host-memory-gib",
}


def _planned_machine(args: argparse.Namespace):
    """The machine `check` plans for: this one, or the one the three machine flags describe."""
    from longloom.runtime.machine import Machine

    given = {name: getattr(args, name) for name in MACHINE_FLAGS if getattr(args, name) is not None}
    if not given:
        return None
    if len(given) < len(MACHINE_FLAGS):
        missing = ", ".join(flag for name, flag in MACHINE_FLAGS.items() if name not in given)
        raise ConfigError(
            f"planning for another machine needs all three of {', '.join(MACHINE_FLAGS.values())}: add {missing}"
        )
    try:
        return Machine.planned(**given)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def cmd_check(args: argparse.Namespace) -> int:
    """The preflight of `train` without starting anything: OK only when the run can start."""
    cfg = _load(args)
    report = preflight(cfg, machine=_planned_machine(args))
    print(cfg.to_yaml(), end="")
    print(report.plan.describe())  # split, dtype, MLP tiles, optimizer GPU share, memory estimate
    print(describe_notes(report), end="")
    print("# config OK: the run can start")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from longloom.data.prepare import prepare_from_args

    print(json.dumps(prepare_from_args(args), indent=2, default=str))
    return 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    from longloom.conversion.convert import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else format_inspection(report))
    if not report["ok"]:  # not committed, damaged or a checksum mismatch: the report says which
        print(f"longloom: error: {report['error'] or 'the checkpoint is not usable'}", file=sys.stderr)
        return USER_ERROR
    return 0


def cmd_ckpt_convert(args: argparse.Namespace) -> int:
    from longloom.conversion.convert import convert_checkpoint

    convert_checkpoint(
        args.source,
        args.destination,
        to=args.to,
        progress=True,
        workers=args.workers,
        dtype=args.dtype,
        hf_folder=args.hf_folder,
    )
    print(f"wrote {args.to} checkpoint to {args.destination}")
    return 0


def cmd_eval_needle(args: argparse.Namespace) -> int:
    from longloom.evaluation.needle_run import needle_from_args

    needle_from_args(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in script.parent.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no benchmark {args.name!r} (bench/ has: {', '.join(available) or 'none'})")
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longloom", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of user errors too (for bug reports)"
    )
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
    planned = check.add_argument_group(
        "another machine",
        "plan for hosts other than this one (all three together), e.g. a GPU job from a login node",
    )
    planned.add_argument("--gpus-per-host", type=int, help="GPUs of one host (one worker each)")
    planned.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU, GiB (an H200: 139.8)")
    planned.add_argument("--host-memory-gib", type=float, help="memory of one host, GiB")
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
    convert.add_argument(
        "--hf-folder",
        default=None,
        help="--to hf of a model.source=hf:<folder> run: where that folder is now (default: the path it trained from)",
    )
    convert.set_defaults(handler=cmd_ckpt_convert)

    evaluation = commands.add_parser("eval", help="evaluate a trained model").add_subparsers(
        dest="eval_command", required=True
    )
    needle = evaluation.add_parser(
        "needle", help="needle-in-a-haystack retrieval by length x depth (table, CSV, heatmap PNG)"
    )
    add_needle_arguments(needle)
    needle.set_defaults(handler=cmd_eval_needle)

    bench = commands.add_parser(
        "bench", help="run a GPU benchmark from bench/ (attention, ring, linear, ...)"
    )
    bench.add_argument("name")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)
    return parser


def describe_user_error(error: BaseException) -> str | None:
    """The one-line message of an expected user error, or None for an exception that is a bug."""
    if isinstance(error, ValueError | yaml.YAMLError):  # ConfigError is a ValueError
        return str(error)
    if not isinstance(error, OSError):
        return None
    fix = next((fix for kind, fix in _OS_ERROR_FIXES.items() if isinstance(error, kind)), None)
    fix = fix or _ERRNO_FIXES.get(error.errno)
    if fix is None:
        return None
    if error.filename is None:
        return f"{error}: {fix}"
    what = f"{error.strerror}: {str(error.filename)!r}"
    if error.filename2 is not None:
        what += f" -> {str(error.filename2)!r}"
    return f"{what}: {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option: `eval needle RUN --workers 2
    # parallel.ulysses=2` leaves the override unparsed. Dotted overrides after options join the list.
    if unknown:
        if not hasattr(args, "overrides") or not all(
            "=" in item and not item.startswith("-") for item in unknown
        ):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("longloom: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = describe_user_error(error)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        if args.debug:
            traceback.print_exc()
        print(f"longloom: error: {message}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
