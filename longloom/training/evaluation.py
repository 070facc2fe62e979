"""Held-out loss under the training split: `evaluate_loss(model_call, batches, dims)`.

The evaluation runs the same forward as a training step (the batch cut over the SP group by
`dims.shard_batch`, the fused token-weighted loss of parallel/loss.py normalised over the whole
dp x sp world) under `torch.no_grad()`: no activation is kept for a backward and no gradient exists.
Each call's `stats` is already the world-wide (loss, valid-token count) of one global batch, so the
eval loss is sum(stats.loss * stats.tokens) / sum(stats.tokens) over the batches: the mean over every
valid label of the eval set, whatever the split.

`eval_batches` cuts a fixed eval set into this data-parallel rank's micro batches. The set is the same
samples in the same order for every split: its last global batch is filled up with copies whose labels
are all -100 (they count for nothing), instead of dropping the samples that do not fill a batch, which
would make the eval set depend on dp x micro_batch_size. So the eval loss agrees across dp / ulysses /
ring splits up to floating-point summation order (tests/training/test_evaluation.py: rtol 1e-4, fp32).

`eval_dataset(cfg)` is what `train.eval_every` evaluates on: `data.eval_source` (a prepared folder or
a synthetic task), or, when it is unset and training data is synthetic, held-out draws of the same
task (other seeds than training's).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longloom.config import ConfigError, LongloomConfig
from longloom.data.loader import SampleDataset
from longloom.data.synthetic import IGNORE_INDEX, SYNTHETIC_PREFIX, build_dataset
from longloom.parallel.dims import ParallelDims

# Synthetic tasks have no end: evaluate this many samples of them.
DEFAULT_SYNTHETIC_EVAL_SAMPLES = 64
# Held-out synthetic samples come from another seed than training's (sample i is a function of (seed, i)).
EVAL_SEED_OFFSET = 1_000_003

ModelCall = Callable[..., tuple[torch.Tensor, Any]]


def eval_dataset(cfg: LongloomConfig) -> SampleDataset:
    """The eval set of a run: data.eval_source, or held-out draws of a synthetic data.source."""
    source = cfg.data.eval_source
    seed = cfg.train.seed
    if source is None:
        if not cfg.data.source.startswith(SYNTHETIC_PREFIX):
            raise ConfigError(
                f"train.eval_every={cfg.train.eval_every} needs held-out data: set data.eval_source to a folder "
                f"prepared like data.source={cfg.data.source!r} (`longloom data prepare`), or train.eval_every=0"
            )
        source, seed = cfg.data.source, seed + EVAL_SEED_OFFSET
    data_cfg = cfg.data.model_copy(update={"source": source})
    return build_dataset(data_cfg, seed=seed, vocab_size=cfg.model.vocab_size)


def eval_batches(
    dataset: SampleDataset, micro_batch_size: int, dims: ParallelDims, max_samples: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """This dp rank's micro batches of samples [0, n) of `dataset`, in order (see the module docstring).

    n = len(dataset) (DEFAULT_SYNTHETIC_EVAL_SAMPLES for an endless synthetic task), at most `max_samples`.
    Every rank gets the same number of batches (ZeRO-3 gathers parameters in each forward, collectively).
    """
    samples = len(dataset) if len(dataset) < sys.maxsize else DEFAULT_SYNTHETIC_EVAL_SAMPLES
    if max_samples is not None:
        samples = min(samples, max_samples)
    global_batch = dims.dp * micro_batch_size
    for first in range(0, samples, global_batch):
        start = first + dims.dp_rank * micro_batch_size
        batch = []
        for index in range(start, start + micro_batch_size):
            if index < samples:
                batch.append(dataset[index])
            else:  # fills the last global batch; its labels count for nothing
                filler = dict(dataset[0])
                filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
                batch.append(filler)
        yield {name: torch.stack([sample[name] for sample in batch]) for name in batch[0]}


def evaluate_loss(
    model_call: ModelCall,
    batches: Iterable[dict[str, torch.Tensor]],
    dims: ParallelDims,
    device: torch.device | str = "cpu",
) -> float:
    """The token-weighted mean loss over every valid label of `batches` on every rank of the world.

    `model_call(tokens, position_ids, labels=..., loss_group=...)` is the training call (the DeepSpeed
    engine or the model) returning (loss, stats) with world-wide `stats.loss` / `stats.tokens`; further
    batch fields (e.g. document ids) are passed as keyword arguments. `batches` are this dp rank's
    full-sequence micro batches (as `eval_batches` gives them); they are cut here exactly as in training.
    Collective: every rank calls it with the same number of batches. 0.0 when no label is valid.
    A module is put in eval mode for the duration and restored.
    """
    group = dist.group.WORLD if dist.is_initialized() and dims.world_size > 1 else None
    was_training = isinstance(model_call, nn.Module) and model_call.training
    if isinstance(model_call, nn.Module):
        model_call.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    token_count = torch.zeros((), dtype=torch.float64)
    try:
        with torch.no_grad():
            for batch in batches:
                local = {
                    name: tensor.to(device)
                    for name, tensor in dims.shard_batch(dims.balance_documents(batch)).items()
                }
                tokens, positions, labels = (
                    local.pop("tokens"),
                    local.pop("position_ids"),
                    local.pop("labels"),
                )
                _, stats = model_call(tokens, positions, labels=labels, loss_group=group, **local)
                # stats are world-wide already: the global mean of this batch and its global count.
                loss_sum += stats.loss.detach().double().cpu() * stats.tokens.double().cpu()
                token_count += stats.tokens.double().cpu()
    finally:
        if was_training:
            model_call.train()
    return float(loss_sum / token_count) if token_count > 0 else 0.0
