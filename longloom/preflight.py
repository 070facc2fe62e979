"""Preflight: every check a run can fail deterministically, made once before any worker starts.

`longloom train` runs `preflight(cfg)` before it launches anything; `longloom check` runs the same
function and says "config OK" only when it passes, so check and train cannot disagree. A failed check
raises ConfigError (exit 2, one message with the fix) and leaves nothing behind; a run that only a
worker would reject would otherwise fail after the cluster started, and be retried in vain
(launch.max_failures).

The checks, in order (`PREFLIGHT_CHECKS`; a new deterministic check is one more function there):
- hf model: for model.source hf:<folder>, config.json, the architecture (SP support) and the
  safetensors headers against it (models/hf_loading.check_hf_folder), no weights read;
- layout: the run plan (training/plan.py): the dp x ulysses x ring split and its divisibility rules,
  dtype, MLP tiles, optimizer GPU share and memory estimate, made once and kept in the report;
- data: the source opens as the workers will open it (folder, index, shards, token ids) and its
  vocabulary, and data.tokenizer's, fit the model's (the folder's vocab_size for hf: models);
- output: train.output_dir is, or can be created as, a folder we may write (probed, then removed);
- eval data: with train.eval_every, data.eval_source (or held-out synthetic draws) opens the same way;
- resume: a checkpoint under train.output_dir fits the configured model (training/resume.py);
- memory: the plan's estimate (offload/memory.py) against the GPU when there is one, against this host when
  the run trains on its CPU, and the pinned host memory; what could not be checked is said plainly. The
  machine is this one unless given (`longloom check --gpus-per-host N --gpu-memory-gib G --host-memory-gib H`
  plans a GPU run from a machine without GPUs, or for a Ray cluster's hosts).
What cannot be checked from here (a remote cluster's files and devices) is reported in `notes`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longloom.config import ConfigError, LongloomConfig

if TYPE_CHECKING:
    from longloom.runtime.machine import Machine
    from longloom.training.plan import RunPlan

# The memory estimate comes out 12-23% above the peaks measured on an H200 (offload/memory.py): a run is
# refused only when it would not fit even if the estimate were this much too high.
ESTIMATE_SLACK = 1.25


@dataclass
class PreflightReport:
    """What the checks found: the run plan (split, dtype, tiles, GPU share, memory) and what they could not check."""

    plan: RunPlan | None = None
    notes: list[str] = field(default_factory=list)
    # The host the run is planned for; None: this machine (`longloom check --gpus-per-host ...` gives one).
    machine: Machine | None = None

    @property
    def split(self) -> tuple[int, int, int] | None:
        return self.plan.split if self.plan is not None else None

    @property
    def estimate(self) -> dict[str, Any] | None:
        return self.plan.memory if self.plan is not None else None


PreflightCheck = Callable[[LongloomConfig, PreflightReport], None]


def _remote_cluster(cfg: LongloomConfig) -> str | None:
    """The address when the workers run on another machine (a Ray job submitted over HTTP)."""
    address = cfg.launch.address or ""
    return address if address.startswith(("http://", "https://")) else None


def run_plan(cfg: LongloomConfig, report: PreflightReport) -> RunPlan:
    """The report's run plan for launch.workers workers, made on first use (ConfigError for a bad split)."""
    if report.plan is None:
        from longloom.training.plan import build_run_plan

        report.plan = build_run_plan(cfg, cfg.launch.workers, machine=report.machine)
    return report.plan


def check_layout(cfg: LongloomConfig, report: PreflightReport) -> None:
    run_plan(cfg, report)


def check_hf_model(cfg: LongloomConfig, report: PreflightReport) -> None:
    """model.source hf:<folder>: config.json, the architecture and every safetensors header, no weights read."""
    if not cfg.model.is_hf:
        return
    from longloom.models.hf_loading import check_hf_folder, hf_folder, resolve_hf_model

    try:
        _, hf_config = resolve_hf_model(cfg.model, cfg.data.seq_len)
        check_hf_folder(hf_folder(cfg.model.source), hf_config, cfg.data.seq_len)
    except ValueError as error:
        raise ConfigError(f"model.source={cfg.model.source!r}: {error}") from None


