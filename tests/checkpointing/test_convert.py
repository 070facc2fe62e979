"""Conversions: DeepSpeed ZeRO 1/2/3 -> universal (vs ds_to_universal), ours -> DeepSpeed load_universal,
universal round trips, Hugging Face export, inspect."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longloom.checkpointing.commit import COMMIT_FILE
from longloom.checkpointing.lazy_async import LazyAsyncCheckpointer
from longloom.checkpointing.universal import CheckpointReader
from longloom.conversion.convert import convert_checkpoint, format_inspection, inspect_checkpoint
from longloom.conversion.hf_export import hf_name
from tests.checkpointing.toy import assert_states_equal, build_engine, full_state, save_run, train

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _deepspeed_save_worker(folder: str, stage: int) -> dict:
    engine = build_engine(stage)
    train(engine, 1, 3)
    engine.save_checkpoint(folder, tag="global_step3")
    return full_state(engine)


def _load_ours_worker(path: str, stage: int) -> dict:
    engine = build_engine(stage, seed=77)
    LazyAsyncCheckpointer(Path(path).parent).load(path, engine)
    return full_state(engine)


def _deepspeed_load_universal_worker(folder: str, tag: str, stage: int) -> dict:
    engine = build_engine(stage, seed=55, load_universal=True)
    engine.load_checkpoint(folder, tag=tag)
    return full_state(engine)


def _ds_to_universal(src: Path, dst: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(dst),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # a plain nn.Module records no universal-checkpoint info
    )
    with contextlib.redirect_stdout(io.StringIO()):
        main(args)


def _assert_same(actual, expected, where: str) -> None:
    """Same structure, types, tensor shapes/dtypes/values (torch.equal) and plain values."""
    if torch.is_tensor(expected):
        assert torch.is_tensor(actual), where
        assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(map(str, actual)) == sorted(map(str, expected)), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}/{index}")
    elif hasattr(expected, "__dict__") and not isinstance(expected, type):
        assert type(actual) is type(expected), where
        _assert_same(vars(actual), vars(expected), where)
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} vs {expected!r}"


def _tensor(path: Path) -> torch.Tensor:
    value = torch.load(path, map_location="cpu", weights_only=False)
    return value["param"] if isinstance(value, dict) else value


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_checkpoint_converts_like_ds_to_universal(distributed, tmp_path, stage):
    trained = distributed(2, _deepspeed_save_worker, str(tmp_path / "ds"), stage)[0]
    source = tmp_path / "ds" / "global_step3"
    _ds_to_universal(source, tmp_path / "theirs" / "global_step3")
    convert_checkpoint(source, tmp_path / "ours" / "global_step3", to="deepspeed-universal", progress=False)

    # File for file what ds_to_universal writes: the same files, and in each the same structure,
    # tensor shapes, dtypes and values (ZeRO-3: bare flat tensors and no step.pt; ZeRO-1/2: dicts).
    theirs, ours = tmp_path / "theirs" / "global_step3", tmp_path / "ours" / "global_step3"
    files = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert (tmp_path / "ours" / "latest_universal").read_text() == "global_step3"
    for file in files:
        _assert_same(
            torch.load(ours / file, weights_only=False), torch.load(theirs / file, weights_only=False), file
        )
    names = sorted(p.name for p in (theirs / "zero").iterdir() if p.is_dir())
    assert names == sorted(k for k in trained if k != "__scalars__")
    for name in names:
        for state in STATES:
            expected = trained[name][state].flatten() if stage == 3 else trained[name][state]
            torch.testing.assert_close(
                _tensor(ours / "zero" / name / f"{state}.pt"), expected, rtol=0, atol=0
            )
    assert (stage == 3) == (not any((ours / "zero").glob("*/step.pt")))

    # The same DeepSpeed checkpoint through our universal layout resumes on 4 ranks, ZeRO-2.
    convert_checkpoint(source, tmp_path / "universal", to="universal", progress=False)
    for state in distributed(4, _load_ours_worker, str(tmp_path / "universal"), 2):
        assert_states_equal(state, trained)


@pytest.mark.parametrize("load_world,load_stage", [(4, 3), (2, 1)])
def test_deepspeed_loads_our_checkpoint_as_universal(distributed, tmp_path, load_world, load_stage):
    saved = distributed(2, save_run, str(tmp_path / "ckpt"), 2, True, 3)[0]
    convert_checkpoint(
        tmp_path / "ckpt" / "step-3",
        tmp_path / "ds" / "global_step3",
        to="deepspeed-universal",
        progress=False,
    )
    assert (tmp_path / "ds" / "latest_universal").read_text() == "global_step3"
    for state in distributed(
        load_world, _deepspeed_load_universal_worker, str(tmp_path / "ds"), "global_step3", load_stage
    ):
        assert_states_equal(state, saved)


def test_universal_round_trip_and_inspect(distributed, tmp_path):
    saved = distributed(2, save_run, str(tmp_path / "ckpt"), 3, True, 2)[0]
    distributed_ckpt = tmp_path / "ckpt" / "step-2"
    convert_checkpoint(
        tmp_path / "ckpt", tmp_path / "u1", to="universal", progress=False
    )  # root -> newest step
    convert_checkpoint(
        tmp_path / "u1", tmp_path / "u2", to="universal", progress=False
    )  # universal -> universal
    with CheckpointReader(distributed_ckpt) as a, CheckpointReader(tmp_path / "u2") as b:
        assert b.meta["layout"] == "universal" and b.step == a.step == 2
        assert (
            b.specs == a.specs and b.optimizer_step == a.optimizer_step and b.param_groups == a.param_groups
        )
        assert b.lr_scheduler == a.lr_scheduler and b.engine_counters == a.engine_counters
        for name in a.specs:
            for state in STATES:
                torch.testing.assert_close(b.read_full(name, state), a.read_full(name, state), rtol=0, atol=0)
        for rank in (0, 1):
            extra_a, extra_b = a.extra(rank), b.extra(rank)
            assert extra_b["loader"] == extra_a["loader"]
            torch.testing.assert_close(
                extra_b["rng"][str(rank)]["cpu"], extra_a["rng"][str(rank)]["cpu"], rtol=0, atol=0
            )
    # One consolidated tensor per parameter and state.
    meta = json.loads((tmp_path / "u2" / COMMIT_FILE).read_text())
    assert all(len(p) == 1 for entry in meta["params"].values() for p in entry["pieces"].values())
    for state in distributed(1, _load_ours_worker, str(tmp_path / "u2"), 0):
        assert_states_equal(state, saved)

    report = inspect_checkpoint(distributed_ckpt)
    assert (
        report["committed"] and report["valid"] and report["step"] == 2 and report["layout"] == "distributed"
    )
    assert report["world_size"] == 2 and report["zero_stage"] == 3 and report["num_params"] == 6
    assert report["numel"] == 37 * 12 + 13 * 12 + 13 * 3 + 7 * 13
    assert report["tensors"] == 6 * 3 * 2  # ZeRO-3 on 2 ranks: two pieces per parameter and state
    text = format_inspection(report)
    assert "committed" in text and "up.weight" in text and "(13, 12)" in text
    assert inspect_checkpoint(tmp_path / "u2")["layout"] == "universal"
    root = inspect_checkpoint(tmp_path / "ckpt")
    assert [s["step"] for s in root["steps"]] == [2, 1] and root["latest_committed"].endswith("step-2")

    broken = tmp_path / "broken"
    shutil.copytree(distributed_ckpt, broken)
    (broken / COMMIT_FILE).unlink()
    report = inspect_checkpoint(broken)
    assert report["committed"] is False and report["valid"] is False and "never committed" in report["error"]
    assert "NOT committed" in format_inspection(report)


def test_inspect_deepspeed_checkpoint(distributed, tmp_path):
    distributed(2, _deepspeed_save_worker, str(tmp_path / "ds"), 2)
    report = inspect_checkpoint(tmp_path / "ds")  # root with `latest`
    assert report["format"] == "deepspeed" and report["zero_stage"] == 2 and report["step"] == 3
    assert report["world_size"] == 2 and report["optimizer_step"] == 3 and report["num_params"] == 6


def test_convert_rejects_bad_targets_and_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="--to"):
        convert_checkpoint(tmp_path, tmp_path / "out", to="gguf")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        convert_checkpoint(tmp_path / "junk", tmp_path / "out2", to="universal")


def test_hf_names():
    assert hf_name("embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_name("layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert (
        hf_name("layers.0.post_attention_layernorm.weight")
        == "model.layers.0.post_attention_layernorm.weight"
    )
    assert hf_name("norm.weight") == "model.norm.weight" and hf_name("lm_head.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="layer_pattern"):
        hf_name("layers.0.self_attn.gate_proj.weight")  # linear-attention layers have no HF Llama form


def _train_llama_worker(out: str) -> None:
    from longloom.config import load_config
    from longloom.training.trainer import run_training

    overrides = ["model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2", "data.seq_len=32"]
    overrides += ["train.steps=2", "train.dtype=fp32", "checkpoint.interval=2", f"train.output_dir={out}"]
    run_training(load_config(None, overrides))


def test_hf_export_of_a_trained_llama(distributed, tmp_path):
    distributed(1, _train_llama_worker, str(tmp_path / "run"))
    step = tmp_path / "run" / "checkpoints" / "step-2"
    convert_checkpoint(step, tmp_path / "hf", to="hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert (
        config["intermediate_size"] == 88
        and config["vocab_size"] == 259
        and config["torch_dtype"] == "float32"
    )
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {
            f"model.layers.{i}.{n}" for n in ("input_layernorm.weight", "post_attention_layernorm.weight")
        }
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert set(weights) == expected
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (
        16,
        32,
    )  # [kv_heads * head_dim, hidden]

    # The exported weights are the trained fp32 masters: a model built from them reproduces the
    # logits of a model loaded straight from our checkpoint.
    tokens, ours, exported = distributed(
        1, _logits_worker, str(step), str(tmp_path / "hf" / "model.safetensors")
    )[0]
    torch.testing.assert_close(exported, ours, rtol=0, atol=0)
    assert ours.abs().max() > 0
    # And transformers' own LlamaForCausalLM loads the folder to the same logits (its SDPA attention
    # against ours: equal up to fp32 rounding).
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(input_ids=tokens).logits
    torch.testing.assert_close(theirs / ours.abs().max(), ours / ours.abs().max(), rtol=0, atol=1e-5)


def _logits_worker(step: str, hf_file: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from longloom.config import load_config
    from longloom.models.llama import LlamaModel
    from longloom.parallel import ParallelDims

    cfg = load_config(None, ["model.hidden=32", "model.layers=2", "model.heads=4", "model.kv_heads=2"])
    dims = ParallelDims.build(dp=1, ulysses=1, ring=1)
    ours, exported = LlamaModel(cfg.model, dims).eval(), LlamaModel(cfg.model, dims).eval()
    with CheckpointReader(step) as reader:
        ours.load_state_dict({name: reader.read_full(name, "fp32") for name in reader.specs})
    weights = load_file(hf_file)
    exported.load_state_dict({name: weights[hf_name(name)] for name, _ in exported.named_parameters()})
    tokens, positions = torch.randint(0, 259, (1, 16)), torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        return tokens, ours(tokens, positions), exported(tokens, positions)


# --------------------------------------------------------------------------- HF folders in and out
# Training an HF family and exporting it: tests/training/test_hf_families.py. Here, in process: the
# import (an HF folder as a run's step 0), which is also a model.source hf: checkpoint to export.
def _tiny_folder(folder: Path, dtype=torch.float32, **overrides):
    from tests.models.hf_tiny import save_tiny_model

    model = save_tiny_model(folder, "qwen3", **overrides)
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(folder)
    return model


def _save_word_tokenizer(folder: Path) -> None:
    import tokenizers
    import transformers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def test_hf_folder_imports_as_step_0_and_exports_back_bit_for_bit(tmp_path):
    from longloom import cli

    _tiny_folder(tmp_path / "hf", torch.bfloat16, tie_word_embeddings=True)
    _save_word_tokenizer(tmp_path / "hf")
    assert cli.main(["ckpt", "convert", str(tmp_path / "hf"), str(tmp_path / "u"), "--to", "universal"]) == 0
    report = inspect_checkpoint(tmp_path / "u")
    assert report["committed"] and report["valid"] and report["step"] == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    with CheckpointReader(tmp_path / "u") as reader:
        assert set(reader.specs) == set(original), "the model's parameter names; the tied head once"
        assert "lm_head.weight" not in reader.specs and reader.optimizer_step == 0
        for name, tensor in original.items():
            assert reader.specs[name].dtype == torch.bfloat16
            assert torch.equal(reader.read_full(name, "fp32"), tensor.float())
            assert (
                not reader.read_full(name, "exp_avg").any() and not reader.read_full(name, "exp_avg_sq").any()
            )
        assert reader.extra(0)["loader"] == {"next_step": 0, "consumed_samples": 0}
    assert cli.main(["ckpt", "convert", str(tmp_path / "u"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == original.keys()
    assert all(
        back[name].dtype == torch.bfloat16 and torch.equal(back[name], original[name]) for name in original
    )
    config, saved = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("back", "hf"))
    assert config == saved
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    # --dtype casts the weights and says so in config.json.
    convert_checkpoint(tmp_path / "u", tmp_path / "fp32", to="hf", progress=False, dtype="fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert load_file(tmp_path / "fp32" / "model.safetensors")["model.norm.weight"].dtype == torch.float32


def test_hf_conversions_refuse_bad_input_and_write_nothing(tmp_path, capsys):
    from longloom import cli

    _tiny_folder(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "u", to="universal", progress=False)
    with pytest.raises(ValueError, match=r"is a Hugging Face model folder: it converts --to universal only"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", to="hf", progress=False)
    with pytest.raises(ValueError, match=r"--hf-folder applies to --to hf only"):
        convert_checkpoint(tmp_path / "u", tmp_path / "out", to="universal", hf_folder=tmp_path / "hf")
    # Weights that do not fit config.json: the key and file are named.
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "hf", wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
    with pytest.raises(
        ValueError, match=r"mlp.down_proj.weight: \[48, 96\] in model.safetensors, \[48, 64\]"
    ):
        convert_checkpoint(wrong, tmp_path / "out", to="universal", progress=False)
    # The run's folder moved: named, with the flag that fixes it; --hf-folder of another shape is refused.
    moved = tmp_path / "moved"
    (tmp_path / "hf").rename(moved)
    assert cli.main(["ckpt", "convert", str(tmp_path / "u"), str(tmp_path / "out"), "--to", "hf"]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'hf' / 'config.json'}" in error and "pass --hf-folder <folder>" in error
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.down_proj.weight: \[48, 96\] in the checkpoint, \[48, 64\]"
    ):
        convert_checkpoint(tmp_path / "u", tmp_path / "out", to="hf", progress=False, hf_folder=wrong)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    args = [
        "ckpt",
        "convert",
        str(tmp_path / "u"),
        str(tmp_path / "out"),
        "--to",
        "hf",
        "--hf-folder",
        str(moved),
    ]
    assert cli.main(args) == 0 and (tmp_path / "out" / "model.safetensors").is_file()
