"""A Hugging Face Llama made sequence-parallel by longloom.models.hf: same loss and gradients as plain HF.

The reference is the unmodified HF model (SDPA attention, its own shifted loss) on the whole batch in
one process; the SP runs cut the same batch over gloo ranks and average gradients over the world as
DeepSpeed would. Every configuration SP cannot reproduce must raise ValueError.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longloom.models.hf import causal_lm_loss, enable_sequence_parallel, shard_causal_lm_batch
from longloom.models.hf_offload import enable_activation_offload
from longloom.parallel import ParallelDims

SEQ, BATCH, VOCAB, PADDED_FROM = 32, 2, 128, 26


def _config(**overrides) -> transformers.LlamaConfig:
    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4 * SEQ,
        "initializer_range": 0.1,  # larger than HF's 0.02: attention far from uniform, a sharper test
    }
    return transformers.LlamaConfig(**(settings | overrides))


def _model(config=None, cls=transformers.LlamaForCausalLM) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return cls(config or _config()).float()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, HF-style (unshifted) labels, and a right-padding attention mask for sample 1."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt whose tokens are not predicted
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, PADDED_FROM:] = 0
    return input_ids, labels, attention_mask


def _single_process():
    model = _model()
    input_ids, labels, attention_mask = _batch()
    labels = labels.masked_fill(attention_mask == 0, -100)  # what an HF user does for padding
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _sequence_parallel_worker(
    dp: int, ulysses: int, ring: int, offload_share: float = 0.0, device_share: float = 0.0
):
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    model = _model()
    enable_sequence_parallel(model, dims)
    if offload_share:
        model.train()
        offloader = enable_activation_offload(model, offload_share, "cpu", device_share=device_share)
    input_ids, labels, attention_mask = _batch()
    batch = shard_causal_lm_batch(input_ids, dims, labels=labels, attention_mask=attention_mask)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss, stats = causal_lm_loss(logits, batch["shift_labels"], dims)
    loss.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        torch.distributed.all_reduce(parameter.grad)  # what DeepSpeed does over dp x sp: sum / world
        grads[name] = parameter.grad / dims.world_size
    if offload_share:
        # The first of 2 layers swapped its input [2, 32 / sp, 64] and, where attention runs (all 32 tokens
        # after Ulysses' all-to-all, 32 / ring round the ring), the swapped tokens' out and lse, fp32.
        tokens, heads = SEQ // ring, 4 // ulysses
        swapped, on_device = round(offload_share * tokens), round(device_share * tokens)
        per_token = BATCH * heads * (16 + 1) * 4
        want = BATCH * SEQ // dims.sp * 64 * 4 + swapped * per_token
        assert offloader.swapped_bytes == want, (offloader.swapped_bytes, want)
        # device_share: the first layer kept `on_device` more on the GPU, the last all it kept.
        last_layer = swapped + on_device if on_device else 0
        assert offloader.device_kept_bytes == (on_device + last_layer) * per_token
    return float(stats.loss), grads


def _assert_every_rank_matches_single_process(results: list) -> None:
    want_loss, want_grads = _single_process()
    for rank, (loss, grads) in enumerate(results):
        torch.testing.assert_close(torch.tensor(loss), want_loss, rtol=1e-6, atol=0, msg=f"rank {rank}")
        for name, want in want_grads.items():
            scale = want.abs().max()
            torch.testing.assert_close(
                grads[name] / scale, want / scale, rtol=0, atol=5e-6, msg=f"rank {rank}: {name}"
            )


@pytest.mark.parametrize(
    "dp, ulysses, ring",
    [
        (1, 2, 1),  # Ulysses
        (1, 1, 2),  # TokenRing, zigzag layout
        (1, 2, 2),  # Ulysses x TokenRing
        (1, 4, 1),  # Ulysses with K/V heads replicated (2 K/V heads over 4 ranks)
        (2, 2, 1),  # two SP groups, each with the same full batch
    ],
)
def test_sequence_parallel_hf_model_equals_single_process(distributed, dp, ulysses, ring):
    results = distributed(dp * ulysses * ring, _sequence_parallel_worker, dp, ulysses, ring)
    _assert_every_rank_matches_single_process(results)


@pytest.mark.parametrize("ulysses, ring, share, device_share", [(2, 1, 0.5, 0.0), (1, 2, 0.25, 0.5)])
def test_activation_offload_with_sequence_parallel_equals_single_process(
    distributed, ulysses, ring, share, device_share
):
    """Layer inputs to host memory and a share of the attention outputs kept (on the host, or also in GPU
    memory: offload.device_activations): nothing changes."""
    results = distributed(ulysses * ring, _sequence_parallel_worker, 1, ulysses, ring, share, device_share)
    _assert_every_rank_matches_single_process(results)


def test_activation_offload_of_a_plain_hf_model_swaps_inputs_only():
    want_loss, want_grads = _single_process()
    model = _model().train()
    offloader = enable_activation_offload(model, 1.0, "cpu")
    assert not offloader.token_wise, "SDPA attention does not take attention_outputs"
    input_ids, labels, attention_mask = _batch()
    labels = labels.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=0)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert offloader.swapped_bytes == BATCH * SEQ * 64 * 4, "the first of 2 layers' input, fp32"


def test_activation_offload_needs_checkpointable_layers():
    with pytest.raises(ValueError, match="GradientCheckpointingLayer"):
        enable_activation_offload(torch.nn.Linear(2, 2), 1.0, "cpu")


def test_device_share_needs_sequence_parallel_attention():
    """A plain HF model's attention keeps no outputs: a device share would silently keep nothing."""
    with pytest.raises(ValueError, match=r"offload.device_activations=0.5 .* enable_sequence_parallel"):
        enable_activation_offload(_model().train(), 0.5, "cpu", device_share=0.5)


