"""Where DeepSpeed's C++ ops are built: one stable folder per Python environment, built once.

DeepSpeed JIT-compiles its ops (cpu_adam, the CPU shared-memory collectives, ...) with torch's
extension loader on first use, into TORCH_EXTENSIONS_DIR or else ~/.cache/torch_extensions/py311_cpu.
That default is shared by every Python environment of the user: another environment's torch or
DeepSpeed writes different build files there and the next run of ours rebuilds (45-76 s, silently,
in the middle of a run). So the package chooses the folder itself, before anything imports
DeepSpeed, in every process that imports longloom (the driver, Ray workers, torchrun workers):

- TORCH_EXTENSIONS_DIR when the user set it;
- else `<sys.prefix>/torch-extensions`: inside the environment, so it lives and dies with it
  (scripts/setup builds the ops there);
- else, when the environment is not writable (a system Python), a user cache folder keyed by the
  Python, torch and DeepSpeed versions.

`build_deepspeed_ops` builds the ops a run needs before training starts, saying so while it builds;
a run that finds them built builds nothing. Only the standard library is imported at module level:
`longloom/__init__.py` calls `use_stable_extensions_dir` on every import of the package.

The folder is also always built by the same ninja: DeepSpeed loads an op through torch's loader, which
runs the first `ninja` on PATH even when the op is built, and ninja 1.11 and 1.12+ hash build commands
differently, so each takes a folder the other built for changed and rebuilds it. Which one PATH finds
first differs between processes of one environment (`.venv/bin/python` started directly finds the
system's; an activated environment, or a Ray job, whose runtime environment puts bin/ first, finds the
environment's), and such processes took turns rebuilding. Where the environment has its own ninja (the
`ninja` package), a folder holding only a link to it goes first on PATH: nothing else on PATH changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

EXTENSIONS_DIR_ENV = "TORCH_EXTENSIONS_DIR"
# The ops a CPU run loads (DeepSpeed's CPU collectives; CPU Adam for offload.optimizer). Each is
# built only when DeepSpeed can use it here (`is_compatible`).
CPU_COLLECTIVES_OP = "ShareMemCommBuilder"
CPU_ADAM_OP = "CPUAdamBuilder"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def _writable(folder: Path) -> bool:
    """True when `folder` exists and is writable, or can be created in a writable parent."""
    while not folder.exists():
        if folder.parent == folder:
            return False
        folder = folder.parent
    return os.access(folder, os.W_OK)


def stable_extensions_dir() -> Path:
    """The folder this environment's DeepSpeed ops are built into (see the module docstring)."""
    inside_environment = Path(sys.prefix) / "torch-extensions"
    if _writable(inside_environment):
        return inside_environment
    key = (
        f"py{sys.version_info.major}{sys.version_info.minor}"
        f"-torch{_version('torch')}-deepspeed{_version('deepspeed')}"
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "longloom" / "torch-extensions" / key


def use_stable_extensions_dir() -> Path:
    """Sets TORCH_EXTENSIONS_DIR for this process and its children unless the user set it; the ops
    there are built by this environment's ninja where it has one (`use_environment_ninja`)."""
    chosen = os.environ.get(EXTENSIONS_DIR_ENV)
    if not chosen:
        chosen = str(stable_extensions_dir())
        os.environ[EXTENSIONS_DIR_ENV] = chosen
    use_environment_ninja(Path(chosen))
    return Path(chosen)


def use_environment_ninja(extensions_dir: Path) -> None:
    """Makes this environment's ninja the first `ninja` on PATH (this process and its children), so
    that every process builds and checks the ops with the same one (see the module docstring).

    Nothing changes where the environment has no ninja of its own, or PATH already finds it first.
    """
    own = Path(sys.executable).parent / "ninja"
    found = shutil.which("ninja")
    if not own.is_file() or (found is not None and os.path.samefile(found, own)):
        return
    folder = extensions_dir / "ninja-bin"
    link = folder / "ninja"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (link.exists() and os.path.samefile(link, own)):  # else made by an earlier process
            # Made aside and renamed into place: processes starting together never see half a link.
            fresh = folder / f"ninja.{os.getpid()}"
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(own)
            os.replace(fresh, link)
    except OSError:
        return  # a folder we cannot write: PATH's ninja, as before
    os.environ["PATH"] = str(folder) + os.pathsep + os.environ.get("PATH", "")


def _is_built(folder: Path, op_name: str) -> bool:
    # torch's loader writes <dir>/<name>/<name>.so (or <name>_v<N>.so after a source change).
    return any((folder / op_name).glob(f"{op_name}*.so"))


def needed_ops(offload_optimizer: str, on_cpu: bool) -> list[str]:
    """DeepSpeed op builders a run of this kind loads: CPU collectives on CPU, CPU Adam for offload."""
    ops = [CPU_COLLECTIVES_OP] if on_cpu else []
    if offload_optimizer != "none":
        ops.append(CPU_ADAM_OP)
    return ops


def build_deepspeed_ops(builder_names: list[str]) -> list[str]:
    """Builds the named DeepSpeed ops that are not built yet; returns the names of those it built.

    Several workers may call this at once: torch's loader holds a lock file per op, so one builds and
    the others wait for it, then find it built.
    """
    folder = use_stable_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    built = []
    for builder_name in builder_names:
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None or not builder.is_compatible(verbose=False) or _is_built(folder, builder.name):
            continue
        logger.warning(
            "building DeepSpeed op %s once into %s (about a minute; later runs reuse it; "
            "set %s to choose another folder)",
            builder.name,
            folder,
            EXTENSIONS_DIR_ENV,
        )
        started = time.monotonic()
        builder.load(verbose=False)
        logger.warning("built DeepSpeed op %s in %.0f s", builder.name, time.monotonic() - started)
        built.append(builder.name)
    return built
