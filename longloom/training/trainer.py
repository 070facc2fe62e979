"""The training loop: one `run_training(cfg)` used by every launcher (in-process, torchrun, Ray).

Per step: the loader gives this data-parallel rank its micro batch of the global batch, ParallelDims
cuts tokens / position ids / labels over the SP group, the model runs SP attention inside, the
token-weighted loss is normalised by the count of valid labels over the whole dp x sp world, and
DeepSpeed averages gradients over that world (ZeRO partitions over it too). Since every rank holds
the same parameters, averaging over dp x sp of `local_sum / global_count * world` is exactly the
gradient of the global mean loss, whatever the split.

Checkpoints: the lazy asynchronous checkpointer snapshots right after a step and only makes the next
optimizer step wait; re-running the same command resumes from the newest checkpoint whose checksums
verify (checkpointing/resume.py), on any split. Nothing under train.output_dir is written before the
run really starts: a refused resume leaves config.yaml as it was, and a resume with nothing left to do
changes nothing.

A NaN/inf loss or gradient norm is never checkpointed; `train.max_nonfinite_steps` of them in a row
stop the run (NonFiniteTrainingError) after committing the checkpoint still in flight, which was
saved from a finite state.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longloom.checkpointing.commit import atomic_write_text, read_commit
from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer
from longloom.checkpointing.resume import find_latest_verified
from longloom.config import LongloomConfig, resolve_model, validate_layout
from longloom.data.loader import GlobalBatchLoader
from longloom.data.synthetic import build_dataset
from longloom.models.llama import LlamaModel, plain_checkpoint
from longloom.offload.activations import ActivationOffloader
from longloom.offload.memory import human_bytes
from longloom.offload.optimizer import build_optimizer, optimizer_settings
from longloom.parallel.dims import ParallelDims
from longloom.parallel.loss import IGNORE_INDEX, LossStats
from longloom.runtime.failures import DeterministicFailure
from longloom.runtime.process import device_for_rank, init_distributed
from longloom.runtime.ranks import attempt_number
from longloom.training.evaluation import eval_batches, eval_dataset, evaluate_loss
from longloom.training.metrics import MetricsLogger

logger = logging.getLogger("longloom")


class NonFiniteTrainingError(DeterministicFailure):
    """The loss or gradient norm was NaN/inf for train.max_nonfinite_steps steps in a row."""


def resolve_dtype(cfg: LongloomConfig, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def lr_lambda(cfg: LongloomConfig):
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at the last step."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: LongloomConfig, dtype: torch.dtype) -> dict[str, Any]:
    t = cfg.train
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    config.update(optimizer_settings(cfg))
    return config


def build_model(
    cfg: LongloomConfig,
    dims: ParallelDims,
    device: torch.device,
    dtype: torch.dtype,
    ds_config: dict[str, Any],
) -> tuple[torch.nn.Module, ActivationOffloader | None]:
    """The model of model.source with the trainer's call (LlamaModel or HFCausalLM), and its activation offloader.

    hf:<folder>: transformers builds the folder's architecture and loads its weights; under ZeRO-3 inside
    deepspeed.zero.Init with the engine's config, so each rank reads only its partitions.
    """
    share = cfg.offload.activation_share
    if not cfg.model.is_hf:
        offloader = ActivationOffloader(share, device) if share > 0 else None
        checkpoint_fn = offloader.checkpoint if offloader else plain_checkpoint
        return LlamaModel(cfg.model, dims, checkpoint_fn=checkpoint_fn), offloader
    from longloom.models.hf_causal_lm import HFCausalLM
    from longloom.models.hf_loading import build_hf_causal_lm, hf_folder, resolve_hf_model
    from longloom.models.hf_offload import enable_activation_offload

    _, hf_config = resolve_hf_model(cfg.model, cfg.data.seq_len)
    causal_lm = build_hf_causal_lm(
        hf_folder(cfg.model.source),
        hf_config,
        seq_len=cfg.data.seq_len,
        dtype=dtype,
        device=device,
        zero3_config=ds_config if cfg.train.zero_stage == 3 else None,
    )
    model = HFCausalLM(causal_lm, dims)  # installs SP attention first: offload then keeps attention outputs
    offloader = None
    if share > 0:
        offloader = enable_activation_offload(causal_lm, share, device)
    elif cfg.model.activation_checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    causal_lm.train()  # HF checkpoints (and offloads) in training mode only
    return model, offloader


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


def run_training(cfg: LongloomConfig) -> dict[str, Any]:
    """Trains according to `cfg` on this process's rank; returns a summary (meaningful on rank 0)."""
    import deepspeed  # heavy import, kept out of module import time for the CLI's `check`

    rank, world_size = init_distributed(timeout_s=cfg.launch.collective_timeout_s)
    _setup_logging(rank)
    dp, ulysses, ring = validate_layout(cfg, world_size)
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    device = device_for_rank()
    dtype = resolve_dtype(cfg, device)
    output_dir = Path(cfg.train.output_dir)
    # Decided before anything is built or written (collective: every rank hashes a share).
    latest = find_latest_verified(output_dir / "checkpoints") if cfg.checkpoint.resume else None
    saved = read_commit(latest)["step"] if latest is not None else 0
    if saved >= cfg.train.steps:
        if rank == 0:
            logger.info(
                "nothing to train: the newest checkpoint %s is at step %d and train.steps=%d; nothing was "
                "changed. Set train.steps above %d to train further.",
                latest,
                saved,
                cfg.train.steps,
                saved,
            )
        return {
            "rank": rank,
            "losses": [],
            "steps": cfg.train.steps,
            "output_dir": str(output_dir),
            "start_step": saved,
        }
    if rank == 0:
        logger.info(
            "split: dp=%d ulysses=%d ring=%d (%d workers, %s, %s, backend %s)",
            dp,
            ulysses,
            ring,
            world_size,
            device.type,
            dtype,
            dist.get_backend(),
        )

    # Same seed on every rank before construction: identical initial weights whatever the split.
    torch.manual_seed(cfg.train.seed)
    ds_config = deepspeed_config(cfg, dtype)
    model, offloader = build_model(cfg, dims, device, dtype, ds_config)
    # hf: models: model.* now holds the folder's shape (data checks, config.yaml, checkpoint metadata).
    cfg = resolve_model(cfg)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    if rank == 0:
        logger.info(
            "model: %s, %.2fM parameters, layers %s",
            cfg.model.source,
            model.num_parameters() / 1e6,
            "".join(cfg.model.layer_kinds()),
        )
    # DeepSpeed print()s "DeepSpeed shm_comm_op built successfully" on every rank each time it loads the
    # op (the build itself is announced by launch/worker_setup.py); its logging is untouched by this.
    with contextlib.redirect_stdout(io.StringIO()) as deepspeed_prints:
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            optimizer=build_optimizer(cfg, model.parameters(), device=device, world_size=world_size),
            config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
            dist_init_required=False,
        )
    if deepspeed_prints.getvalue().strip():
        logger.debug("deepspeed.initialize printed: %s", deepspeed_prints.getvalue().strip())

    dataset = build_dataset(cfg.data, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    accum = cfg.train.grad_accum
    # The loader gives this dp rank all accum micro batches of an optimizer step at once (global batch
    # dp x micro x accum), so the samples of a step do not depend on how they are split into micro steps.
    loader = GlobalBatchLoader(
        dataset, cfg.train.micro_batch_size * accum, dims.dp_rank, dp, seed=cfg.train.seed
    )
    checkpointer = LazyAsyncCheckpointer(
        root=output_dir / "checkpoints", keep=cfg.checkpoint.keep, asynchronous=cfg.checkpoint.async_
    )
    start_step = 0
    if latest is not None:
        extra = checkpointer.load(latest, engine)
        loader.load_state_dict(extra["loader"])
        start_step = int(extra["step"])
        rng = extra.get("rng", {}).get(str(rank))
        if rng is not None:
            _set_rng_state(rng)
        if rank == 0:
            logger.info("resumed from %s (step %d)", latest, start_step)
    if rank == 0:
        # Only now that the run really starts (a refused resume raised above).
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "config.yaml", cfg.to_yaml())

    # Held-out loss (train.eval_every): the same split and loss as training, forward only.
    eval_data = eval_dataset(cfg) if cfg.train.eval_every else None
    metrics = MetricsLogger(output_dir, rank == 0, cfg.train.steps, start_step, device)
    global_tokens = dp * cfg.train.micro_batch_size * accum * cfg.data.seq_len  # per optimizer step
    losses: list[float] = []
    nonfinite_steps: list[int] = []  # the current run of consecutive NaN/inf steps
    last_checkpoint = latest
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            metrics.step_started()
            if cfg.debug.fail_at_step == step and attempt_number() == 0 and rank == world_size - 1:
                raise RuntimeError(
                    f"debug.fail_at_step={step}: injected failure on rank {rank} (first attempt only)"
                )
            micro_batches = [
                {
                    name: tensor.to(device, non_blocking=True)
                    for name, tensor in dims.shard_batch(part).items()
                }
                for part in split_micro_batches(loader.batch(step - 1), accum)
            ]
            step_stats = accumulate_gradients(engine, micro_batches, checkpointer.wait_for_snapshot)
            grad_norm = engine.get_global_grad_norm()
            values = {
                "loss": step_stats.loss.item(),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": scheduler.get_last_lr()[0],
                "valid_tokens": int(step_stats.tokens.item()),
            }
            losses.append(values["loss"])
            finite = math.isfinite(values["loss"]) and (
                grad_norm is None or math.isfinite(values["grad_norm"])
            )
            nonfinite_steps = [] if finite else [*nonfinite_steps, step]
            if offloader is not None and step == start_step + 1 and rank == 0:
                logger.info(
                    "activation offload: %s per step to host memory (layer inputs and the attention outputs "
                    "of %.0f%% of the tokens), pool %s in %d buffers",
                    human_bytes(offloader.swapped_bytes),
                    100 * offloader.share,
                    human_bytes(offloader.pool.total_bytes),
                    offloader.pool.num_buffers,
                )
            write = step % cfg.train.log_every == 0 or step == cfg.train.steps or not finite
            eval_s = 0.0
            if eval_data is not None and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                eval_started = time.perf_counter()
                micro_batches = eval_batches(eval_data, cfg.train.micro_batch_size, dims)
                values["eval_loss"] = evaluate_loss(engine, micro_batches, dims, device)
                eval_s, write = time.perf_counter() - eval_started, True
            metrics.log(step, values, global_tokens, flops_per_token, world_size, write, excluded_s=eval_s)
            if len(nonfinite_steps) >= cfg.train.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"stopping: the loss or gradient norm was NaN/inf at steps {nonfinite_steps} "
                    f"({len(nonfinite_steps)} in a row, train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                    f"no checkpoint was saved from them, the newest is {last_checkpoint or 'none'}. Lower train.lr "
                    "or train.grad_clip, check the data, and resume from that checkpoint"
                )
            interval = cfg.checkpoint.interval
            checkpoint_due = bool(interval) and (step % interval == 0 or step == cfg.train.steps)
            if checkpoint_due and not finite:
                if rank == 0:
                    logger.warning("step %d: loss or gradient norm is NaN/inf: not saving a checkpoint", step)
            elif checkpoint_due:
                extra = {
                    "step": step,
                    "loader": loader.state_dict(),
                    "rng": {str(rank): _rng_state()},
                    "config": cfg.model_dump(mode="json", by_alias=True),
                }
                checkpointer.save(step=step, engine=engine, extra=extra)
                last_checkpoint = output_dir / "checkpoints" / f"step-{step}"
        checkpointer.close()
    except NonFiniteTrainingError:
        checkpointer.close()  # the checkpoint in flight was saved from a finite state: commit it
        raise
    except BaseException:
        checkpointer.close(abort=True)
        raise
    finally:
        metrics.close()
    if dist.is_initialized():
        dist.barrier()
    return {
        "rank": rank,
        "losses": losses,
        "steps": cfg.train.steps,
        "output_dir": str(output_dir),
        "start_step": start_step,
    }
