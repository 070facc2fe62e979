"""Ray launcher: one training rank per Ray actor, on an embedded local cluster or an existing one.

Actors in a placement group, not Ray Train's TorchTrainer, because every piece longloom needs is a
few lines on actors while TorchTrainer brings a controller, a storage/RunConfig layer and its own
checkpoint concept we do not use (our checkpoints are written and found by the trainer):
- restarts: when one rank raises or its process dies, the driver kills the other ranks at once
  (they would otherwise wait in a collective until launch.collective_timeout_s) and starts a fresh
  group in the same placement group; the trainer resumes from its newest committed checkpoint;
- environment: each rank gets exactly torchrun's variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE) plus LONGLOOM_ATTEMPT, so `run_training` is one function under
  torchrun, Ray and in-process;
- logs: Ray forwards each actor's stdout/stderr to the driver's console, prefixed with the actor's
  repr (`(rank0 pid=...)`); a failed rank's traceback is logged by the driver with its rank; on a
  terminal the driver draws the progress bar from metrics.jsonl (launch/progress.py).
One GPU per rank where the cluster has GPUs (NCCL; ranks on one node see all of that node's GPUs
of the group, as under torchrun, so NCCL can use peer-to-peer), otherwise one CPU per rank (gloo).

Where the cluster comes from (`launch.address`): launch/ray_cluster.py (embedded or joined, in
bounded time); "http://head:8265" submits the run as a Ray job instead: launch/ray_job.py.

Errors a restart cannot fix (a ConfigError, a ValueError, see supervisor.DETERMINISTIC_ERRORS) end the
run at once instead of using up launch.max_failures.

Token authentication (Ray 2.60 enables it):
- embedded cluster: nothing to set. Ray turns token auth on for the cluster it starts and creates
  a token in ~/.ray/auth_token if there is none; set RAY_AUTH_MODE=disabled to opt out;
- existing cluster: start every node with `RAY_AUTH_MODE=token` and the same token, given as
  RAY_AUTH_TOKEN=<token>, RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token (`ray get-auth-token
  --generate` writes one). Whatever talks to the cluster (`ray job submit`, `longloom train` with
  launch.address set) needs the same token in one of those three places.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

# Ray folds lines that differ only in numbers and come from different processes into
# "[repeated 3x across cluster]"; after a restart that would swallow rank 0's new step lines.
# Read when Ray is imported; a user's own setting wins.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from longloom.config import ConfigError, LongloomConfig
from longloom.launch.progress import MetricsFollower, driver_progress
from longloom.launch.ray_cluster import connect
from longloom.launch.supervisor import WorkerFailure, is_deterministic, run_with_restarts
from longloom.runtime.ranks import free_port, rank_environment

logger = logging.getLogger(__name__)

Entry = Callable[[LongloomConfig], Any]

# How often the driver looks up from waiting (Ctrl-C, progress messages) and how long it lets Ray's
# log monitor forward the last lines of the workers before it returns.
_POLL_S = 1.0
_LOG_DRAIN_S = 1.0
_FAILURE_GRACE_S = 3.0  # after one rank fails, how long the others may take to report theirs
_PLACEMENT_REPORT_S = 30.0
_DIED = "its worker process died"


class RankWorker:
    """One training rank, alone in its Ray worker process."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __repr__(self) -> str:
        # Ray prefixes every forwarded log line with this: "(rank0 pid=123)".
        return f"rank{self.rank}"

    def placement(self) -> tuple[str, str, list[str]]:
        """(node id, node IP, GPU ids Ray gave this actor)."""
        node_id = ray.get_runtime_context().get_node_id()
        return node_id, ray.util.get_node_ip_address(), [str(gpu) for gpu in ray.get_gpu_ids()]

    def free_port(self) -> int:
        return free_port()

    def run(self, entry: Entry | None, cfg: LongloomConfig, env: dict[str, str]) -> tuple[str, Any]:
        """Runs the entry as one rank: ("ok", result), ("config", message), ("deterministic",
        traceback) for an error a restart cannot fix, or ("error", traceback)."""
        os.environ.update(env)
        try:
            from longloom.launch.worker_setup import prepare_worker_process

            prepare_worker_process(cfg)
            if entry is None:
                from longloom.training.trainer import run_training as entry
            return "ok", entry(cfg)
        except ConfigError as error:
            return "config", str(error)
        except BaseException as error:  # noqa: BLE001 - the driver reports it with the rank and restarts
            return ("deterministic" if is_deterministic(error) else "error"), traceback.format_exc()


