"""The HF adapter under the trainer's call: the same loss and gradients as the plain HF model on one process.

The reference is the unmodified HF model (SDPA attention, its own shifted cross entropy over valid
labels) on the whole batch. The adapter gets pre-shifted labels cut by `ParallelDims.shard_batch`
exactly as the trainer hands them to longloom's own model, with the fused LM-head loss normalised
over the world; gradients are averaged over the world as DeepSpeed does.
"""

import pytest
import torch

from longloom.models.hf_causal_lm import HFCausalLM
from longloom.models.hf_offload import enable_activation_offload
from longloom.models.hf_tiled_mlp import enable_tiled_mlp
from longloom.models.llama import LanguageModelHead, LlamaModel
from longloom.parallel import ParallelDims
from tests.models.hf_tiny import random_tokens, save_tiny_model, tiny_model
from tests.models.tiny import tiny_model_config

SEQ, BATCH = 32, 2
# One untied head (Llama) and one tied to the embedding (Qwen3, with its q/k norms and head_dim != hidden / heads).
MODELS = {"llama": {}, "qwen3": {"tie_word_embeddings": True, "head_dim": 16}}


def _batch() -> dict[str, torch.Tensor]:
    """The trainer's full batch: tokens, positions and pre-shifted labels (-100 for a prompt and the last token)."""
    tokens = random_tokens(BATCH, SEQ)
    labels = tokens.clone()
    labels[0, :5] = -100
    shifted = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], -100)), dim=1)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    return {"tokens": tokens, "position_ids": positions, "labels": shifted, "unshifted_labels": labels}


def _reference(family: str):
    model = tiny_model(family, **MODELS[family])
    batch = _batch()
    loss = model(input_ids=batch["tokens"], labels=batch["unshifted_labels"]).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_matches_reference(family: str, loss: torch.Tensor, grads: dict, where: str = "") -> None:
    want_loss, want_grads = _reference(family)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0, msg=where)
    assert grads.keys() == want_grads.keys(), "the adapter's parameter names are the HF model's"
    for name, want in want_grads.items():
        scale = want.abs().max()
        torch.testing.assert_close(
            grads[name] / scale, want / scale, rtol=0, atol=5e-6, msg=f"{where} {name}"
        )


