"""The worker entry for torchrun:

    torchrun --nproc-per-node N [--max-restarts K] -m longloom.launch.torchrun CONFIG [a.b=v ...]

torchrun starts the N processes and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
each process loads the config and calls `run_training`. Under `torchrun --max-restarts K`, a
failed process makes torchrun's agent stop the group and start it again (at most K times); the new
group resumes from the newest committed checkpoint, and its attempt number is torchrun's restart
count (TORCHELASTIC_RESTART_COUNT, copied to LONGLOOM_ATTEMPT). A failure exits non-zero; `@record`
hands the traceback to torchrun, which prints it with the rank that failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from longloom.config import ConfigError, LongloomConfig, load_config
from longloom.launch.worker_setup import prepare_worker_process
from longloom.runtime.ranks import ATTEMPT_ENV

EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m longloom.launch.torchrun",
        description="longloom training worker started by torchrun",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    return parser


@record
def main(argv: list[str] | None = None, entry: Callable[[LongloomConfig], Any] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    os.environ[ATTEMPT_ENV] = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prepare_worker_process(cfg)
    if entry is None:
        from longloom.training.trainer import run_training as entry
    try:
        entry(cfg)
    except ConfigError as error:
        print(f"error (rank {rank}): {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