def _inside_ray_worker() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _bundle(cfg: LongloomConfig) -> dict[str, float]:
    """What one rank reserves: one GPU where the cluster has GPUs, else one CPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus == 0:
        return {"CPU": 1}
    if cfg.launch.address is None and gpus < cfg.launch.workers:
        raise ConfigError(
            f"launch.workers={cfg.launch.workers} but this machine has {int(gpus)} GPUs (one rank per GPU): "
            f"set launch.workers<={int(gpus)} or join a larger cluster with launch.address"
        )
    return {"CPU": 1, "GPU": 1}


def _wait_until_placed(group: PlacementGroup, workers: int, bundle: dict[str, float]) -> None:
    """Waits until every bundle of the group has a node (at the start, and after a node was lost)."""
    waited = 0.0
    while not ray.wait([group.ready()], timeout=_PLACEMENT_REPORT_S)[0]:
        waited += _PLACEMENT_REPORT_S
        # An autoscaling cluster may still be adding nodes: report and keep waiting (Ctrl-C stops).
        logger.warning(
            "waited %.0f s for %d x %s (launch.workers=%d); the cluster has %s",
            waited,
            workers,
            bundle,
            workers,
            ray.available_resources(),
        )


def _reserve(workers: int, bundle: dict[str, float]) -> PlacementGroup:
    """A placement group of one bundle per rank, packed so a node's ranks are neighbours."""
    group = placement_group([dict(bundle)] * workers, strategy="PACK")
    _wait_until_placed(group, workers, bundle)
    return group


def _gpu_sort_key(gpu: str) -> tuple[int, str]:
    return (int(gpu), "") if gpu.isdigit() else (0, gpu)


def _bundles_in_rank_order(group: PlacementGroup) -> list[tuple[int, str]]:
    """(bundle index, node id) per rank: a node's ranks are consecutive, the first node's first."""
    bundle_nodes = placement_group_table(group)["bundles_to_node_id"]
    node_order: dict[str, int] = {}
    for index in sorted(bundle_nodes):
        node_order.setdefault(bundle_nodes[index], len(node_order))
    order = sorted(bundle_nodes, key=lambda index: (node_order[bundle_nodes[index]], index))
    return [(index, bundle_nodes[index]) for index in order]


