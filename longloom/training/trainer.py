"""The training loop: a `Trainer` (build, train_step, train, state_dict) behind `run_training(cfg)`.

`run_training(cfg)` is what every launcher calls (in-process, torchrun, Ray). The Trainer builds, in
order, each phase logged with its duration on rank 0: the process group and the run plan
(training/plan.py: split, dtype, MLP tiles, optimizer GPU share, memory, decided once), the model, the
DeepSpeed engine, the data (and the state of a resumed run); then it runs `train_step` per step.

Per step: the loader gives this data-parallel rank its micro batches of the global batch, ParallelDims
cuts tokens / position ids / labels over the SP group, the model runs SP attention inside, the
token-weighted loss is normalised by the count of valid labels over the whole dp x sp world, and
DeepSpeed averages gradients over that world (ZeRO partitions over it too). Since every rank holds
the same parameters, averaging over dp x sp of `local_sum / global_count * world` is exactly the
gradient of the global mean loss, whatever the split.

Around the step, separate pieces: failure injection (training/failure_injection.py), the NaN/inf guard
(training/nonfinite.py), checkpoint bookkeeping (training/checkpoint_schedule.py: lazy asynchronous
saves, never from a non-finite step) and the activation-offload report (training/offload_report.py).
Re-running the same command resumes from the newest checkpoint whose checksums verify
(checkpointing/resume.py), on any split. Nothing under train.output_dir is written before the run
really starts: a refused resume leaves config.yaml as it was, and a resume with nothing left to do
changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from longloom.checkpointing.commit import atomic_write_text, read_commit
from longloom.checkpointing.resume import find_latest_verified
from longloom.config import LongloomConfig
from longloom.data.loader import GlobalBatchLoader
from longloom.data.synthetic import build_dataset
from longloom.offload.optimizer import build_optimizer
from longloom.parallel.dims import ParallelDims
from longloom.parallel.loss import IGNORE_INDEX, LossStats
from longloom.runtime.process import device_for_rank, init_distributed
from longloom.runtime.ranks import attempt_number
from longloom.training.checkpoint_schedule import CheckpointSchedule
from longloom.training.engine import build_model, deepspeed_config, lr_lambda
from longloom.training.evaluation import eval_batches, eval_dataset, evaluate_loss
from longloom.training.failure_injection import FailureInjection
from longloom.training.gpu_memory_report import (
    allocation_history_line,
    deepspeed_streams,
    gpu_memory_line,
    start_allocation_history,
)
from longloom.training.metrics import MetricsLogger
from longloom.training.nonfinite import NonFiniteGuard, NonFiniteTrainingError, step_is_finite
from longloom.training.offload_report import log_activation_offload
from longloom.training.plan import RunPlan, build_run_plan, global_tokens_per_step, resolve_dtype
from longloom.training.run_ahead import limit_run_ahead

logger = logging.getLogger("longloom")

# Importable from here as before (bench/, tests): the pieces now live in their own files.
__all__ = [
    "NonFiniteTrainingError",
    "Trainer",
    "accumulate_gradients",
    "build_model",
    "deepspeed_config",
    "lr_lambda",
    "resolve_dtype",
    "run_training",
    "split_micro_batches",
]


def split_micro_batches(batch: dict[str, torch.Tensor], accum: int) -> list[dict[str, torch.Tensor]]:
    """This rank's samples of an optimizer step [accum x micro, S] -> accum micro batches [micro, S]."""
    parts = {name: tensor.chunk(accum) for name, tensor in batch.items()}
    return [{name: chunks[i] for name, chunks in parts.items()} for i in range(accum)]


