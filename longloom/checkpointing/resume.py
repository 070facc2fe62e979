"""Which checkpoint a run resumes from: the newest one whose every tensor checksum verifies.

Resuming from a checkpoint whose bytes changed after it was written trains on garbage (NaN
weights, skipped steps) while looking healthy. So before loading, every byte of the newest
committed checkpoint is hashed and compared with the checksums its commit marker recorded; the
ranks split the tensors between them so each byte is read once, and agree on the outcome. A
checkpoint that fails is reported (which tensor, which file) and the next older one is tried.

Collective when torch.distributed is initialised: every rank calls `find_latest_verified` with
the same root, and rank 0's listing of the folder decides the candidates for all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from longloom.checkpointing.checksums import Corruption, verification_items, verify_files
from longloom.checkpointing.commit import (
    COMMIT_FILE,
    CheckpointError,
    checksums_recorded,
    describe_problems,
    step_directories,
    validate_checkpoint,
)

logger = logging.getLogger(__name__)


def _world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _agree(value, group, src_rank: int = 0):
    """rank 0's `value` on every rank."""
    if _world(group)[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(
        box, src=dist.get_global_rank(group, src_rank) if group else src_rank, group=group
    )
    return box[0]


def _gather(value, group) -> list:
    _, world = _world(group)
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value, group=group)
    return out


def _problems_of(path: Path, group) -> str | None:
    """None if `path` verifies on every rank's share; else why not (the same text on every rank)."""
    rank, world = _world(group)
    try:
        meta = validate_checkpoint(path)
        items = verification_items(meta["files"])[rank::world]
        problems: list[Corruption] | str = verify_files(path, meta["files"], items)
        legacy = not checksums_recorded(meta)
    except CheckpointError as error:
        problems, legacy = str(error), False
    reports = _gather((problems, legacy), group)
    for found, _ in reports:
        if isinstance(found, str):
            return found
    everything = [problem for found, _ in reports for problem in found]
    if everything:
        return describe_problems(path, everything)
    if reports[0][1] and rank == 0:
        logger.warning(
            "checkpoint %s has no checksums (written by a longloom before format version 2): "
            "its sizes and headers are intact but its bytes cannot be verified",
            path,
        )
    return None


def find_latest_verified(root: str | Path, group=None) -> Path | None:
    """The newest `step-N` under root whose checksums all verify; None if there is none.

    Newer checkpoints that are uncommitted (a crash while writing) or committed but damaged are
    reported with what is wrong, and the run falls back to the next older one, saying so. When
    committed checkpoints exist but none verifies, CheckpointError: starting over would overwrite
    them, which is the user's call (checkpoint.resume=false or another train.output_dir).
    """
    candidates = _agree([str(path) for _, path in step_directories(Path(root))], group)
    rank, _ = _world(group)
    rejected: list[tuple[Path, str]] = []
    for candidate in map(Path, candidates):
        reason = _problems_of(candidate, group)
        if reason is None:
            if rejected and rank == 0:
                logger.warning(
                    "resuming from %s, the newest checkpoint that verifies; skipped: %s",
                    candidate,
                    "; ".join(f"{path.name} ({why})" for path, why in rejected),
                )
            return candidate
        if rank == 0:
            logger.warning("not resuming from %s: %s", candidate, reason)
        rejected.append((candidate, reason))
    damaged = [(path, why) for path, why in rejected if (path / COMMIT_FILE).is_file()]
    if damaged:
        raise CheckpointError(
            f"no checkpoint under {root} verifies, so the run cannot resume: "
            + "; ".join(f"{path.name}: {why}" for path, why in damaged[:3])
            + ". Restore the checkpoints from a copy, or start over with checkpoint.resume=false or another "
            "train.output_dir"
        )
    return None