def _runtime_error_worker(case: str):
    """Each case: the call that must raise, on a 2-rank Ulysses split of a model enabled for SP."""
    dims = ParallelDims.build(dp=1, ulysses=2)
    input_ids, _, _ = _batch()
    batch = shard_causal_lm_batch(input_ids, dims)
    local_ids, positions = batch["input_ids"], batch["position_ids"]
    model = _model(
        {
            "dropout": _config(attention_dropout=0.1),
            "sliding_window": transformers.MistralConfig(
                **_config().to_dict() | {"sliding_window": SEQ // 4}
            ),
        }.get(case)
        or _config(),
        cls=transformers.MistralForCausalLM if case == "sliding_window" else transformers.LlamaForCausalLM,
    )
    enable_sequence_parallel(model, dims)
    calls = {
        "padding_mask": (
            lambda: model(
                input_ids=local_ids, position_ids=positions, attention_mask=torch.zeros_like(local_ids)
            ),
            r"attention_mask of shape \(2, 16\) masks tokens out",
        ),
        "4d_mask": (
            lambda: model(
                input_ids=local_ids,
                position_ids=positions,
                attention_mask=torch.ones(2, 1, 16, 16, dtype=torch.bool),
            ),
            r"attention_mask of shape \(2, 1, 16, 16\)",
        ),
        "missing_position_ids": (lambda: model(input_ids=local_ids), r"no position_ids .* over 2 ranks"),
        "jumping_positions": (  # neither +1 nor a restart at 0, on both ranks
            lambda: model(
                input_ids=local_ids,
                position_ids=dims.shard_sequence(
                    (torch.arange(SEQ) + 3 * (torch.arange(SEQ) % 16 >= 5))[None]
                ),
            ),
            r"position_ids go from (4 to 8|20 to 24) at local position 5 of row 0: .*restart at 0",
        ),
        "left_padding": (
            lambda: shard_causal_lm_batch(
                input_ids, dims, attention_mask=torch.arange(SEQ).expand(BATCH, -1) > 2
            ),
            r"not right padding",
        ),
        "dropout": (lambda: model(input_ids=local_ids, position_ids=positions), r"attention dropout 0\.1"),
        "sliding_window": (
            lambda: model(input_ids=local_ids, position_ids=positions),
            r"sliding window of 8 tokens, shorter than the sequence \(32 tokens\)",
        ),
        "kv_cache": (
            lambda: model(
                input_ids=local_ids,
                position_ids=positions + SEQ,
                past_key_values=model(
                    input_ids=local_ids, position_ids=positions, use_cache=True
                ).past_key_values,
            ),
            r"32 keys for 16 queries \(a KV cache\)",
        ),
    }
    call, message = calls[case]
    with pytest.raises(ValueError, match=message):
        call()
    if case == "dropout":  # dropout is only refused in training
        model.eval()
        model(input_ids=local_ids, position_ids=positions)
    return True


@pytest.mark.parametrize(
    "case",
    [
        "padding_mask",
        "4d_mask",
        "missing_position_ids",
        "jumping_positions",
        "left_padding",
        "dropout",
        "sliding_window",
        "kv_cache",
    ],
)
def test_what_sequence_parallel_cannot_do_raises(distributed, case):
    assert all(distributed(2, _runtime_error_worker, case))


def test_sliding_window_covering_the_sequence_is_full_attention(distributed):
    assert all(distributed(2, _sliding_window_worker))


def _sliding_window_worker():
    dims = ParallelDims.build(dp=1, ulysses=2)

    def config():  # one per model: set_attn_implementation changes the model's config object
        return transformers.MistralConfig(**_config().to_dict() | {"sliding_window": SEQ})

    reference = _model(config(), cls=transformers.MistralForCausalLM)
    model = _model(config(), cls=transformers.MistralForCausalLM)
    enable_sequence_parallel(model, dims)
    input_ids, _, _ = _batch()
    batch = shard_causal_lm_batch(input_ids, dims)
    with torch.no_grad():
        want = dims.shard_sequence(reference(input_ids=input_ids).logits)
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    return True


# Checked when enabling, before any communication: a hand-made dims object is enough.
UNSPLIT_DIMS = ParallelDims(dp=1, ulysses=2, ring=1, rank=0, world_size=2)


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda: _model(_config(is_causal=False)), r"config\.is_causal=False"),
        (
            lambda: _model(_config(layer_types=["full_attention", "linear_attention"])),
            r"layer types \['linear_attention'\]",
        ),
        (
            lambda: _model(_config(hidden_size=48, num_attention_heads=3, num_key_value_heads=3)),
            r"model\.heads = 3 is not divisible by parallel\.ulysses = 2",
        ),
    ],
    ids=["non_causal", "linear_layers", "heads"],
)
def test_models_sequence_parallel_cannot_split_are_refused(make_model, message):
    with pytest.raises(ValueError, match=message):
        enable_sequence_parallel(make_model(), UNSPLIT_DIMS)


