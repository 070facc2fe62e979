"""Stops an embedded Ray cluster whose driver was killed (SIGKILL, OOM killer): nothing is left running.

The driver stops its embedded cluster itself on every exit it survives (success, failure, Ctrl-C,
SIGTERM). A SIGKILL leaves it no chance, and Ray's own fate sharing covers only part of the tree:
the GCS and raylet get PR_SET_PDEATHSIG from their parent, but the dashboard and runtime-env agents,
the log monitor and the workers are their children and outlive them. So the driver starts this
small watchdog next to the cluster:

- the watchdog runs in a session of its own (a SIGTERM or SIGKILL sent to the driver's process group
  does not reach it) and waits for the driver to end: it holds the read end of a pipe whose only
  writer is the driver, so it reads end-of-file the moment the driver dies, and it also looks at the
  driver's pid once a second (in case a forked child kept the pipe open);
- while it waits, it notes once a second every descendant of the driver (pid and start time, so a
  reused pid is never mistaken for one): the GCS, the raylet, and their children, the agents and
  the workers. Ray starts the agents with an environment of their own, so descendants are what
  finds them. A process started in the last second is found by a mark instead: the driver sets
  LONGLOOM_EMBEDDED_CLUSTER=<random token> before `ray.init`, and the processes Ray starts with
  the driver's environment inherit it;
- when the driver died without stopping the cluster, it kills the noted descendants that still
  run and every process with the mark (SIGKILL, a few sweeps until none is left), and says so on
  stderr; after a normal stop the driver terminates the watchdog.

Why not PR_SET_PDEATHSIG for all of them: it only reaches a process's direct children, it fires
when the forking thread ends (not the process), and Ray starts these processes itself, so we could
not set it on them anyway. Why not the process group: the driver's group may hold processes that
are not ours (`longloom train ... | tee log`), and Ray's processes would be in it either way.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

CLUSTER_MARK_ENV = "LONGLOOM_EMBEDDED_CLUSTER"
_POLL_S = 1.0
_SWEEP_DEADLINE_S = 10.0


def processes_with_mark(mark: str) -> list[int]:
    """Pids of the processes whose environment (as started) carries CLUSTER_MARK_ENV=mark."""
    needle = f"{CLUSTER_MARK_ENV}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path("/proc", entry, "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process; None once it is gone."""
    try:
        fields = Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def process_alive(pid: int) -> bool:
    """False once `pid` exited, also while it is a zombie its parent has not reaped yet."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root` in the process tree."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[1], []).append((int(entry), stat[2]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, started in children.get(stack.pop(), []):
            if pid not in found:
                found[pid] = started
                stack.append(pid)
    return found


class ClusterReaper:
    """Marks the processes this driver's embedded cluster will start and watches over them."""

    def __init__(self) -> None:
        self.mark = uuid.uuid4().hex
        self._previous_mark = os.environ.get(CLUSTER_MARK_ENV)
        os.environ[CLUSTER_MARK_ENV] = self.mark  # inherited by everything ray.init starts now
        read_end, self._write_end = os.pipe()
        environment = {key: value for key, value in os.environ.items() if key != CLUSTER_MARK_ENV}
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "longloom.launch.reaper", str(os.getpid()), self.mark],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
        os.close(read_end)

    def close(self) -> None:
        """The driver stopped the cluster itself: the watchdog is not needed any more."""
        if self._previous_mark is None:
            os.environ.pop(CLUSTER_MARK_ENV, None)
        else:
            os.environ[CLUSTER_MARK_ENV] = self._previous_mark
        self._watchdog.terminate()
        self._watchdog.wait()
        os.close(self._write_end)


def _wait_for_driver(driver_pid: int) -> dict[int, int]:
    """Returns when the driver is gone, with {pid: start time} of every descendant it had."""
    known: dict[int, int] = {}
    while process_alive(driver_pid):
        known |= descendants(driver_pid)
        readable, _, _ = select.select([sys.stdin], [], [], _POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 1):
            break  # end-of-file: the driver's end of the pipe closed, so the driver is gone
    return known


def _still_running(known: dict[int, int], mark: str) -> set[int]:
    """The noted descendants that still run (same start time), marked processes, and their children."""
    running = {pid for pid, started in known.items() if (stat := _stat(pid)) and stat[2] == started}
    running |= set(processes_with_mark(mark))
    for pid in list(running):
        running |= set(descendants(pid))
    running.discard(os.getpid())
    return {pid for pid in running if process_alive(pid)}


def _kill(known: dict[int, int], mark: str) -> int:
    killed: set[int] = set()
    deadline = time.monotonic() + _SWEEP_DEADLINE_S
    while time.monotonic() < deadline:
        left = _still_running(known, mark)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return len(killed)


def main(argv: list[str]) -> int:
    driver_pid, mark = int(argv[0]), argv[1]
    # The driver terminates us after it stopped the cluster itself: exit quietly then.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    known = _wait_for_driver(driver_pid)
    killed = _kill(known, mark)
    if killed:
        print(
            f"longloom: the driver (pid {driver_pid}) ended without stopping its embedded Ray cluster; "
            f"killed its {killed} remaining processes",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
