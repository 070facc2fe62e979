"""Models to evaluate: a training run, one of its checkpoints, or a Hugging Face model folder.

`find_model_source(path)` runs before any worker starts and decides what `path` is (and fails with what
it expected otherwise); `SequenceParallelPredictor` runs in every worker and gives, for a full-length
batch, every token's greedy next-token prediction with the sequence cut over the SP group exactly as
in training (`ParallelDims.shard_batch`, the same contiguous / zigzag layout):

- native: the run's `model.*` config (checkpoint extras, else `<run>/config.yaml`) builds a
  `LlamaModel(cfg, dims)`; the fp32 master weights of the newest committed checkpoint are read through
  checkpointing's reader (any layout it was saved with; ours or DeepSpeed's).
- Hugging Face: built by models/hf_loading.py as for training (transformers' own architecture, never
  code from the folder; weights from its safetensors), made sequence-parallel by models/hf.py's
  `enable_sequence_parallel` when the SP degree is above 1. `check_hf_model` runs its refusals (SP
  support at the longest eval length, weights against the config) before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from longloom.checkpointing.commit import COMMIT_FILE, find_latest_committed, step_directories
from longloom.config import ModelConfig
from longloom.data.tokenize import load_tokenizer, refuse_custom_code
from longloom.parallel.dims import ParallelDims
from longloom.parallel.sharding import chunks_per_rank, local_chunk_ids


@dataclass
class ModelSource:
    kind: str  # "native" | "hf"
    path: Path  # the checkpoint step folder (native) or the model folder (hf)
    run_dir: Path | None  # native: the run's output_dir when the checkpoint lies in one
    step: int | None
    model_config: ModelConfig | None  # native only
    trained_seq_len: int | None
    tokenizer: str  # "bytes" or a tokenizer folder

    @property
    def name(self) -> str:
        return f"step-{self.step}" if self.step is not None else self.path.name

    @property
    def vocab_size(self) -> int | None:
        return self.model_config.vocab_size if self.model_config is not None else None


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _checkpoint_of(path: Path) -> Path | None:
    """The checkpoint step folder that `path` names: itself, or the newest committed one under it."""
    if (path / COMMIT_FILE).is_file() or path.name.startswith("step-"):
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and step_directories(root):
            latest = find_latest_committed(root)
            if latest is None:
                raise ValueError(
                    f"{root} holds step-N folders but none is committed and intact: let the run write a "
                    "checkpoint (checkpoint.interval) or pass a committed step folder"
                )
            return latest
    return None


def find_model_source(path: str | Path, tokenizer: str = "auto") -> ModelSource:
    """What `path` is: a run folder, a checkpoint (step folder or checkpoints/), or an HF model folder.

    `tokenizer`: "auto" = the HF folder's own tokenizer when it has one, else the byte tokenizer that
    longloom runs train with; or "bytes" / a tokenizer folder.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{path} does not exist: pass a run folder, a checkpoint folder or a Hugging Face model folder"
        )
    if _is_hf_folder(path):
        refuse_custom_code(path, what="model")
        has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
        chosen = str(path) if tokenizer == "auto" and has_tokenizer else tokenizer
        return ModelSource("hf", path, None, None, None, None, "bytes" if chosen == "auto" else chosen)
    checkpoint = _checkpoint_of(path)
    if checkpoint is None:
        raise ValueError(
            f"cannot tell what {path} is: expected a training run folder (with checkpoints/), a checkpoint "
            "(step-N folder with commit.json, or a checkpoints/ folder), or a Hugging Face model folder "
            "(config.json and *.safetensors, e.g. from `longloom ckpt convert --to hf`)"
        )
    from longloom.conversion.convert import open_source
    from longloom.conversion.hf_export import run_model_config

    reader = open_source(checkpoint)
    try:
        model_config, seq_len = run_model_config(reader)
        step = getattr(reader, "step", None)
    finally:
        reader.close()
    if model_config.is_hf:
        # Its tensors carry the HF architecture's names and shapes: evaluated as that folder, not as
        # the native model (one conversion, the same one a user shares the model with).
        raise ValueError(
            f"{checkpoint} was trained from a Hugging Face folder (model.source={model_config.source}): "
            f"convert it first, `longloom ckpt convert {checkpoint} <folder> --to hf`, then run "
            "`longloom eval needle <folder> ...` on that folder"
        )
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    return ModelSource(
        "native",
        checkpoint,
        run_dir,
        step,
        model_config,
        seq_len,
        "bytes" if tokenizer == "auto" else tokenizer,
    )