def accumulate_gradients(engine, micro_batches: list[dict[str, torch.Tensor]], before_step) -> LossStats:
    """Forward + backward of every micro batch, then the optimizer step; the step's global loss stats.

    The loss of the optimizer step is the mean over the valid labels of ALL its micro batches, so each
    micro loss (parallel/loss.py normalises by its own global count c) is rescaled by c / C, C the count
    over the whole step, known before any forward (the labels are): then the accumulated gradient is that
    of the step's global mean loss, exactly as one big batch. DeepSpeed's own 1/accum scaling is off.
    """
    world = dist.group.WORLD
    step_count = None
    if len(micro_batches) > 1:
        counts = torch.stack([(batch["labels"] != IGNORE_INDEX).sum() for batch in micro_batches]).double()
        dist.all_reduce(counts, group=world)
        step_count = counts.sum().clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.long)
    for batch in micro_batches:
        # The LM head is fused into the loss (no [tokens, vocab] logits), called through the module so
        # ZeRO-3 gathers its weight. Normalised by the valid-label count over the whole dp x sp world,
        # matching DeepSpeed's gradient averaging over that world (see the module docstring).
        loss, stats = engine(
            batch["tokens"],
            batch["position_ids"],
            labels=batch["labels"],
            loss_group=world,
            document_ids=batch.get("document_ids"),
        )
        if step_count is not None:
            loss = loss * (stats.tokens.clamp(min=1).double() / step_count).to(loss.dtype)
        engine.backward(loss, scale_wrt_gas=False)
        loss_sum += stats.loss.double().cpu() * stats.tokens.cpu()
        tokens += stats.tokens.cpu()
        before_step()  # the lazy snapshot of the last save overlapped fwd/bwd
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
    return LossStats(loss=(loss_sum / tokens.clamp(min=1)).float(), tokens=tokens)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {rank}] %(message)s", force=True)


class StepResult(NamedTuple):
    values: dict[str, float]  # loss, grad_norm, lr, valid_tokens (the metrics of the step)
    finite: bool  # loss and gradient norm are finite


