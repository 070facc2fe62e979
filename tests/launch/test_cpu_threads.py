"""Workers get their share of the node's cores, not the one thread launchers give them by default.

torchrun starts more than one process per node with OMP_NUM_THREADS=1; under it DeepSpeed's CPU Adam
stepped a rank's 4B fp32 values on one core while 15 others idled (8B model on 2 x H200).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from longloom.config import ConfigError, load_config
from longloom.runtime.cpu_threads import worker_cpu_threads
from tests.launch.conftest import REPO, subprocess_env


def test_auto_shares_the_cores_among_the_workers_of_the_node():
    assert worker_cpu_threads("auto", cores=32, workers_here=2) == 16
    assert worker_cpu_threads("auto", cores=33, workers_here=2) == 16
    assert worker_cpu_threads("auto", cores=2, workers_here=4) == 1  # never 0
    assert worker_cpu_threads("auto", cores=16, workers_here=1) == 16
    assert worker_cpu_threads(3, cores=32, workers_here=2) == 3  # the user's number, as written


def test_config_takes_auto_or_a_positive_number(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert load_config(config, []).launch.cpu_threads == "auto"
    assert load_config(config, ["launch.cpu_threads=12"]).launch.cpu_threads == 12
    with pytest.raises(ConfigError, match="cpu_threads"):
        load_config(config, ["launch.cpu_threads=0"])


# CPU Adam updates in a fresh process started the way torchrun starts a worker (OMP_NUM_THREADS=1): first
# after the worker's setup at 1 thread (the control: the check below can fail), then at the given count.
# Prints the OpenMP thread count and how many threads each update added to the process (OpenMP starts
# its team's threads at the first parallel region with more than one).
ADAM_UPDATES = """
import os, sys, torch
from longloom.runtime.cpu_threads import use_worker_cpu_threads
from longloom.runtime.extensions import use_stable_extensions_dir
use_stable_extensions_dir()
from longloom.offload.cpu_adam import cpu_adam_kernel
kernel = cpu_adam_kernel()
param, grad = torch.zeros(1 << 22), torch.ones(1 << 22)  # made at one thread: they start none
moments = (torch.zeros_like(param), torch.zeros_like(param))

def threads_started_by_one_update(setting, step):
    use_worker_cpu_threads(setting)
    before = len(os.listdir("/proc/self/task"))  # torch may start its own pool thread when the count is set
    kernel.update(step, 1e-3, (0.9, 0.999), 1e-8, 0.0, param, grad, *moments)
    return len(os.listdir("/proc/self/task")) - before

at_one = threads_started_by_one_update(1, 1)
assert torch.allclose(param, torch.full_like(param, -1e-3)), param[:4]  # Adam's first step: -lr * sign
at_setting = threads_started_by_one_update(int(sys.argv[1]), 2)
print(os.environ["OMP_NUM_THREADS"], torch.get_num_threads(), at_one, at_setting)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux: /proc/self/task")
def test_cpu_adam_runs_on_the_threads_set_despite_the_launchers_one():
    env = subprocess_env() | {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", ADAM_UPDATES, "2"],  # two: this machine may have only two cores
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    env_threads, torch_threads, started_at_one, started_at_two = map(
        int, done.stdout.strip().splitlines()[-1].split()
    )
    assert (env_threads, torch_threads) == (2, 2)
    assert started_at_one == 0  # the launcher's one thread: the update runs on the calling thread alone
    assert started_at_two == 1  # two threads: the update's OpenMP team starts its second thread
