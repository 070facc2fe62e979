"""Every tested HF family from folder to folder: load -> train under SP through the trainer -> export -> reload.

For Llama, Mistral, Qwen2 and Qwen3 (tiny random models saved with save_pretrained), one trainer run each
under a split of its own, so that together they cover Ulysses, TokenRing and 2D, with ZeRO-3 partitioned
loading with a tiled MLP, activation offload with token-wise recompute, a YaRN context extension and a
tied LM head:

- the per-step losses equal plain single-process HF training on the same batches (transformers' model,
  torch AdamW, the trainer's LR schedule and clipping);
- `ckpt convert --to hf` of the last checkpoint loads with `AutoModelForCausalLM.from_pretrained` and its
  logits equal the longloom model's built from that checkpoint (and the plain reference's after training);
- an HF folder converted `--to universal` into a run's checkpoints/step-0 resumes as a fresh run starts.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from longloom import cli
from longloom.checkpointing.universal import CheckpointReader
from longloom.config import load_config
from longloom.conversion.convert import convert_checkpoint
from longloom.data.loader import GlobalBatchLoader
from longloom.data.synthetic import build_dataset
from longloom.models.hf_causal_lm import HFCausalLM
from longloom.models.hf_loading import build_hf_causal_lm, load_hf_config
from longloom.offload.optimizer import ADAM_EPS
from longloom.training.trainer import lr_lambda, run_training
from tests.models.hf_tiny import random_tokens, save_tiny_model

VOCAB = 264  # the byte tokenizer's 259 ids of the synthetic data, padded as HF vocabularies often are
SEQ = 32
STEPS = 3
YARN = {"type": "yarn", "factor": 2.0}
THETA = 20000.0  # qwen3's run also moves rope_theta (the folder's: 10000)

# family -> (its split and what else it covers, workers, save_pretrained overrides)
RUNS = {
    "llama": (["parallel.ulysses=2", "train.zero_stage=3", "model.mlp_tiles=2"], 2, {}),
    "mistral": (["parallel.ring=2", "offload.activations=0.5"], 2, {}),
    "qwen2": (["parallel.ulysses=2", "parallel.ring=2"], 4, {}),
    "qwen3": (
        ["parallel.ulysses=2", "model.rope_scaling={type: yarn, factor: 2.0}", f"model.rope_theta={THETA}"],
        2,
        {"tie_word_embeddings": True},
    ),
}


def _overrides(folder, out, workers: int, *extra: str) -> list[str]:
    return [
        f"model.source=hf:{folder}",
        f"data.seq_len={SEQ}",
        f"train.steps={STEPS}",
        "train.lr=1e-2",
        "train.warmup_steps=1",
        "train.dtype=fp32",
        "train.zero_stage=1",
        "train.micro_batch_size=2",
        f"checkpoint.interval={STEPS}",
        f"train.output_dir={out}",
        f"launch.workers={workers}",
        *extra,
    ]


def _train_worker(overrides: list[str]) -> list[float]:
    return run_training(load_config(None, overrides))["losses"]


def _train(distributed, workers: int, overrides: list[str]) -> list[float]:
    results = distributed(workers, _train_worker, overrides)
    assert all(r == results[0] for r in results), "every rank reports the same global loss"
    return results[0]


def _reference_config(folder, rope_scaling: bool):
    """transformers' own config of the folder, with the YaRN extension written as transformers spells it."""
    config = AutoConfig.from_pretrained(folder)
    if rope_scaling:
        config.rope_parameters = {
            "rope_type": "yarn",
            "factor": YARN["factor"],
            "rope_theta": THETA,
            "original_max_position_embeddings": config.max_position_embeddings,
        }
    return config


def _plain_training(folder, cfg, rope_scaling: bool) -> tuple[list[float], torch.nn.Module]:
    """Single-process transformers training on the trainer's global batches: (losses, trained model)."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=_reference_config(folder, rope_scaling)
    ).float()
    model.train()
    t = cfg.train
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=ADAM_EPS, weight_decay=t.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    dataset = build_dataset(cfg.data, seed=t.seed, vocab_size=VOCAB)
    loader = GlobalBatchLoader(dataset, t.micro_batch_size, 0, 1, seed=t.seed)  # dp = 1 in every run
    losses = []
    for step in range(t.steps):
        batch = loader.batch(step)
        logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.eval()


def _longloom_logits(folder, checkpoint, rope_scaling: bool, tokens) -> torch.Tensor:
    """The longloom model (HFCausalLM around the folder's architecture) with the checkpoint's fp32 masters."""
    rope = {"rope_scaling": YARN, "rope_theta": THETA} if rope_scaling else {}
    model = HFCausalLM(build_hf_causal_lm(folder, load_hf_config(folder, **rope), SEQ))
    with CheckpointReader(checkpoint) as reader, torch.no_grad():
        assert set(reader.specs) == {name for name, _ in model.named_parameters()}
        for name, param in model.named_parameters():
            param.copy_(reader.read_full(name, "fp32"))
        positions = torch.arange(tokens.size(1)).expand_as(tokens)
        return model.eval()(tokens, positions)


@pytest.mark.parametrize("family", sorted(RUNS))
def test_folder_to_folder(distributed, tmp_path, family):
    extra, workers, saved_with = RUNS[family]
    rope_scaling = any(item.startswith("model.rope_scaling") for item in extra)
    folder = tmp_path / family
    save_tiny_model(folder, family, vocab_size=VOCAB, max_position_embeddings=SEQ, **saved_with)
    overrides = _overrides(folder, tmp_path / "run", workers, *extra)
    want, reference = _plain_training(folder, load_config(None, overrides), rope_scaling)
    assert want[-1] < want[0], "the reference trains"
    assert _train(distributed, workers, overrides) == pytest.approx(want, rel=1e-4)

    exported = tmp_path / "hf"
    convert_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{STEPS}", exported, to="hf", progress=False)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == json.loads((folder / "config.json").read_text())["architectures"]
    assert config["rope_parameters"] == reference.config.rope_parameters
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(reference)
    tied = reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    assert tied == bool(saved_with.get("tie_word_embeddings"))
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        logits = reloaded(input_ids=tokens).logits
        torch.testing.assert_close(
            logits,
            _longloom_logits(
                folder,
                tmp_path / "run" / "checkpoints" / f"step-{STEPS}",
                YARN if rope_scaling else None,
                tokens,
            ),
            rtol=0,
            atol=0,
        )
        scale = logits.abs().max()
        torch.testing.assert_close(
            logits / scale, reference(input_ids=tokens).logits / scale, rtol=0, atol=1e-4
        )


def test_an_imported_folder_resumes_as_a_fresh_run_starts(distributed, tmp_path):
    folder = tmp_path / "llama"
    save_tiny_model(folder, "llama", vocab_size=VOCAB, max_position_embeddings=SEQ)
    out = tmp_path / "run"
    assert (
        cli.main(["ckpt", "convert", str(folder), str(out / "checkpoints" / "step-0"), "--to", "universal"])
        == 0
    )
    overrides = _overrides(folder, out, 1, "checkpoint.interval=0")
    want, _ = _plain_training(folder, load_config(None, overrides), rope_scaling=False)
    assert _train(distributed, 1, overrides) == pytest.approx(want, rel=1e-4)
