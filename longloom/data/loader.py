"""A deterministic global-batch loader: the batch of a step does not depend on how many ranks share it.

The global batch of step n is samples [n*G, (n+1)*G) of one sample stream, G = dp * micro_batch_size,
and data-parallel rank d takes the slice [d*micro, (d+1)*micro) of it (Megatron's pretraining sampler,
without its state). The stream walks the dataset in epochs; for prepared Arrow data each epoch is a
permutation drawn from (seed, epoch), synthetic data is used in order (its samples are independent
draws already). All ranks of one sequence-parallel group pass the same `dp_rank` and get the same
micro batch, which `shard_batch` then cuts along the sequence.

The position in the stream is training state: `state_dict()` stores the next step and the samples
consumed. After `load_state_dict`, the batch of that step starts at the consumed sample count, so a
run resumed with another global batch size (say more data-parallel ranks) neither repeats nor skips
samples.

Packed documents: samples may carry `document_ids` (data.document_masking). A micro batch whose samples
are each one document (synthetic tasks, or windows inside one long document) goes out without them:
the ids say nothing there, and without them attention takes its plain causal path (the fused dense
kernels). Every rank of an SP group reads the same micro batch, so they all make the same choice.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch


class SampleDataset(Protocol):
    """What the loader needs: samples of int64 [seq_len] tensors (tokens, position_ids, labels, and
    document_ids with data.document_masking) and whether to shuffle each epoch."""

    shuffle: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class GlobalBatchLoader:
    """This data-parallel rank's micro batch of the global batch of any step."""

    def __init__(self, dataset: SampleDataset, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size={micro_batch_size} must be at least 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_size}): check parallel.dp")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.global_batch_size = dp_size * micro_batch_size
        self.next_step = 0
        # Step `_anchor_step` starts at sample `_anchor_sample`; (0, 0) until a resume moves it.
        self._anchor_step = 0
        self._anchor_sample = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def first_sample(self, step: int) -> int:
        """Index in the sample stream of the first sample of the global batch of `step`."""
        if step < self._anchor_step:
            raise ValueError(
                f"step {step} is before step {self._anchor_step}, where this loader was resumed "
                f"at sample {self._anchor_sample}; its samples depend on the earlier batch sizes"
            )
        return self._anchor_sample + (step - self._anchor_step) * self.global_batch_size

    def dataset_index(self, sample: int) -> int:
        """The dataset index of position `sample` of the stream (epoch-wise permutation if shuffled)."""
        length = len(self.dataset)
        epoch, offset = divmod(sample, length)
        if not self.dataset.shuffle:
            return offset
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            # Seeded by (seed, epoch): every rank draws the same order, and a resumed run too.
            order = np.random.default_rng([self.seed % 2**64, epoch]).permutation(length)
            self._epoch_order = (epoch, order)
        return int(self._epoch_order[1][offset])

    def global_sample_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of `step` (what every rank together reads)."""
        start = self.first_sample(step)
        return [self.dataset_index(start + i) for i in range(self.global_batch_size)]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's micro batch of `step`: tokens, position_ids, labels (and document_ids when the
        dataset makes them), each int64 [micro, seq_len]."""
        start = self.first_sample(step) + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[self.dataset_index(start + i)] for i in range(self.micro_batch_size)]
        self.next_step = step + 1
        batch = {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}
        document_ids = batch.get("document_ids")
        if document_ids is not None and bool((document_ids == document_ids[:, :1]).all()):
            del batch["document_ids"]  # one document per sample: plain causal attention is the same
        return batch

    def __iter__(self):
        while True:
            yield self.batch(self.next_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_step": self.next_step,
            "consumed_samples": self.first_sample(self.next_step),
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpointed data order used train.seed={state['seed']}, this run train.seed={self.seed}: "
                "resume with the same train.seed"
            )
        self.next_step = int(state["next_step"])
        self._anchor_step = self.next_step
        self._anchor_sample = int(state["consumed_samples"])