@pytest.mark.parametrize("family", sorted(MODELS))
def test_single_process_loss_and_gradients_equal_the_hf_model(family):
    model = HFCausalLM(tiny_model(family, **MODELS[family]))
    batch = _batch()
    loss, stats = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    loss.backward()
    assert int(stats.tokens) == BATCH * (SEQ - 1) - 4  # tokens 1-4 of sample 0 are not predicted
    _assert_matches_reference(family, stats.loss, {name: p.grad for name, p in model.named_parameters()})
    torch.testing.assert_close(loss.detach(), stats.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_tiled_mlp_changes_nothing_but_the_tiles(family, monkeypatch):
    """model.mlp_tiles for hf: models: every layer's MLP runs over 3 token tiles; loss and gradients as HF's."""
    causal_lm = tiny_model(family, **MODELS[family])
    mlp_class = type(causal_lm.get_decoder().layers[0].mlp)
    calls = []
    plain = mlp_class.forward
    monkeypatch.setattr(mlp_class, "forward", lambda self, x: calls.append(x.shape) or plain(self, x))
    names = [name for name, _ in causal_lm.named_parameters()]
    assert enable_tiled_mlp(causal_lm, 3) == causal_lm.config.num_hidden_layers
    assert [name for name, _ in causal_lm.named_parameters()] == names, "HF parameter names are kept"
    model = HFCausalLM(causal_lm)
    batch = _batch()
    loss, stats = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    loss.backward()
    # 3 tiles per layer in forward, each recomputed once in backward.
    tokens = BATCH * SEQ
    assert len(calls) == 2 * 3 * causal_lm.config.num_hidden_layers
    assert sorted({shape[0] for shape in calls}) == sorted({tokens // 3, tokens - 2 * (tokens // 3)})
    _assert_matches_reference(family, stats.loss, {name: p.grad for name, p in model.named_parameters()})


def test_tiled_mlp_refuses_a_decoder_without_mlp_modules():
    causal_lm = tiny_model("llama")
    del causal_lm.get_decoder().layers[0].mlp
    with pytest.raises(ValueError, match="set model.mlp_tiles: 1"):
        enable_tiled_mlp(causal_lm, 2)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_without_labels_the_logits_are_the_hf_model_logits(family):
    reference = tiny_model(family, **MODELS[family])
    model = HFCausalLM(tiny_model(family, **MODELS[family]))
    batch = _batch()
    with torch.no_grad():
        want = reference(input_ids=batch["tokens"]).logits
        torch.testing.assert_close(model(batch["tokens"], batch["position_ids"]), want, rtol=0, atol=0)
        # The HF model's own forward goes through the swapped head too.
        torch.testing.assert_close(model.causal_lm(input_ids=batch["tokens"]).logits, want, rtol=0, atol=0)
    assert isinstance(model.causal_lm.lm_head, LanguageModelHead)
    tied = model.causal_lm.lm_head.weight is model.causal_lm.get_input_embeddings().weight
    assert tied == bool(MODELS[family].get("tie_word_embeddings"))
    assert set(model.state_dict()) == set(reference.state_dict()), "state-dict names are the HF ones"


def _sequence_parallel_worker(family: str, ulysses: int, ring: int, layers: str = "plain"):
    dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    model = HFCausalLM(tiny_model(family, **MODELS[family]), dims).train()
    first_layer_calls = []
    # A pre-hook: a non-reentrant recompute stops early, inside the MLP, once it has what the backward needs.
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: first_layer_calls.append(1))
    if layers == "checkpointed":  # train.activation_checkpointing through transformers' own switch
        model.causal_lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    elif layers == "offloaded":  # offload.activations: inputs to host, half the attention outputs kept
        offloader = enable_activation_offload(model.causal_lm, 0.5, "cpu")
        assert offloader.token_wise
    batch = _batch()
    del batch["unshifted_labels"]
    local = dims.shard_batch(batch)
    loss, stats = model(
        local["tokens"],
        local["position_ids"],
        labels=local["labels"],
        loss_group=torch.distributed.group.WORLD,
    )
    loss.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        torch.distributed.all_reduce(parameter.grad)  # DeepSpeed's averaging over the world
        grads[name] = parameter.grad / dims.world_size
    if layers == "offloaded":
        assert offloader.swapped_bytes > 0, "the layers went through the offloader"
    assert len(first_layer_calls) == (1 if layers == "plain" else 2), "recomputed in the backward"
    return stats.loss, grads


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_sequence_parallel_loss_and_gradients_equal_the_hf_model(distributed, family, ulysses, ring):
    for rank, (loss, grads) in enumerate(distributed(2, _sequence_parallel_worker, family, ulysses, ring)):
        _assert_matches_reference(family, loss, grads, where=f"rank {rank}")


@pytest.mark.parametrize("layers", ["checkpointed", "offloaded"])
def test_layer_checkpointing_and_offload_through_the_adapter_change_nothing(distributed, layers):
    for rank, (loss, grads) in enumerate(distributed(2, _sequence_parallel_worker, "qwen3", 1, 2, layers)):
        _assert_matches_reference("qwen3", loss, grads, where=f"rank {rank}")


# Plain SGD on both sides: the update is the gradient itself, so the steps check the engine path (loss,
# gradient averaging over the world, no clipping) rather than two optimizer implementations.
STEPS, LR = 3, 0.1


def _step_batch(step: int) -> dict[str, torch.Tensor]:
    tokens = random_tokens(BATCH, SEQ, seed=100 + step % 2)  # two batches in turn: the model learns both
    shifted = torch.cat((tokens[:, 1:], torch.full_like(tokens[:, :1], -100)), dim=1)
    return {"tokens": tokens, "position_ids": torch.arange(SEQ).expand(BATCH, -1), "labels": shifted}


def _zero2_training_worker(folder: str, ulysses: int, ring: int) -> list[float]:
    """A few optimizer steps as the trainer takes them: folder -> adapter -> DeepSpeed ZeRO-2 engine."""
    import deepspeed

    from longloom.models.hf_loading import build_hf_causal_lm, load_hf_config

    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,  # plain torch SGD
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0
    }
    dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    model = HFCausalLM(build_hf_causal_lm(folder, load_hf_config(folder), SEQ), dims)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        config=ds_config,
        dist_init_required=False,
    )
    losses = []
    for step in range(STEPS):
        local = dims.shard_batch(_step_batch(step))
        loss, stats = engine(
            local["tokens"],
            local["position_ids"],
            labels=local["labels"],
            loss_group=torch.distributed.group.WORLD,
        )
        engine.backward(loss)
        engine.step()
        losses.append(float(stats.loss))
    engine.destroy()
    return losses


