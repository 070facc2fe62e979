"""`launch.address=http://head:8265`: the run is submitted as a Ray job to that cluster's dashboard.

The resolved config and this longloom package travel with the job (its working_dir and py_modules);
its logs are streamed here until it ends. The job's driver runs `longloom train config.yaml` with
launch.address=auto, i.e. the Ray launcher on that cluster.

Same interpreter, same environment: the entrypoint is this process's `sys.executable` (shlex-quoted),
not a bare `python` that resolves to whatever the cluster's PATH finds first, and the job's runtime
environment makes its workers use that interpreter too, with its bin/ first on PATH. The cluster's
nodes must therefore have this environment at the same path (one image for the cluster and the
submitting machine, or a shared file system), as with any Ray job that uses local packages.

The dashboard is probed before submitting: an address where nothing answers fails after
`launch.connect_timeout_s` with a message, rather than the HTTP client's unbounded wait.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from longloom.config import LongloomConfig
from longloom.launch.ray_cluster import same_environment, wait_until_reachable
from longloom.launch.supervisor import RunFailed, WorkerFailure

logger = logging.getLogger(__name__)

_POLL_S = 1.0


def job_entrypoint(config_name: str) -> str:
    """The job's command: this interpreter running longloom on the config in the job's folder."""
    return f"{shlex.quote(sys.executable)} -m longloom train {shlex.quote(config_name)}"


def job_config(cfg: LongloomConfig) -> LongloomConfig:
    """The config the job runs: the same run, through the Ray launcher on the cluster it runs on."""
    job_cfg = cfg.model_copy(deep=True)
    job_cfg.launch.address = "auto"
    job_cfg.launch.backend = "ray"
    return job_cfg


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
    wait_until_reachable(
        address,
        cfg.launch.connect_timeout_s,
        "Ray dashboard",
        "check the address (the head node's dashboard, port 8265 by default) and that the cluster is up, "
        "or set launch.address=null to train on an embedded cluster on this machine",
    )
    client = JobSubmissionClient(address)
    runtime_env = same_environment()
    with tempfile.TemporaryDirectory(prefix="longloom-job-") as folder:
        (Path(folder) / "config.yaml").write_text(job_config(cfg).to_yaml())
        runtime_env |= {"working_dir": folder, "py_modules": [str(Path(longloom.__file__).parent)]}
        job_id = client.submit_job(entrypoint=job_entrypoint("config.yaml"), runtime_env=runtime_env)
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