class Trainer:
    """One rank's training run: `build()`, then `train()` (or `train_step(step)` step by step)."""

    def __init__(self, cfg: LongloomConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.start_step = 0
        self.step = 0
        self.losses: list[float] = []

    # -- build ----------------------------------------------------------------------------------------

    def _phase_done(self, what: str, started: float) -> None:
        if self.rank == 0:
            logger.info("%s in %.1f s", what, time.perf_counter() - started)

    def build(self) -> bool:
        """Builds everything for this rank; False when the newest checkpoint already reached train.steps."""
        import deepspeed  # heavy import, kept out of module import time for the CLI's `check`

        cfg = self.cfg
        self.rank, self.world_size = init_distributed(timeout_s=cfg.launch.collective_timeout_s)
        _setup_logging(self.rank)
        self.device = device_for_rank()
        # Collective with offload.gpu_share=auto (rank 0's measured update rates); before the seed below,
        # so the measurement's random buffers do not touch the model's initial weights.
        self.plan = plan = build_run_plan(cfg, self.world_size, self.device)
        self.dims = ParallelDims.build(dp=plan.dp, ulysses=plan.ulysses, ring=plan.ring)
        # Decided before anything is built or written (collective: every rank hashes a share).
        latest = find_latest_verified(self.output_dir / "checkpoints") if cfg.checkpoint.resume else None
        self.start_step = read_commit(latest)["step"] if latest is not None else 0
        if self.start_step >= cfg.train.steps:
            if self.rank == 0:
                logger.info(
                    "nothing to train: the newest checkpoint %s is at step %d and train.steps=%d; nothing was "
                    "changed. Set train.steps above %d to train further.",
                    latest, self.start_step, cfg.train.steps, self.start_step,
                )  # fmt: skip
            return False
        if self.rank == 0:
            logger.info(
                "split: dp=%d ulysses=%d ring=%d (%d workers, %s, %s, backend %s)",
                plan.dp, plan.ulysses, plan.ring, self.world_size, self.device.type, plan.dtype, dist.get_backend(),
            )  # fmt: skip
            if plan.device_layers:
                logger.info(
                    "layer inputs kept in GPU memory: %d (%s)", plan.device_layers, plan.device_layers_source
                )
        self._build_model(plan)
        self._build_engine(deepspeed, plan)
        self._build_data_and_resume(latest)
        self._build_step_pieces()
        return True

    def _build_model(self, plan: RunPlan) -> None:
        started = time.perf_counter()
        # Same seed on every rank before construction: identical initial weights whatever the split.
        torch.manual_seed(self.cfg.train.seed)
        self.ds_config = deepspeed_config(self.cfg, plan.dtype)
        self.model, self.offloader = build_model(
            self.cfg, self.dims, self.device, plan.dtype, self.ds_config, mlp_tiles=plan.mlp_tiles,
            device_layers=plan.device_layers,
        )  # fmt: skip
        # ZeRO-3's gathers are what the host's lead costs memory for (training/run_ahead.py). Bound before
        # deepspeed.initialize: the bound's hook then runs before the gathers for each layer.
        self.run_ahead = (
            limit_run_ahead(self.model.decoder_layers(), self.device)
            if self.cfg.train.zero_stage == 3 and not self.cfg.debug.unbounded_run_ahead
            else None
        )
        # hf: models: model.* now holds the folder's shape (data checks, config.yaml, checkpoint metadata).
        self.cfg = plan.config
        self.flops_per_token = self.model.flops_per_token(self.cfg.data.seq_len)
        m = self.cfg.model
        parameters = self.model.num_parameters() / 1e6
        self._phase_done(
            f"model: {m.source}, {parameters:.2f}M parameters, layers {''.join(m.layer_kinds())}, built",
            started,
        )

    def _build_engine(self, deepspeed, plan: RunPlan) -> None:
        started = time.perf_counter()
        # DeepSpeed print()s "DeepSpeed shm_comm_op built successfully" on every rank each time it loads the
        # op (the build itself is announced by launch/worker_setup.py); its logging is untouched by this.
        with contextlib.redirect_stdout(io.StringIO()) as deepspeed_prints:
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=self.model,
                model_parameters=self.model.parameters(),
                optimizer=build_optimizer(self.cfg, self.model.parameters(), gpu_share=plan.gpu_share),
                config=self.ds_config,
                lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lr_lambda(self.cfg)
                ),
                dist_init_required=False,
            )
        if deepspeed_prints.getvalue().strip():
            logger.debug("deepspeed.initialize printed: %s", deepspeed_prints.getvalue().strip())
        self._phase_done(f"DeepSpeed engine (ZeRO stage {self.cfg.train.zero_stage}) ready", started)

    def _build_data_and_resume(self, latest: Path | None) -> None:
        started = time.perf_counter()
        cfg = self.cfg
        dataset = build_dataset(cfg.data, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
        # The loader gives this dp rank all grad_accum micro batches of an optimizer step at once (global
        # batch dp x micro x accum), so a step's samples do not depend on how they are split into micro steps.
        self.loader = GlobalBatchLoader(
            dataset, cfg.train.micro_batch_size * cfg.train.grad_accum, self.dims.dp_rank, self.plan.dp,
            seed=cfg.train.seed,
        )  # fmt: skip
        self.checkpoints = CheckpointSchedule(
            cfg.checkpoint, self.output_dir / "checkpoints", cfg.train.steps, latest, self.rank
        )
        if latest is not None:
            self.load_state_dict(self.checkpoints.load(latest, self.engine))
            self._phase_done(f"resumed from {latest} (step {self.start_step})", started)
        else:
            self._phase_done(f"data ({cfg.data.source}) ready", started)
        if self.rank == 0:
            # Only now that the run really starts (a refused resume raised above).
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", cfg.to_yaml())

    def _build_step_pieces(self) -> None:
        cfg = self.cfg
        # Held-out loss (train.eval_every): the same split and loss as training, forward only.
        self.eval_data = eval_dataset(cfg) if cfg.train.eval_every else None
        self.metrics = MetricsLogger(
            self.output_dir, self.rank == 0, cfg.train.steps, self.start_step, self.device
        )
        self.failure_injection = FailureInjection(
            cfg.debug.fail_at_step, self.rank, self.world_size, attempt_number()
        )
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the engine's state: step, data position, RNG, config."""
        return {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": {str(self.rank): _rng_state()},
            "config": self.cfg.model_dump(mode="json", by_alias=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.start_step = self.step = int(state["step"])
        rng = state.get("rng", {}).get(str(self.rank))
        if rng is not None:
            _set_rng_state(rng)

    # -- one step -------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        """Forward, backward and optimizer step of `step` (1-based) on this rank's share of its batch."""
        self.step = step
        self.failure_injection.before_step(step)
        micro_batches = [
            {
                name: tensor.to(self.device, non_blocking=True)
                for name, tensor in self.dims.shard_batch(part).items()
            }
            for part in split_micro_batches(
                self.dims.balance_documents(self.loader.batch(step - 1)), self.cfg.train.grad_accum
            )
        ]
        stats = accumulate_gradients(self.engine, micro_batches, self.checkpoints.wait_for_snapshot)
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "loss": stats.loss.item(),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "valid_tokens": int(stats.tokens.item()),
        }
        finite = step_is_finite(values["loss"], None if grad_norm is None else values["grad_norm"])
        return StepResult(values, finite)

    def _evaluate_if_due(self, step: int, values: dict[str, float]) -> float:
        """Adds eval_loss on train.eval_every steps (and the last); returns the seconds it took."""
        t = self.cfg.train
        if self.eval_data is None or not (step % t.eval_every == 0 or step == t.steps):
            return 0.0
        started = time.perf_counter()
        micro_batches = eval_batches(self.eval_data, t.micro_batch_size, self.dims)
        values["eval_loss"] = evaluate_loss(self.engine, micro_batches, self.dims, self.device)
        return time.perf_counter() - started

    # -- the loop -------------------------------------------------------------------------------------

    def _log_first_step_memory(self, recording_history: bool) -> None:
        """The GPU memory line (and, under debug.gpu_memory_history, where side streams' memory came from)."""
        streams = {
            **(self.offloader.side_streams() if self.offloader else {}),
            **deepspeed_streams(self.engine),
        }
        for line in (
            gpu_memory_line(self.device, streams),
            allocation_history_line(self.device, streams) if recording_history else None,
        ):
            if line is not None:
                logger.info("%s", line)

    def train(self) -> dict[str, Any]:
        """Steps start_step + 1 .. train.steps; returns the summary (meaningful on rank 0)."""
        t = self.cfg.train
        try:
            recording_history = (
                self.cfg.debug.gpu_memory_history and self.rank == 0 and start_allocation_history(self.device)
            )
            for step in range(self.start_step + 1, t.steps + 1):
                self.metrics.step_started()
                started = time.perf_counter()
                result = self.train_step(step)
                self.losses.append(result.values["loss"])
                self.nonfinite.observe(step, result.finite)
                if step == self.start_step + 1:
                    self._phase_done(f"first step ({step})", started)
                    if self.offloader is not None and self.rank == 0:
                        log_activation_offload(self.offloader)
                    if self.rank == 0:
                        self._log_first_step_memory(recording_history)
                eval_s = self._evaluate_if_due(step, result.values)
                write = (
                    step % t.log_every == 0
                    or step == t.steps
                    or not result.finite
                    or "eval_loss" in result.values
                )
                self.metrics.log(
                    step, result.values, global_tokens_per_step(self.plan), self.flops_per_token, self.world_size,
                    write, excluded_s=eval_s,
                )  # fmt: skip
                self.nonfinite.check(self.checkpoints.newest)
                self.checkpoints.after_step(step, result.finite, self.engine, self.state_dict)
            self.checkpoints.close()
        except NonFiniteTrainingError:
            self.checkpoints.close()  # the checkpoint in flight was saved from a finite state: commit it
            raise
        except BaseException:
            self.checkpoints.close(abort=True)
            raise
        finally:
            self.metrics.close()
        if dist.is_initialized():
            dist.barrier()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "losses": self.losses,
            "steps": self.cfg.train.steps,
            "output_dir": str(self.output_dir),
            "start_step": self.start_step,
        }


def run_training(cfg: LongloomConfig) -> dict[str, Any]:
    """Trains according to `cfg` on this process's rank; returns a summary (meaningful on rank 0)."""
    trainer = Trainer(cfg)
    if not trainer.build():
        return trainer.summary()
    return trainer.train()
