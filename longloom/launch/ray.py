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

Where the cluster comes from (`launch.address`):
- null: RAY_ADDRESS when set (as inside `ray job submit`), else an embedded cluster on this
  machine: `ray.init(address="local")` without a dashboard, num_cpus = max(workers, cores),
  stopped at the end;
- "auto", "host:port" or "ray://host:10001": an existing cluster, joined with `ray.init(address)`;
- "http://head:8265": the run is submitted as a Ray job to that cluster's dashboard (the resolved
  config and this longloom package travel with it) and its logs are streamed here.

Token authentication (Ray 2.60 enables it):
- embedded cluster: nothing to set. Ray turns token auth on for the cluster it starts and creates
  a token in ~/.ray/auth_token if there is none; set RAY_AUTH_MODE=disabled to opt out;
- existing cluster: start every node with `RAY_AUTH_MODE=token` and the same token, given as
  RAY_AUTH_TOKEN=<token>, RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token (`ray get-auth-token
  --generate` writes one). Whatever talks to the cluster (`ray job submit`, `longloom train` with
  launch.address set) needs the same token in one of those three places.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
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
from longloom.launch.env import free_port, rank_environment
from longloom.launch.progress import MetricsFollower, driver_progress
from longloom.launch.supervisor import RunFailed, WorkerFailure, run_with_restarts

logger = logging.getLogger(__name__)

Entry = Callable[[LongloomConfig], Any]

# How often the driver looks up from waiting (Ctrl-C, progress messages) and how long it lets Ray's
# log monitor forward the last lines of the workers before it returns.
_POLL_S = 1.0
_LOG_DRAIN_S = 1.0
_FAILURE_GRACE_S = 3.0  # after one rank fails, how long the others may take to report theirs
_DIED = "its worker process died"
_PLACEMENT_REPORT_S = 30.0


class RankWorker:
    """One training rank, alone in its Ray worker process."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __repr__(self) -> str:
        # Ray prefixes every forwarded log line with this: "(rank0 pid=123)".
        return f"rank{self.rank}"

    def placement(self) -> tuple[str, list[str]]:
        """(node IP, GPU ids Ray gave this actor)."""
        return ray.util.get_node_ip_address(), [str(gpu) for gpu in ray.get_gpu_ids()]

    def free_port(self) -> int:
        return free_port()

    def run(self, entry: Entry | None, cfg: LongloomConfig, env: dict[str, str]) -> tuple[str, Any]:
        """Runs the entry as one rank; ("ok", result), ("config", message) or ("error", traceback)."""
        os.environ.update(env)
        try:
            if entry is None:
                from longloom.training.trainer import run_training as entry
            return "ok", entry(cfg)
        except ConfigError as error:
            return "config", str(error)
        except BaseException:  # noqa: BLE001 - the driver reports it with the rank and restarts
            return "error", traceback.format_exc()


def _inside_ray_worker() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _connect(cfg: LongloomConfig) -> bool:
    """Connects to the cluster `launch.address` names; True when we started it (and must stop it)."""
    if ray.is_initialized():
        return False
    address = cfg.launch.address
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        logger.info("launch.address is null and RAY_ADDRESS=%s: joining that cluster", address)
    if address is None:
        num_cpus = max(cfg.launch.workers, os.cpu_count() or 1)
        # "local" rather than no address: a bare ray.init() joins the last cluster `ray start` left
        # in /tmp/ray (possibly stale or someone else's) instead of starting ours.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        logger.info("started an embedded Ray cluster on this machine (%d CPUs)", num_cpus)
        return True
    try:
        ray.init(address=address)
    except ConnectionError as error:
        raise ConfigError(
            f"launch.address={address!r}: no Ray cluster answered ({error}); start one with "
            "`ray start --head` or set launch.address=null for an embedded cluster on this machine"
        ) from None
    return False


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


def _reserve(workers: int, bundle: dict[str, float]) -> PlacementGroup:
    """A placement group of one bundle per rank, packed so a node's ranks are neighbours."""
    group = placement_group([dict(bundle)] * workers, strategy="PACK")
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