def load_native_weights(source: ModelSource, model: torch.nn.Module) -> None:
    """Copies the checkpoint's fp32 master weights into `model` (every name and shape must match)."""
    from longloom.conversion.convert import open_source

    reader = open_source(source.path)
    try:
        state = {name.removeprefix("module."): reader.read_full(name, "fp32") for name in reader.specs}
    finally:
        reader.close()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source.path} does not match its model.* configuration: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


class SequenceParallelPredictor:
    """Greedy next-token predictions at the end of a sequence split over `dims.sp_group`.

    Only the last positions get logits (a [tokens, vocab] tensor at 64K tokens and a 128K vocabulary
    would be 32 GiB): HF models through `logits_to_keep`, the native model through a pre-hook that
    hands its LM head the last hidden states only. In both layouts the sequence's last chunk is the end
    of one rank's share (contiguous: the last rank; zigzag: rank 0's second chunk), so that rank's local
    last positions are the sequence's, and their argmax ids are broadcast over the SP group.
    """

    def __init__(self, source: ModelSource, dims: ParallelDims, device: torch.device, longest: int):
        """`longest`: the longest sequence it will see (HF models check their attention window against it)."""
        self.source, self.dims, self.device = source, dims, device
        self.tokenizer = load_tokenizer(source.tokenizer)
        self.keep_last = 0  # read by the native model's LM-head pre-hook
        if source.kind == "native":
            from longloom.models.llama import LlamaModel

            self.model = LlamaModel(source.model_config, dims)
            load_native_weights(source, self.model)
            self.model.lm_head.register_forward_pre_hook(self._last_hidden_states)
        else:
            self.model = _load_hf_model(source, longest, device)
            if dims.sp > 1:
                from longloom.models.hf import enable_sequence_parallel

                enable_sequence_parallel(self.model, dims)
        self.model.to(device).eval()
        chunks = dims.sp * chunks_per_rank(dims.layout)
        # The SP rank whose share ends with the sequence's last chunk.
        self.last_chunk_rank = next(
            rank for rank in range(dims.sp) if local_chunk_ids(dims.layout, rank, dims.sp)[-1] == chunks - 1
        )

    def _last_hidden_states(self, head: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][:, -self.keep_last :], *args[1:])

    @torch.no_grad()
    def predictions(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """tokens [B, S] (the whole sequence, same on the SP group) -> argmax ids [B, last] of the last
        `last` positions (what follows each of them), on every rank of the SP group."""
        chunk = tokens.size(1) // (self.dims.sp * chunks_per_rank(self.dims.layout))
        if not 0 < last <= chunk:
            raise ValueError(f"{last} last positions do not fit in one sequence chunk of {chunk} tokens")
        positions = torch.arange(tokens.size(1)).expand_as(tokens)
        if self.source.kind == "native":
            local = self.dims.shard_batch({"tokens": tokens, "position_ids": positions})
            self.keep_last = last
            logits = self.model(local["tokens"].to(self.device), local["position_ids"].to(self.device))
        else:
            from longloom.models.hf import shard_causal_lm_batch

            local = shard_causal_lm_batch(tokens, self.dims)
            logits = self.model(
                input_ids=local["input_ids"].to(self.device),
                position_ids=local["position_ids"].to(self.device),
                use_cache=False,
                logits_to_keep=last,
            ).logits
        predicted = logits[:, -last:].argmax(dim=-1).contiguous()  # [B, last]
        if self.dims.sp > 1:
            owner = dist.get_global_rank(self.dims.sp_group, self.last_chunk_rank)
            dist.broadcast(predicted, src=owner, group=self.dims.sp_group)
        return predicted.cpu()


def check_hf_model(source: ModelSource, longest: int) -> None:
    """Whatever would stop the HF model from loading or running under SP at `longest` tokens, up front."""
    from longloom.models.hf_loading import check_hf_folder, load_hf_config

    check_hf_folder(source.path, load_hf_config(source.path), longest)


def _load_hf_model(source: ModelSource, longest: int, device: torch.device) -> torch.nn.Module:
    from longloom.models.hf_loading import build_hf_causal_lm, load_hf_config

    config = load_hf_config(source.path)
    return build_hf_causal_lm(source.path, config, seq_len=longest, dtype=torch.float32, device=device)