def test_a_model_that_is_not_from_transformers_is_refused():
    with pytest.raises(TypeError, match=r"needs a transformers PreTrainedModel, got Linear"):
        enable_sequence_parallel(torch.nn.Linear(2, 2), UNSPLIT_DIMS)


def _packed_worker(ulysses: int, ring: int, lengths: list[int]):
    dims = ParallelDims.build(dp=1, ulysses=ulysses, ring=ring)
    model = _model()
    enable_sequence_parallel(model, dims)
    input_ids = _batch()[0]
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(BATCH, -1)
    batch = shard_causal_lm_batch(input_ids, dims, position_ids=positions)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits


@pytest.mark.parametrize(
    "ulysses, ring, lengths",
    [
        (2, 1, [5, 1, 12, 14]),  # documents of a 32-token sample, as transformers' flash path takes them
        (1, 2, [5, 1, 12, 14]),
        (2, 1, [16, 16]),  # the boundary on the shard edge: each rank alone sees one document
    ],
)
def test_packed_documents_in_position_ids_equal_each_document_alone(distributed, ulysses, ring, lengths):
    from longloom.parallel.sharding import unshard_tensors

    results = distributed(ulysses * ring, _packed_worker, ulysses, ring, lengths)
    logits = unshard_tensors(results, 1, "zigzag" if ring > 1 else "contiguous")
    model, input_ids, start = _model(), _batch()[0], 0
    with torch.no_grad():
        for length in lengths:
            alone = model(input_ids=input_ids[:, start : start + length]).logits
            torch.testing.assert_close(logits[:, start : start + length], alone, rtol=0, atol=2e-5)
            start += length


def _ring_gathers_worker(lengths: list[int]) -> list[int]:
    from unittest import mock

    from longloom.parallel import ring_plan

    dims = ParallelDims.build(dp=1, ulysses=1, ring=2)
    model = _model(_config(num_hidden_layers=3)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_sequence_parallel(model, dims)
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(BATCH, -1)
    batch = shard_causal_lm_batch(_batch()[0], dims, position_ids=positions)
    gathers, gather = [], ring_plan.RingDocuments.gather

    def counted_gather(*args, **kwargs):
        gathers.append(1)
        return gather(*args, **kwargs)

    counts = []
    with mock.patch.object(ring_plan.RingDocuments, "gather", staticmethod(counted_gather)):
        for _ in range(2):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            logits.float().square().mean().backward()
            counts.append(len(gathers))
    return counts


def test_packed_documents_are_planned_once_per_forward_not_per_layer(distributed):
    """The input hook's DocumentPlans reach every layer: one gather of the ring's ids per forward for 3
    checkpointed layers (their forward, recomputation and backward), not one per layer and pass."""
    for counts in distributed(2, _ring_gathers_worker, [5, 1, 12, 14]):
        assert counts == [1, 2]