class RayLauncher:
    """Runs `entry(cfg)` (default: `run_training`) on `launch.workers` Ray actors, restarting on failure."""

    def __init__(self, cfg: LongloomConfig, entry: Entry | None = None):
        self.cfg = cfg
        self.entry = entry
        self._actors: list[Any] = []
        self._progress: MetricsFollower | None = None

    def run(self) -> Any:
        """Rank 0's return value; raises RunFailed once launch.max_failures restarts are used up."""
        if self.cfg.launch.address is not None and self.cfg.launch.address.startswith(
            ("http://", "https://")
        ):
            return submit_job(self.cfg)
        started = _connect(self.cfg)
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
            if group is not None:
                remove_placement_group(group)
            if started:
                ray.shutdown()
                logger.info("stopped the embedded Ray cluster")

    def _start_actors(
        self, group: PlacementGroup, bundle: dict[str, float], attempt: int
    ) -> list[dict[str, str]]:
        """Starts one actor per rank in its bundle; returns each rank's environment, in rank order."""
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
        return rank_environments([node for _, node in bundles], placements, master_port, attempt)

    def _attempt(self, group: PlacementGroup, bundle: dict[str, float], attempt: int) -> Any:
        try:
            environments = self._start_actors(group, bundle, attempt)
        except ray.exceptions.RayActorError as error:
            self._stop_actors()
            raise WorkerFailure(None, f"a worker process died while starting: {error}") from None
        logger.info(
            "attempt %d: %d ranks on %d node(s), rendezvous at %s:%s",
            attempt,
            len(environments),
            len({env["MASTER_ADDR"] for env in environments}),
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
                try:
                    status, value = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    status, value = "error", f"{_DIED}: {error}"
                if status == "config":
                    self._stop_actors()
                    raise ConfigError(f"rank {rank}: {value}")
                if status == "error":
                    # Its peers now wait in a collective that cannot finish: stop them soon rather
                    # than after launch.collective_timeout_s, but first give them a moment to report,
                    # so that a dead process (the cause) is named rather than a peer's broken link.
                    failures = {rank: value, **self._collect_failures(pending)}
                    self._stop_actors()
                    died = [r for r, detail in failures.items() if detail.startswith(_DIED)]
                    culprit = died[0] if died else rank
                    others = "".join(
                        f"\n(rank {r} also failed: {detail.strip().splitlines()[-1]})"
                        for r, detail in sorted(failures.items())
                        if r != culprit
                    )
                    raise WorkerFailure(culprit, failures[culprit] + others)
                results[rank] = value
        time.sleep(_LOG_DRAIN_S)
        self._stop_actors()
        return results[0]

    @staticmethod
    def _collect_failures(pending: dict) -> dict[int, str]:
        """Errors the other ranks report within _FAILURE_GRACE_S (ranks still running are left out)."""
        failures = {}
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_FAILURE_GRACE_S)
        for ref in done:
            rank = pending[ref]
            try:
                status, value = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                status, value = "error", f"{_DIED}: {error}"
            if status == "error":
                failures[rank] = value
        return failures

    def _stop_actors(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def submit_job(cfg: LongloomConfig) -> Any:
    """Submits the run to the cluster whose dashboard is at `launch.address` and streams its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    import longloom

    address = cfg.launch.address
    if not Path(cfg.train.output_dir).is_absolute():
        logger.warning(
            "train.output_dir=%r is relative: on the cluster it lands in the job's working directory, "
            "which Ray deletes later; give a path on storage the cluster shares",
            cfg.train.output_dir,
        )
    job_cfg = cfg.model_copy(deep=True)
    job_cfg.launch.address = "auto"
    job_cfg.launch.backend = "ray"
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="longloom-job-") as folder:
        (Path(folder) / "config.yaml").write_text(job_cfg.to_yaml())
        job_id = client.submit_job(
            entrypoint="python -m longloom train config.yaml",
            runtime_env={"working_dir": folder, "py_modules": [os.path.dirname(longloom.__file__)]},
        )
    logger.info("submitted Ray job %s to %s", job_id, address)

    final_states = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    async def stream_logs() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream_logs())
        while (status := client.get_job_status(job_id)) not in final_states:
            time.sleep(_POLL_S)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise
    if status != JobStatus.SUCCEEDED:
        failure = WorkerFailure(
            None, f"Ray job {job_id} ended {status}: {client.get_job_info(job_id).message}"
        )
        raise RunFailed([failure], cfg.launch.max_failures)
    return {"job_id": job_id}
