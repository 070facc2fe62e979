"""Lazy asynchronous checkpoints of a DeepSpeed engine, committed atomically, loadable anywhere.

DataStates-LLM (Maurya et al., "DataStates-LLM: Lazy Asynchronous Checkpointing for Large
Language Models", HPDC 2024): model and optimizer shards do not change between one optimizer
step and the next, so copy them to pinned host memory in the background while the next
forward/backward runs, block only right before the next optimizer step, and flush the host copy
to storage in the background. The saved form is the universal one (universal.py), so a run
resumes on any number of ranks, ZeRO stage or dp/sp split.

Usage (every rank, same order of calls)::

    ckpt = LazyAsyncCheckpointer(root=out / "checkpoints", keep=3, asynchronous=True)
    path = find_latest_verified(root)                   # collective; None if nothing committed
    extra = ckpt.load(path, engine) if path else None   # collective; returns this rank's extra
    for step in ...:
        ckpt.wait_for_snapshot()     # before engine.step(): the previous snapshot must be taken
        engine.step()
        if step % interval == 0:
            ckpt.save(step=step, engine=engine, extra={"loader": ..., "rng": ..., "config": ...})
    ckpt.close()                     # waits for the last flush + commit; close(abort=True) on errors

`ckpt.wait()` blocks until the checkpoint in flight is committed; `ckpt.last_timings` holds the
seconds each phase of the last finished checkpoint took (save_call, snapshot, write, commit,
wait_for_snapshot; checksum: the seconds spent hashing, summed over the write threads, each of
which hashes a piece right before writing it).

`extra` is per rank (RNG states differ per rank; pass the global loader state on every rank):
JSON values and torch tensors. `load` returns the extra saved by the same rank, or rank 0's when
the checkpoint had fewer ranks. After `load`, `engine.global_steps` is the saved step.

On disk: `<root>/step-N/rank-RRRRR-<token>.safetensors` (each rank's share of fp32 masters and
Adam moments, 1-D pieces, plus its extra tensors) and `commit.json` (commit.py), written by rank 0
once every rank has fsynced its file and published a small manifest with its file's size and
per-tensor checksums (computed by the write threads, each piece hashed right before it is written). The host pool is one uint8
buffer laid out like the data section of the rank's file, so flushing is a single write.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from longloom.checkpointing.commit import (
    COMMIT_FILE,
    atomic_write_json,
    find_latest_committed,
    prune,
    step_directory,
)
from longloom.checkpointing.engine_state import EngineState, FlatRange, jsonable
from longloom.checkpointing.tensor_file import TensorFileLayout, write_tensor_file
from longloom.checkpointing.universal import build_commit, encode_extra, load_into_engine

__all__ = ["LazyAsyncCheckpointer", "find_latest_committed"]

logger = logging.getLogger(__name__)
POLL_S = 0.005
EXTRA_PREFIX = "extra/"


@dataclass
class _Job:
    """One checkpoint in flight on this rank."""

    step: int
    directory: Path
    layout: TensorFileLayout
    sources: list[tuple[str, torch.Tensor]]  # (key in the file, live tensor) to snapshot
    ready: torch.cuda.Event | None  # recorded after the optimizer step, on the training stream
    device: torch.device | None
    manifest: dict
    commit_fields: dict | None  # rank 0 only: what the marker needs beyond the manifests
    copied: torch.cuda.Event | None = None  # device -> pool copies done (side stream)
    copies_issued: threading.Event = field(default_factory=threading.Event)
    snapshot_done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def device_only(self) -> bool:
        """True when all engine state is on the GPU (extras were cloned at save time and never change)."""
        return all(tensor.is_cuda for key, tensor in self.sources if not key.startswith(EXTRA_PREFIX))


class LazyAsyncCheckpointer:
    """Saves engine state lazily (snapshot overlaps the next fwd/bwd), flushes and commits in the background."""

    def __init__(
        self, root: str | Path, keep: int = 3, asynchronous: bool = True, commit_timeout_s: float = 600.0
    ):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1 (the newest checkpoint is never pruned)")
        self.root = Path(root)
        self.keep = keep
        self.asynchronous = asynchronous
        self.commit_timeout_s = commit_timeout_s
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        # One token per run, agreed by all ranks, names this run's files: leftovers of a crashed
        # attempt at the same step can then never be mistaken for this run's.
        token = [secrets.token_hex(4)]
        if self.world_size > 1:
            dist.broadcast_object_list(token, src=0)
        self.token: str = token[0]
        # engine -> the ranges this rank writes (weak: a new engine never inherits an old decision)
        self._owned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._pool: torch.Tensor | None = None
        self._stream = None
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._abort = threading.Event()
        self.last_timings: dict = {}
        # The checkpoint this run resumed from (verified then): pruning never removes it.
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ public API
    def save(self, step: int, engine, extra: dict | None = None) -> None:
        """Starts checkpoint `step` (call right after engine.step()); returns before any I/O."""
        self._finish_previous()
        self._abort.clear()
        started = time.perf_counter()
        state = EngineState(engine)
        share = self._share(engine, state)
        directory = step_directory(self.root, step)
        data_file = f"rank-{self.rank:05d}-{self.token}.safetensors"

        extra_tensors: dict[str, torch.Tensor] = {}
        extra_json = encode_extra(extra if extra is not None else {}, EXTRA_PREFIX.rstrip("/"), extra_tensors)
        entries, sources, pieces = [], [], []
        for flat_range, views in share:
            for key_state, view in views.items():
                key = f"{flat_range.name}:{key_state}:{flat_range.start}"
                entries.append((key, torch.float32, (flat_range.numel,)))
                sources.append((key, view))
                pieces.append([flat_range.name, key_state, key, flat_range.start, flat_range.numel])
        entries += [(key, t.dtype, tuple(t.shape)) for key, t in extra_tensors.items()]
        sources += list(extra_tensors.items())
        layout = TensorFileLayout(entries, metadata={"step": step, "rank": self.rank, "token": self.token})
        ready, device = None, None
        if any(view.is_cuda for _, view in sources):
            # The snapshot may start once this step's optimizer update is done on the GPU.
            device = next(view.device for _, view in sources if view.is_cuda)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))

        manifest = {
            "token": self.token,
            "rank": self.rank,
            "file": data_file,
            "pieces": pieces,
            "extra": extra_json,
        }
        commit_fields = None
        if self.rank == 0:
            # Captured now: the next optimizer step changes them before the flush would read them.
            commit_fields = {
                "specs": state.specs(),
                "optimizer": {"step": state.optimizer_step(), "param_groups": state.param_groups()},
                "lr_scheduler": _scheduler_state(engine),
                "engine": {
                    "global_steps": int(engine.global_steps),
                    "global_samples": int(engine.global_samples),
                    "skipped_steps": int(engine.skipped_steps),
                },
                "source": {
                    "zero_stage": int(engine.zero_optimization_stage()),
                    "world_size": self.world_size,
                    "kind": state.kind,
                },
            }
        job = _Job(step, directory, layout, sources, ready, device, manifest, commit_fields)
        job.seconds["save_call"] = time.perf_counter() - started
        self._job = job
        if self.asynchronous:
            self._thread = threading.Thread(
                target=self._run, args=(job,), name=f"ckpt-step-{step}", daemon=True
            )
            self._thread.start()
        else:
            self._run(job)
            self._finish_previous()

    def wait_for_snapshot(self) -> None:
        """Makes sure the last save's snapshot is taken before the next optimizer step changes the state.

        Call right before engine.step(). When everything lives on the GPU the host does not block:
        the training stream waits for the side stream's copy.
        """
        job = self._job
        if job is None:
            return
        started = time.perf_counter()
        job.copies_issued.wait()
        if job.copied is not None and job.device_only and job.error is None:
            torch.cuda.current_stream(job.device).wait_event(job.copied)
        else:
            job.snapshot_done.wait()
        job.seconds["wait_for_snapshot"] = time.perf_counter() - started
        if job.error is not None and "snapshot" not in job.seconds:
            raise RuntimeError(
                f"checkpoint step {job.step}: snapshot failed on rank {self.rank}"
            ) from job.error

    def wait(self) -> None:
        """Blocks until the checkpoint in flight is flushed (and, on rank 0, committed); raises its error."""
        self._finish_previous()

    def close(self, abort: bool = False) -> None:
        """Waits for the background flush and commit; abort=True stops before committing instead."""
        if abort:
            self._abort.set()
        try:
            self._finish_previous()
        except Exception:
            if not abort:
                raise
            logger.exception("checkpoint aborted")

    def load(self, path: str | Path, engine) -> dict | None:
        """Restores `path` onto `engine` (collective, any layout it was saved from); returns this rank's extra."""
        self._finish_previous()
        extra = load_into_engine(path, engine)
        self.resumed_from = Path(path)
        return extra

    # ------------------------------------------------------------------ internals
    def _share(self, engine, state: EngineState) -> list[tuple[FlatRange, dict[str, torch.Tensor]]]:
        # Which ranges this rank writes is decided once per engine (a collective); the views are
        # taken fresh at every save because loading or a first step may re-link optimizer state.
        owned = self._owned.get(engine)
        if owned is None:
            share = state.saved_share()
            self._owned[engine] = {(r.name, r.start, r.numel) for r, _ in share}
            return share
        if state.kind == "replicated":
            return state.saved_share()
        return [(r, views) for r, views in state.held() if (r.name, r.start, r.numel) in owned]

    def _pool_for(self, nbytes: int, pinned: bool) -> torch.Tensor:
        # The pool is reused across saves (pinning is slow); it only grows when the layout does.
        if self._pool is None or self._pool.numel() != nbytes or self._pool.is_pinned() != pinned:
            self._pool = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        return self._pool

    def _finish_previous(self) -> None:
        thread, job = self._thread, self._job
        if thread is not None:
            thread.join()
        self._thread = None
        self._job = None
        if job is not None:
            self.last_timings = dict(job.seconds)
            if job.error is not None:
                raise RuntimeError(
                    f"checkpoint step {job.step} failed on rank {self.rank}: {job.error}"
                ) from job.error

    def _snapshot(self, job: _Job) -> torch.Tensor:
        """Copies every source into the host pool (device tensors on a side stream)."""
        pool = self._pool_for(job.layout.data_bytes, pinned=job.device is not None)
        on_device = [(key, t) for key, t in job.sources if t.is_cuda]
        if on_device:
            torch.cuda.set_device(job.device)  # the current device is per thread
            if self._stream is None:
                self._stream = torch.cuda.Stream(job.device)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(job.ready)
                for key, tensor in on_device:
                    job.layout.view(pool, key).view(-1).copy_(tensor.reshape(-1), non_blocking=True)
                job.copied = torch.cuda.Event()
                job.copied.record(self._stream)
        job.copies_issued.set()
        for key, tensor in job.sources:
            if not tensor.is_cuda:
                job.layout.view(pool, key).view(-1).copy_(tensor.reshape(-1))
        if job.copied is not None:
            job.copied.synchronize()
        return pool

    def _run(self, job: _Job) -> None:
        try:
            begin = time.perf_counter()
            pool = self._snapshot(job)
            job.seconds["snapshot"] = time.perf_counter() - begin
            job.snapshot_done.set()
            begin = time.perf_counter()
            job.directory.mkdir(parents=True, exist_ok=True)
            job.manifest["record"] = write_tensor_file(
                job.directory / job.manifest["file"], job.layout, pool, timings=job.seconds
            )
            atomic_write_json(job.directory / _manifest_name(self.rank, self.token), job.manifest)
            job.seconds["write"] = time.perf_counter() - begin
            if self.rank == 0:
                begin = time.perf_counter()
                self._commit(job)
                job.seconds["commit"] = time.perf_counter() - begin
        except BaseException as error:  # noqa: BLE001 - surfaced to the training thread
            job.error = error
        finally:
            job.copies_issued.set()
            job.snapshot_done.set()

    def _commit(self, job: _Job) -> None:
        manifests = self._wait_for_manifests(job)
        fields = job.commit_fields
        pieces: dict[str, dict[str, list]] = {name: {} for name in fields["specs"]}
        for manifest in manifests:
            for name, state, key, start, numel in manifest["pieces"]:
                pieces[name].setdefault(state, []).append([manifest["file"], key, start, numel])
        commit = build_commit(
            step=job.step,
            layout="distributed",
            token=self.token,
            world_size=self.world_size,
            files={m["file"]: m["record"] for m in manifests},
            specs=fields["specs"],
            pieces=pieces,
            optimizer=fields["optimizer"],
            lr_scheduler=fields["lr_scheduler"],
            engine=fields["engine"],
            extras=[{"file": m["file"], "value": m["extra"]} for m in manifests],
            source=fields["source"],
        )
        atomic_write_json(job.directory / COMMIT_FILE, commit)
        removed = prune(self.root, self.keep, job.step, protect=self.resumed_from)
        logger.info("committed %s (pruned %d older)", job.directory, len(removed))

    def _wait_for_manifests(self, job: _Job) -> list[dict]:
        deadline = time.monotonic() + self.commit_timeout_s
        manifests: dict[int, dict] = {}
        while len(manifests) < self.world_size:
            for rank in range(self.world_size):
                if rank in manifests:
                    continue
                path = job.directory / _manifest_name(rank, self.token)
                if path.is_file():
                    manifests[rank] = json.loads(path.read_text())
            if len(manifests) == self.world_size:
                break
            if self._abort.is_set():
                raise RuntimeError(f"checkpoint step {job.step} aborted before commit")
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(manifests))
                raise TimeoutError(
                    f"checkpoint step {job.step}: ranks {missing} did not finish writing within "
                    f"{self.commit_timeout_s:.0f} s; not committing"
                )
            time.sleep(POLL_S)
        return [manifests[rank] for rank in range(self.world_size)]


def _manifest_name(rank: int, token: str) -> str:
    return f"rank-{rank:05d}-{token}.json"


def _scheduler_state(engine) -> dict | None:
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None:
        return None
    return jsonable(scheduler.state_dict())
