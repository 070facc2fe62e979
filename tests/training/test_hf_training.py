"""`longloom train` with model.source hf:<folder>: tiny HF models train through the trainer like native ones.

Per-step losses do not depend on the split (Ulysses, TokenRing), the first loss is the plain HF model's
mean cross-entropy on the same batch, a resumed run continues with the uninterrupted run's losses, and
a bad folder is refused before anything is launched or written.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from longloom import cli
from longloom.config import load_config
from longloom.data.loader import GlobalBatchLoader
from longloom.data.synthetic import build_dataset
from longloom.evaluation.models import find_model_source
from longloom.training.trainer import run_training
from tests.models.hf_tiny import save_tiny_model

# Synthetic data uses the byte tokenizer's 259 ids; HF vocabularies are often padded above the tokenizer.
VOCAB = 264
SEQ = 32


def _overrides(folder, out, workers: int, *extra: str) -> list[str]:
    return [
        f"model.source=hf:{folder}",
        f"data.seq_len={SEQ}",
        "train.steps=3",
        "train.lr=1e-2",
        "train.warmup_steps=1",
        "train.dtype=fp32",
        "train.zero_stage=1",
        "train.micro_batch_size=2",
        "checkpoint.interval=0",
        f"train.output_dir={out}",
        f"launch.workers={workers}",
        *extra,
    ]


def _train_worker(overrides: list[str]) -> list[float]:
    return run_training(load_config(None, overrides))["losses"]


def _losses(distributed, workers, overrides) -> list[float]:
    results = distributed(workers, _train_worker, overrides)
    assert all(r == results[0] for r in results), "every rank reports the same global loss"
    return results[0]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = save_tiny_model(folder, request.param, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return folder, model


def _plain_first_loss(model, cfg) -> float:
    """The plain HF model's mean cross-entropy on the first global batch the trainer reads."""
    dataset = build_dataset(cfg.data, seed=cfg.train.seed)
    batch = GlobalBatchLoader(dataset, cfg.train.micro_batch_size, 0, 1, seed=cfg.train.seed).batch(0)
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()


def test_split_does_not_change_losses_and_first_loss_is_hf_models(distributed, tmp_path, hf_folder):
    folder, model = hf_folder
    single = _losses(distributed, 1, _overrides(folder, tmp_path / "one", 1))
    cfg = load_config(None, _overrides(folder, tmp_path / "one", 1))
    assert single[0] == pytest.approx(_plain_first_loss(model, cfg), rel=1e-5)
    assert single[-1] < single[0], "the HF model trains"
    ulysses = _losses(distributed, 2, _overrides(folder, tmp_path / "u", 2, "parallel.ulysses=2"))
    ring = _losses(distributed, 2, _overrides(folder, tmp_path / "r", 2, "parallel.ring=2"))
    assert ulysses == pytest.approx(single, rel=1e-4)
    assert ring == pytest.approx(single, rel=1e-4)
    # config.yaml holds the folder's shape and reloads (its shape keys agree with the folder).
    saved = load_config(tmp_path / "one" / "config.yaml")
    assert (saved.model.hidden, saved.model.vocab_size) == (model.config.hidden_size, VOCAB)


def test_resume_continues_with_the_uninterrupted_losses(distributed, tmp_path, hf_folder):
    folder, _ = hf_folder
    full = _losses(distributed, 1, _overrides(folder, tmp_path / "full", 1, "train.steps=4"))
    run = _overrides(
        folder, tmp_path / "run", 2, "train.steps=4", "checkpoint.interval=2", "parallel.ulysses=2"
    )
    assert _losses(distributed, 2, run) == pytest.approx(full, rel=1e-4)
    # As if the run had stopped after step 3: only the step-2 checkpoint is left, resumed on one worker.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    resumed = _losses(distributed, 1, [*run[:-1], "launch.workers=1", "parallel.ulysses=1"])
    assert resumed == pytest.approx(full[2:], rel=1e-4)
    # The needle eval of an hf: run's checkpoint names the conversion that makes it an HF folder.
    with pytest.raises(ValueError, match=r"trained from a Hugging Face folder.*--to hf"):
        find_model_source(tmp_path / "run")


def test_bad_folder_is_refused_before_launch_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr("longloom.launch.dispatch.launch", lambda cfg: launched.append(cfg) or 0)
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{seq_len: 32}}\ntrain: {{output_dir: {out}}}\n")
    code = cli.main(["train", str(config), f"model.source=hf:{not_a_model}"])
    assert code == 2 and launched == []
    assert "has no config.json" in capsys.readouterr().err
    # Weights that do not match config.json (another hidden size): named, refused, nothing written.
    wrong = tmp_path / "wrong"
    save_tiny_model(wrong, "llama", vocab_size=VOCAB)
    hf_config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(hf_config | {"intermediate_size": 64}))
    code = cli.main(["train", str(config), f"model.source=hf:{wrong}"])
    assert code == 2 and launched == []
    assert "model.source=" in capsys.readouterr().err
    # A shape key set against the folder is refused; the byte data needs 259 ids, the folder has 96.
    assert cli.main(["check", str(config), f"model.source=hf:{wrong}", "model.hidden=64"]) == 2
    assert "model.hidden=64 (config.json: 48)" in capsys.readouterr().err
    small = tmp_path / "small"
    save_tiny_model(small, "qwen3")
    assert cli.main(["check", str(config), f"model.source=hf:{small}"]) == 2
    assert "259 tokens, more than the model's vocab_size 96" in capsys.readouterr().err
    assert not out.exists()
