"""Loading a pretrained HF causal LM from a local folder: exact round trip, RoPE overrides as transformers
computes them, ZeRO-3 partitioned loading, and a clear ValueError for every folder longloom cannot train."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from longloom.models.hf_loading import (
    build_hf_causal_lm,
    check_hf_folder,
    hf_folder,
    load_hf_config,
    restore_rope_buffers,
)
from longloom.models.hf_weights import load_safetensors_weights
from tests.models.hf_tiny import random_tokens, save_tiny_model, tiny_config, tiny_model

SEQ = 32


def _load(folder, seq_len=SEQ, **overrides):
    return build_hf_causal_lm(folder, load_hf_config(folder, **overrides), seq_len=seq_len).eval()


@pytest.mark.parametrize(
    "family, overrides, max_shard_size",
    [
        ("llama", {}, None),
        ("mistral", {"sliding_window": SEQ}, "40KB"),  # a window covering the sequence is full attention
        ("qwen2", {"tie_word_embeddings": True}, None),
        ("qwen3", {"tie_word_embeddings": True}, "40KB"),  # sharded, index json
    ],
)
def test_loaded_model_equals_the_saved_one(tmp_path, family, overrides, max_shard_size):
    saved = save_tiny_model(tmp_path, family, max_shard_size, **overrides)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(max_shard_size)
    check_hf_folder(tmp_path, load_hf_config(tmp_path), SEQ)  # the checks alone pass (a tied head too)
    loaded = _load(hf_folder(f"hf:{tmp_path}"))
    assert type(loaded) is type(saved)
    if overrides.get("tie_word_embeddings"):
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, saved(tokens).logits, rtol=0, atol=0)


def test_a_chosen_dtype_and_device(tmp_path):
    save_tiny_model(tmp_path, "llama")
    model = build_hf_causal_lm(tmp_path, load_hf_config(tmp_path), SEQ, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32, "RoPE frequencies stay fp32"


LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize(
    "rope_theta, rope_scaling, reference_rope",
    [
        (5e5, None, {"rope_type": "default", "rope_theta": 5e5}),
        (None, {"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
        # Dynamic NTK changes the frequencies only beyond max_position_embeddings (16 < SEQ here).
        (
            None,
            {"type": "dynamic", "factor": 2.0},
            {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        ),
        (
            2e4,
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 2e4},
        ),
        (
            None,
            {"type": "llama3", "factor": 4.0} | LLAMA3,
            {"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4} | LLAMA3,
        ),
    ],
    ids=["theta", "linear", "dynamic", "yarn", "llama3"],
)
def test_rope_overrides_equal_transformers_with_that_config(
    tmp_path, rope_theta, rope_scaling, reference_rope
):
    saved = save_tiny_model(tmp_path, "llama", max_position_embeddings=16)
    loaded = _load(tmp_path, rope_theta=rope_theta, rope_scaling=rope_scaling)
    reference = transformers.LlamaForCausalLM(
        tiny_config("llama", max_position_embeddings=16, rope_parameters=dict(reference_rope))
    ).eval()
    reference.load_state_dict(saved.state_dict())
    assert loaded.config.rope_parameters == reference.config.rope_parameters  # what an export writes
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        want = reference(tokens).logits
        torch.testing.assert_close(loaded(tokens).logits, want, rtol=0, atol=0)
        assert not torch.allclose(saved(tokens).logits, want), "the override must change the model"


def test_a_legacy_llama31_config_keeps_its_pretraining_length(tmp_path):
    """config.json with the old rope_theta / rope_scaling keys (as Llama 3.1 folders have them)."""
    saved = save_tiny_model(tmp_path, "llama")
    legacy = {"rope_type": "llama3", "factor": 8.0} | LLAMA3
    _write_config(tmp_path, rope_parameters=None, rope_theta=5e5, rope_scaling=legacy)
    assert load_hf_config(tmp_path).rope_parameters == legacy | {"rope_theta": 5e5}
    loaded = _load(tmp_path, rope_scaling={"type": "yarn", "factor": 16.0})
    want = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8, "rope_theta": 5e5}
    assert loaded.config.rope_parameters == want
    reference = transformers.LlamaForCausalLM(tiny_config("llama", rope_parameters=dict(want))).eval()
    reference.load_state_dict(saved.state_dict())
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits, rtol=0, atol=0)


def _write_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del config[key]
    path.write_text(json.dumps(config))


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


BAD_FOLDERS = {
    "no_config": (
        lambda f: (f / "config.json").unlink(),
        r"has no config\.json: not a transformers model folder",
    ),
    "no_model_type": (lambda f: _write_config(f, model_type=None), r"has no 'model_type'"),
    "no_architectures": (lambda f: _write_config(f, architectures=None), r"has no 'architectures'"),
    "custom_code": (
        lambda f: _write_config(f, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}),
        r"'auto_map' \(\['AutoModelForCausalLM'\]\): the architecture needs custom code",
    ),
    "unknown_type": (lambda f: _write_config(f, model_type="no_such_model"), r"'no_such_model' is not known"),
    "no_weights": (
        lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
        r"found \['pytorch_model\.bin'\]",
    ),
    "missing_tensor": (
        lambda f: _edit_weights(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        r"1 model tensors are not in the weights: model\.layers\.1\.mlp\.up_proj\.weight",
    ),
    "unexpected_tensor": (
        lambda f: _edit_weights(f, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)})),
        r"belong to no model tensor: model\.layers\.2\.mlp\.up_proj\.weight",
    ),
    "shape_mismatch": (
        lambda f: _write_config(f, intermediate_size=64),
        r"model\.layers\.0\.mlp\.gate_proj\.weight: \[96, 48\] in model\.safetensors, \[64, 48\] in the model",
    ),
    "sliding_window": (
        lambda f: _write_config(
            f, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16
        ),
        r"sliding window of 16 tokens \(config\.json sliding_window\), shorter than data\.seq_len=32",
    ),
    "qwen2_sliding_layers": (
        lambda f: _write_config(
            f,
            model_type="qwen2",
            architectures=["Qwen2ForCausalLM"],
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
        r"sliding window of 8 tokens",
    ),
    "attention_dropout": (lambda f: _write_config(f, attention_dropout=0.1), r"attention_dropout=0\.1"),
    "rope_type": (
        {"rope_scaling": {"type": "ntk", "factor": 2.0}},
        r"needs one 'type' \(or 'rope_type'\) among",
    ),
    "rope_keys": ({"rope_scaling": {"type": "yarn"}}, r"refused by transformers: .*Missing required keys"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_folders_longloom_cannot_train_are_refused(tmp_path, case):
    save_tiny_model(tmp_path, "llama")
    change, message = BAD_FOLDERS[case]
    overrides = change if isinstance(change, dict) else {}
    if not overrides:
        change(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):  # the checks alone, on the meta device
        check_hf_folder(tmp_path, load_hf_config(tmp_path, **overrides), SEQ)
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, **overrides)
    assert sorted(path.name for path in tmp_path.iterdir()) == before, "nothing written"


def test_a_shard_missing_from_the_index_is_named(tmp_path):
    save_tiny_model(tmp_path, "llama", max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"lists shard files that are not there: \[.*{shard.name}"):
        _load(tmp_path)


def test_a_missing_folder_is_named():
    with pytest.raises(
        ValueError, match=r"model\.source='hf:/no/such/folder': /no/such/folder is not a folder"
    ):
        hf_folder("hf:/no/such/folder")
    assert hf_folder("native") is None


@pytest.mark.parametrize(
    "config, message",
    [
        (
            transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=96),
            r"BloomForCausalLM does not call",
        ),
        (
            transformers.GptOssConfig(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                num_local_experts=2,
                num_experts_per_tok=1,
                vocab_size=96,
            ),
            r"GptOssForCausalLM has attention sinks \(model\.layers\.0\.self_attn\.sinks",
        ),
    ],
    ids=["no_attention_interface", "attention_sinks"],
)
def test_architectures_sequence_parallelism_cannot_run_are_refused(tmp_path, config, message):
    config.architectures = [
        transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    ]
    config.save_pretrained(tmp_path)  # the config is enough: refused before any weight is read
    with pytest.raises(ValueError, match=message):
        _load(tmp_path)


ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def _zero3_worker(folder: str):
    import deepspeed

    model = build_hf_causal_lm(folder, load_hf_config(folder), SEQ, zero3_config=ZERO3).eval()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    saved = load_file(f"{folder}/model.safetensors")
    assert all(p.numel() == 0 for p in model.parameters()), "partitioned: no rank holds a whole parameter"
    kept = sum(p.ds_tensor.ds_numel for p in model.parameters())
    # Each rank copied in only what it keeps: its partitions, less the padding of the last ones.
    loaded = load_safetensors_weights(model, folder)
    assert loaded.elements <= kept and sum(_gather_sum(loaded.elements)) == sum(
        t.numel() for t in saved.values()
    )
    for name, parameter in model.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter]):
            torch.testing.assert_close(parameter.data, saved[name], rtol=0, atol=0, msg=name)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    return rank, world


def _gather_sum(value: int) -> list[int]:
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def test_zero3_ranks_load_only_their_partitions(distributed, tmp_path):
    save_tiny_model(tmp_path, "qwen3", tie_word_embeddings=True)
    assert distributed(2, _zero3_worker, str(tmp_path)) == [(0, 2), (1, 2)]


def test_rope_frequencies_saved_by_old_checkpoints_are_skipped(tmp_path):
    saved = save_tiny_model(tmp_path, "llama")
    _edit_weights(
        tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6)})
    )
    tokens = random_tokens(2, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path)(tokens).logits, saved(tokens).logits, rtol=0, atol=0)


def test_weights_into_a_model_of_another_config_are_refused(tmp_path):
    save_tiny_model(tmp_path, "llama")
    model = tiny_model("llama", num_hidden_layers=3)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"are not in the weights: model\.layers\.2\.self_attn\.q_proj\.weight"
    ):
        load_safetensors_weights(model, tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed although the load was refused"


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        (
            "qwen3",
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        ),
    ],
)
def test_rope_frequencies_cast_by_zero_init_are_rebuilt_in_fp32(family, overrides):
    """What zero.Init does to RoPE buffers where transformers has no arange guard (5.17): cast to bf16."""
    model = tiny_model(family, **overrides)
    want = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    assert want and all(buffer.dtype == torch.float32 for buffer in want.values())
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if name.endswith("inv_freq"):
                setattr(module, name, buffer.to(torch.bfloat16))
    restore_rope_buffers(model)
    got = {name: buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], expected), name
