"""A Hugging Face model folder as a checkpoint source: `longloom ckpt convert <hf folder> <out> --to universal`.

What it imports is the state of a `model.source: hf:<folder>` run before its first step: step 0, the
folder's weights as the fp32 masters (under the model's parameter names, which HFCausalLM keeps, a
tied LM head once), Adam moments of zero, no LR-scheduler state, and the extras a run saves (step,
data-loader position at the start, model.source). So:

- a run whose train.output_dir holds it as `checkpoints/step-0` resumes from it exactly as a fresh run
  from that folder starts (the optimizer's own hyper-parameters and schedule apply from step 1);
- `ckpt convert <it> <out> --to hf` gives the folder's weights back, bit for bit in their dtype;
- `ckpt inspect` verifies it like any checkpoint.

Everything is checked before a value is read: config.json against transformers (no custom code) and
the safetensors headers against the architecture (models/hf_weights.match_checkpoint), naming the key
or file at fault.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from longloom.checkpointing.commit import COMMIT_FILE
from longloom.checkpointing.engine_state import STATE_KEYS, ParamSpec

# safetensors' dtype names (the header) -> torch: the dtype each parameter is exported back in.
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def is_hf_model_folder(path: Path) -> bool:
    """A transformers model folder (config.json) that is not one of our checkpoints."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / COMMIT_FILE).is_file()


class HFFolderReader:
    """The checkpoint-reader interface of convert.py (`specs`, `read_full`, `extra`, ...) over a model folder."""

    def __init__(self, folder: str | Path):
        from longloom.models.hf_loading import load_hf_config, meta_causal_lm
        from longloom.models.hf_weights import match_checkpoint

        self.path = Path(folder).absolute()
        model = meta_causal_lm(load_hf_config(self.path))
        # (file key, file) of each distinct model tensor; the trainer's names are named_parameters' (a tied
        # head appears once, under its first name). Buffers are rebuilt from the folder when a run starts.
        where = {id(tensor): (key, file) for key, file, tensor in match_checkpoint(model, self.path)}
        self._where = {name: where[id(param)] for name, param in model.named_parameters()}
        self.specs = {}
        for name, (key, file) in self._where.items():
            with safe_open(str(file), framework="pt") as handle:
                piece = handle.get_slice(key)
                shape, stored = tuple(piece.get_shape()), piece.get_dtype()
            self.specs[name] = ParamSpec(name, shape, SAFETENSORS_DTYPES.get(stored, torch.float32))
        self.step = 0
        self.optimizer_step = 0
        self.param_groups = [{}]  # no saved hyper-parameters: the loading optimizer keeps its own
        self.lr_scheduler = None
        self.engine_counters = {"global_steps": 0, "global_samples": 0, "skipped_steps": 0}
        self.meta = {
            "world_size": 1,
            "layout": "hf",
            "token": "hf-import",
            "extras": [0],  # one rank's extras
            "source": {"hf_folder": str(self.path)},
        }

    def states(self, name: str) -> list[str]:
        return list(STATE_KEYS)

    def read_full(self, name: str, state: str) -> torch.Tensor:
        if state != "fp32":
            return torch.zeros(self.specs[name].shape, dtype=torch.float32)  # Adam moments before step 1
        key, file = self._where[name]
        with safe_open(str(file), framework="pt") as handle:  # one handle per read: the converter's threads
            return handle.get_tensor(key).to(torch.float32)

    def extra(self, rank: int) -> dict:
        """What the trainer saves, as before step 1: its data loader at the first sample, and model.source."""
        return {
            "step": 0,
            "loader": {"next_step": 0, "consumed_samples": 0},
            "config": {"model": {"source": f"hf:{self.path}"}},
        }

    def close(self) -> None:
        pass
