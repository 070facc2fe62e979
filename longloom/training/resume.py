"""Before any worker starts: can this run resume from the checkpoint under its output_dir?

A checkpoint written for another model shape (model.hidden, model.layers, ...) cannot be loaded;
the workers would find out only after the cluster started, as a traceback, and a launcher would
retry what can never pass. `check_resume_compatible(cfg)` finds it from the checkpoint's
metadata alone (its commit marker: parameter shapes and the config it was saved with) and the
parameter shapes of the configured model, built on the meta device (no memory, no data).
"""

from __future__ import annotations

from pathlib import Path

import torch

from longloom.checkpointing.commit import find_latest_committed, read_commit
from longloom.checkpointing.inspection import shape_differences
from longloom.config import ConfigError, LongloomConfig
from longloom.models.llama import LlamaModel


def _saved_model_config(meta: dict) -> dict:
    """The model.* section the trainer saved with the checkpoint (rank 0's extras), or {}."""
    extras = meta.get("extras") or []
    value = extras[0].get("value") if extras and isinstance(extras[0], dict) else None
    config = value.get("config") if isinstance(value, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, dict) else {}


def check_resume_compatible(cfg: LongloomConfig) -> None:
    """Raises ConfigError when the newest checkpoint the run would resume from holds another model shape.

    Reads only metadata: the newest committed and structurally intact checkpoint's marker (the
    workers additionally verify every checksum and may fall back to an older checkpoint). Does
    nothing when checkpoint.resume is false or there is no checkpoint.
    """
    if not cfg.checkpoint.resume:
        return
    latest = find_latest_committed(Path(cfg.train.output_dir) / "checkpoints")
    if latest is None:
        return
    meta = read_commit(latest)
    saved = {name: tuple(entry["shape"]) for name, entry in meta["params"].items()}
    if cfg.model.is_hf:
        from longloom.models.hf_loading import meta_causal_lm, resolve_hf_model

        model = meta_causal_lm(resolve_hf_model(cfg.model)[1])  # HFCausalLM keeps the HF parameter names
    else:
        with torch.device("meta"):
            model = LlamaModel(cfg.model)
    ours = {name: tuple(param.shape) for name, param in model.named_parameters()}
    if saved == ours:
        return
    current = cfg.model.model_dump(mode="json")
    saved_model = _saved_model_config(meta)
    keys = [
        f"model.{key}={saved_model[key]!r} in the checkpoint, {current[key]!r} now"
        for key in current
        if key in saved_model and saved_model[key] != current[key]
    ]
    differences = shape_differences(saved, ours, "now")
    raise ConfigError(
        f"cannot resume from {latest}: it was written for another model shape. "
        + (f"Differing settings: {'; '.join(keys)}. " if keys else "")
        + f"Parameters: {'; '.join(differences[:4])}"
        + (f" (and {len(differences) - 4} more)" if len(differences) > 4 else "")
        + ". Fix: set model.* back to the checkpoint's values, or start this model in another train.output_dir, "
        "or set checkpoint.resume=false (its checkpoints then replace the old ones)"
    )