def data_tokenizer(cfg: LongloomConfig) -> str:
    """data.tokenizer, or its default: an hf: model folder's own tokenizer when it has one, else bytes."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    if cfg.model.is_hf:
        folder = Path(cfg.model.source[len("hf:") :]).expanduser()
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return "bytes"


def check_data(cfg: LongloomConfig, report: PreflightReport) -> None:
    """Opens data.source as every worker will (data/arrow.py validates the index, shards and token ids).

    The data's and the tokenizer's vocabulary must fit the model's (for hf: models the folder's
    vocab_size, often padded above the tokenizer's: only a larger tokenizer is an error).
    """
    from longloom.data.synthetic import SYNTHETIC_PREFIX, build_dataset
    from longloom.data.tokenize import load_tokenizer

    model = run_plan(cfg, report).config.model  # hf: the folder's shapes
    what = f"the model's vocab_size {model.vocab_size} ({'config.json of ' + cfg.model.source if cfg.model.is_hf else 'model.vocab_size'})"
    tokenizer_spec = data_tokenizer(cfg)
    if tokenizer_spec != "bytes" or cfg.data.tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer_spec)
        if tokenizer.vocab_size > model.vocab_size:
            raise ConfigError(
                f"data.tokenizer={tokenizer_spec!r} has {tokenizer.vocab_size} tokens, more than {what}: use the "
                "model's own tokenizer (data.tokenizer) or a model with a large enough vocabulary"
            )
    remote = _remote_cluster(cfg)
    if remote and not cfg.data.source.startswith(SYNTHETIC_PREFIX):
        report.notes.append(f"data.source not checked here: it is read on the cluster at {remote}")
        return
    dataset = build_dataset(cfg.data, seed=cfg.train.seed)
    if dataset.vocab_size > model.vocab_size:
        raise ConfigError(
            f"data.source={cfg.data.source!r} uses a vocabulary of {dataset.vocab_size} tokens, more than {what}: "
            "prepare the data with the model's tokenizer (longloom data prepare --tokenizer), or "
            + (
                "use a model with that vocabulary"
                if cfg.model.is_hf
                else f"set model.vocab_size={dataset.vocab_size}"
            )
        )


def check_output_dir(cfg: LongloomConfig, report: PreflightReport) -> None:
    """train.output_dir exists as a writable folder, or its nearest existing parent is one; nothing is left."""
    remote = _remote_cluster(cfg)
    if remote:
        report.notes.append(f"train.output_dir not checked here: it is written on the cluster at {remote}")
        return
    output_dir = Path(cfg.train.output_dir).expanduser()
    existing = output_dir
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(
                f"train.output_dir={cfg.train.output_dir!r}: {str(existing)!r} is a broken symbolic link; fix "
                "it or choose another train.output_dir"
            )
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"lies under the file {str(existing)!r}"
        raise ConfigError(
            f"train.output_dir={cfg.train.output_dir!r} {where}, not a folder: choose another train.output_dir"
        )
    try:
        # A real probe: permissions, read-only file systems and quotas all show here.
        Path(tempfile.mkdtemp(prefix=".longloom-write-probe-", dir=existing)).rmdir()
    except OSError as error:
        raise ConfigError(
            f"train.output_dir={cfg.train.output_dir!r} cannot be written: {str(existing)!r} refuses new files "
            f"({error.strerror}); choose a train.output_dir where you may write"
        ) from None


def _memory_advice() -> str:
    return (
        "raise the SP degree (parallel.ulysses / parallel.ring, with launch.workers), set offload.activations "
        "and offload.optimizer, lower offload.device_activations, lower data.seq_len or "
        "train.micro_batch_size, or use a smaller model"
    )


def check_memory(cfg: LongloomConfig, report: PreflightReport) -> None:
    """The memory estimate against the GPU of the planned machine, or its host when the run trains on CPUs,
    and the pinned host memory."""
    from longloom.offload.memory import check_host_memory, human_bytes

    # hf: models: the folder's shapes as model.* (a Llama-like estimate: the families longloom runs are).
    plan = run_plan(cfg, report)
    estimate, machine = plan.memory, plan.machine
    per_worker = estimate["per_gpu"]["total"]
    if cfg.launch.address is not None and report.machine is None:
        report.notes.append(
            f"GPU and host memory not checked: the workers run on the Ray cluster at launch.address="
            f"{cfg.launch.address}, whose machines this one cannot see (give them to `longloom check` with "
            "--gpus-per-host, --gpu-memory-gib and --host-memory-gib)"
        )
        return
    if machine.has_gpus:
        if per_worker > ESTIMATE_SLACK * machine.gpu_bytes:
            raise ConfigError(
                f"estimated GPU memory per worker: {human_bytes(per_worker)} (activations "
                f"{human_bytes(estimate['per_gpu']['activations'])}), more than {machine.gpu_name} has "
                f"({human_bytes(machine.gpu_bytes)}): {_memory_advice()}"
            )
        if per_worker > machine.gpu_bytes:
            report.notes.append(
                f"the estimate ({human_bytes(per_worker)} per GPU) is above {machine.gpu_name}'s "
                f"{human_bytes(machine.gpu_bytes)}; estimates run 12-23% high, so the run may still fit"
            )
    else:
        # Without CUDA the workers train on this machine's CPU: their working memory is host memory.
        needed = per_worker * estimate["workers_per_host"] + estimate["host_pinned_per_host"]
        if needed > ESTIMATE_SLACK * machine.host_bytes:
            raise ConfigError(
                f"no GPU here, so the run would train on this machine's CPU: {estimate['workers_per_host']} "
                f"workers x {human_bytes(per_worker)} (activations {human_bytes(estimate['per_gpu']['activations'])})"
                f" need {human_bytes(needed)} of memory, this host has {human_bytes(machine.host_bytes)}: "
                f"{_memory_advice()}; or run it on GPUs (`longloom check --gpus-per-host ...` plans for them)"
            )
        report.notes.append(
            "GPU memory not checked: no CUDA device on this machine (the run trains on its CPU)"
        )
    from longloom.training.plan import build_run_plan

    check_host_memory(
        plan.config,
        plan,
        estimate,
        replan=lambda variant: build_run_plan(variant, cfg.launch.workers, machine=machine).memory,
    )


def check_eval_data(cfg: LongloomConfig, report: PreflightReport) -> None:
    """train.eval_every needs held-out data that opens like data.source (training/evaluation.py)."""
    if not cfg.train.eval_every or (cfg.launch.address or "").startswith(("http://", "https://")):
        return
    from longloom.training.evaluation import eval_dataset

    eval_dataset(run_plan(cfg, report).config)  # hf: models: the folder's vocab_size


def check_resume(cfg: LongloomConfig, report: PreflightReport) -> None:
    """A checkpoint under train.output_dir written for another model shape cannot be resumed."""
    if not cfg.checkpoint.resume:
        return
    from longloom.training.resume import check_resume_compatible

    check_resume_compatible(cfg)


# The order matters only for which message a config with several faults shows first.
PREFLIGHT_CHECKS: list[PreflightCheck] = [
    check_hf_model,
    check_layout,
    check_data,
    check_eval_data,
    check_output_dir,
    check_resume,
    check_memory,
]


def preflight(
    cfg: LongloomConfig, checks: list[PreflightCheck] | None = None, machine: Machine | None = None
) -> PreflightReport:
    """Runs every check (default PREFLIGHT_CHECKS); ConfigError / ValueError on the first that fails.
    `machine`: the host to plan for (default this one, as the workers will see it when started here)."""
    report = PreflightReport(machine=machine)
    for check in PREFLIGHT_CHECKS if checks is None else checks:
        check(cfg, report)
    return report


def describe_notes(report: PreflightReport) -> str:
    return "".join(f"# note: {note}\n" for note in report.notes)