@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_zero2_training_steps_follow_the_hf_model(distributed, tmp_path, ulysses, ring):
    saved = save_tiny_model(tmp_path, "qwen3", **MODELS["qwen3"]).train()
    optimizer = torch.optim.SGD(saved.parameters(), lr=LR)
    want = []
    for step in range(STEPS):
        batch = _step_batch(step)
        loss = saved(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        want.append(loss.item())
    assert want[2] < want[0] - 0.1, "the steps must change the model"
    for rank, losses in enumerate(distributed(2, _zero2_training_worker, str(tmp_path), ulysses, ring)):
        torch.testing.assert_close(
            torch.tensor(losses),
            torch.tensor(want),
            rtol=1e-5,
            atol=0,
            msg=f"rank {rank}: {losses} vs {want}",
        )


def _zero3_worker(folder: str, family: str):
    """The trainer's path under ZeRO-3: partitioned build and load, the engine, its backward."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from longloom.models.hf_loading import build_hf_causal_lm, load_hf_config

    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    dims = ParallelDims.build(dp=2)
    causal_lm = build_hf_causal_lm(folder, load_hf_config(folder), SEQ, zero3_config=ds_config)
    model = HFCausalLM(causal_lm, dims)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, dist_init_required=False
    )
    batch = _batch()  # the same full batch on both data-parallel ranks: the average is the one-batch gradient
    loss, stats = engine(
        batch["tokens"],
        batch["position_ids"],
        labels=batch["labels"],
        loss_group=torch.distributed.group.WORLD,
    )
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).clone() for name, p in model.named_parameters()}
    engine.destroy()
    return stats.loss, grads


@pytest.mark.parametrize("family", sorted(MODELS))
def test_zero3_engine_loss_and_gradients_equal_the_hf_model(distributed, tmp_path, family):
    save_tiny_model(tmp_path, family, **MODELS[family])
    for rank, (loss, grads) in enumerate(distributed(2, _zero3_worker, str(tmp_path), family)):
        _assert_matches_reference(family, loss, grads, where=f"rank {rank}")


def test_parameters_and_flops_count_like_the_native_llama():
    config = tiny_model_config("SS", intermediate=96)
    native = LlamaModel(config)
    hf = HFCausalLM(
        tiny_model(
            "llama",
            vocab_size=config.vocab_size,
            hidden_size=config.hidden,
            intermediate_size=96,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads,
            head_dim=config.head_dim,
        )
    )
    assert hf.num_parameters() == native.num_parameters()
    assert hf.flops_per_token(1024) == native.flops_per_token(1024)
    tied = HFCausalLM(tiny_model("llama", tie_word_embeddings=True))
    untied = HFCausalLM(tiny_model("llama"))
    assert tied.num_parameters() == untied.num_parameters() - untied.lm_head.weight.numel()
    assert tied.flops_per_token(1024) == untied.flops_per_token(1024), "a tied head is still a matmul"


def _packed_documents_worker(document_length: int):
    dims = ParallelDims.build(dp=1, ulysses=2)
    model = HFCausalLM(tiny_model("llama"), dims)
    batch = _batch()
    batch["position_ids"] = torch.arange(SEQ).remainder(document_length).expand(BATCH, -1)
    local = dims.shard_batch({key: batch[key] for key in ("tokens", "position_ids", "labels")})
    with pytest.raises(ValueError, match=r"position_ids restart at 0 inside a sample \(packed documents\)"):
        model(local["tokens"], local["position_ids"], labels=local["labels"])
    # With their document ids the same positions train (the trainer's path for data.document_masking).
    document_ids = (torch.arange(SEQ) // document_length).expand(BATCH, -1)
    local_ids = dims.shard_batch({"document_ids": document_ids})["document_ids"]
    loss, _ = model(local["tokens"], local["position_ids"], labels=local["labels"], document_ids=local_ids)
    return bool(torch.isfinite(loss))


# 10: boundaries inside each rank's share; 16: the only boundary on the shard edge, where each rank alone
# sees consecutive positions (the group decides, models/hf.py's packed_document_ids).
@pytest.mark.parametrize("document_length", [10, SEQ // 2])
def test_packed_documents_without_ids_are_refused_under_sequence_parallelism(distributed, document_length):
    assert all(distributed(2, _packed_documents_worker, document_length))


def test_heads_the_fused_loss_cannot_reproduce_are_refused():
    with pytest.raises(TypeError, match=r"needs a transformers PreTrainedModel, got Linear"):
        HFCausalLM(torch.nn.Linear(2, 2))
    with_bias = tiny_model("llama")
    with_bias.lm_head = torch.nn.Linear(48, with_bias.config.vocab_size, bias=True)
    with pytest.raises(ValueError, match=r"needs a linear head without bias"):
        HFCausalLM(with_bias)
    scaled = tiny_model("llama")
    scaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match=r"transforms its logits \(\{'logit_scale': 0\.5\}\)"):
        HFCausalLM(scaled)