def rank_environments(
    nodes: list[str], placements: list[tuple[str, list[str]]], master_port: int, attempt: int
) -> list[dict[str, str]]:
    """Each rank's environment, in rank order, from its node id and its placement (node IP, GPU ids).

    Rank 0's node hosts the rendezvous. A node's ranks see all of that node's GPUs of this run
    (NCCL peer-to-peer needs them visible, as under torchrun) and LOCAL_RANK picks their own.
    """
    ranks_on_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        ranks_on_node.setdefault(node, []).append(rank)
    environments = []
    for rank, node in enumerate(nodes):
        neighbours = ranks_on_node[node]
        local_rank = neighbours.index(rank)
        visible = {}
        node_gpus = sorted((gpu for r in neighbours for gpu in placements[r][1]), key=_gpu_sort_key)
        if node_gpus:
            visible["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            local_rank = node_gpus.index(placements[rank][1][0])
        environment = rank_environment(
            rank=rank,
            world_size=len(nodes),
            local_rank=local_rank,
            local_world_size=len(neighbours),
            master_addr=placements[0][0],
            master_port=master_port,
            attempt=attempt,
        )
        environments.append(environment | visible)
    return environments


def ranks_by_node(nodes: list[str]) -> str:
    """ "node 1a2b3c4d: ranks 0,1; node 5e6f7a8b: ranks 2,3" for the log line of each attempt."""
    ranks: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        ranks.setdefault(node, []).append(rank)
    return "; ".join(f"node {node[:8]}: ranks {','.join(map(str, r))}" for node, r in ranks.items())


def _outcome(ref: ray.ObjectRef) -> tuple[str, Any]:
    """What one rank's `run` returned; a process that died (no Python exception) is an "error"."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as error:
        return "error", f"{_DIED}: {error}"


def _failure(failures: dict[int, tuple[str, str]]) -> WorkerFailure:
    """One WorkerFailure for an attempt whose ranks reported `failures` ({rank: (status, detail)}).

    The culprit is a rank whose process died, else one with an error a restart cannot fix, else the
    first to report: its peers' errors (a broken connection) are consequences, named after it.
    """
    died = [rank for rank, (_, detail) in failures.items() if detail.startswith(_DIED)]
    deterministic = [rank for rank, (status, _) in failures.items() if status == "deterministic"]
    culprit = (died or deterministic or list(failures))[0]
    status, detail = failures[culprit]
    others = "".join(
        f"\n(rank {rank} also failed: {other.strip().splitlines()[-1]})"
        for rank, (_, other) in sorted(failures.items())
        if rank != culprit
    )
    return WorkerFailure(culprit, detail + others, retryable=status != "deterministic")


class RayLauncher:
    """Runs `entry(cfg)` (default: `run_training`) on `launch.workers` Ray actors, restarting on failure."""

    def __init__(self, cfg: LongloomConfig, entry: Entry | None = None):
        self.cfg = cfg
        self.entry = entry
        self._actors: list[Any] = []
        self._nodes: list[str] = []  # each rank's node id, in rank order, of the current attempt
        self._progress: MetricsFollower | None = None

    def run(self) -> Any:
        """Rank 0's return value; raises RunFailed once launch.max_failures restarts are used up."""
        if (self.cfg.launch.address or "").startswith(("http://", "https://")):
            from longloom.launch.ray_job import submit_job

            return submit_job(self.cfg)
        cluster = connect(self.cfg)
        group = None
        self._progress = driver_progress(self.cfg.train.output_dir, self.cfg.train.steps)
        try:
            bundle = _bundle(self.cfg)
            group = _reserve(self.cfg.launch.workers, bundle)
            return run_with_restarts(
                lambda attempt: self._attempt(group, bundle, attempt), self.cfg.launch.max_failures
            )
        finally:
            if self._progress is not None:
                self._progress.close()
            self._stop_actors()
            if group is not None and ray.is_initialized():
                remove_placement_group(group)
            cluster.close()

    def _start_actors(
        self, group: PlacementGroup, bundle: dict[str, float], attempt: int
    ) -> list[dict[str, str]]:
        """Starts one actor per rank in its bundle; returns each rank's environment, in rank order."""
        # After a lost node the group's bundles wait for a node again (an autoscaler's, a restarted one).
        _wait_until_placed(group, self.cfg.launch.workers, bundle)
        actor_class = ray.remote(RankWorker)
        bundles = _bundles_in_rank_order(group)
        self._actors = [
            actor_class.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=index
                ),
            ).remote(rank)
            for rank, (index, _) in enumerate(bundles)
        ]
        placements = ray.get([actor.placement.remote() for actor in self._actors])
        master_port = ray.get(self._actors[0].free_port.remote())
        nodes = [node for node, _, _ in placements]
        self._nodes = nodes
        return rank_environments(nodes, [(ip, gpus) for _, ip, gpus in placements], master_port, attempt)

    def _attempt(self, group: PlacementGroup, bundle: dict[str, float], attempt: int) -> Any:
        try:
            environments = self._start_actors(group, bundle, attempt)
        except ray.exceptions.RayActorError as error:
            self._stop_actors()
            raise WorkerFailure(None, f"a worker process died while starting: {error}") from None
        logger.info(
            "attempt %d: %d ranks on %d node(s) (%s), rendezvous at %s:%s",
            attempt,
            len(self._nodes),
            len(set(self._nodes)),
            ranks_by_node(self._nodes),
            environments[0]["MASTER_ADDR"],
            environments[0]["MASTER_PORT"],
        )
        pending = {}
        for rank, (actor, env) in enumerate(zip(self._actors, environments)):
            pending[actor.run.remote(self.entry, self.cfg, env)] = rank
        results: dict[int, Any] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            if self._progress is not None:
                self._progress.poll()
            for ref in done:
                rank = pending.pop(ref)
                status, value = _outcome(ref)
                if status == "config":
                    self._stop_actors()
                    raise ConfigError(f"rank {rank}: {value}")
                if status != "ok":
                    # Its peers now wait in a collective that cannot finish: stop them soon rather
                    # than after launch.collective_timeout_s, but first give them a moment to report,
                    # so that a dead process (the cause) is named rather than a peer's broken link.
                    failures = {rank: (status, value), **self._collect_failures(pending)}
                    self._stop_actors()
                    raise _failure(failures)
                results[rank] = value
        time.sleep(_LOG_DRAIN_S)
        self._stop_actors()
        return results[0]

    @staticmethod
    def _collect_failures(pending: dict) -> dict[int, tuple[str, str]]:
        """Failures the other ranks report within _FAILURE_GRACE_S (ranks still running are left out)."""
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_FAILURE_GRACE_S)
        outcomes = {pending[ref]: _outcome(ref) for ref in done}
        return {rank: outcome for rank, outcome in outcomes.items() if outcome[0] not in ("ok", "config")}

    def _stop_actors(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
