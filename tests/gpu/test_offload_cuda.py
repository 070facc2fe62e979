"""Activation offload on a GPU: side streams, pinned pool and token-wise attention give plain
checkpointing's results, and only one layer's tensors stay on the device between forward and backward.

fp32 runs attention through the exact math path, so the comparison there is tight and tests the stream
ordering (a copy read before it landed would show up as a wrong gradient). bf16 runs the fused cuDNN /
flash kernels: its error against an fp32 reference must stay within twice plain checkpointing's.
"""

import gc

import pytest
import torch

from longloom.config import load_config
from longloom.models.llama import LlamaModel, plain_checkpoint
from longloom.offload.activations import ActivationOffloader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LAYERS, TOKENS, HIDDEN = 4, 2048, 256


def requested_bytes() -> int:
    """Bytes of live tensors as requested: memory_allocated counts the caching allocator's blocks, which
    round a 1.5 MiB tensor up to 2 MiB (a large-pool block is not split below 1 MiB)."""
    return torch.cuda.memory_stats()["requested_bytes.all.current"]


def run_steps(share: float, dtype: torch.dtype, steps: int = 2, device_share: float = 0.0):
    """Per step (loss, gradients, bytes held between forward and backward, attention outputs kept on
    the device)."""
    cfg = load_config(
        None,
        ["model.vocab_size=512", f"model.hidden={HIDDEN}", f"model.layers={LAYERS}", "model.heads=4",
         "model.kv_heads=2", "model.intermediate=512"],
    )  # fmt: skip
    offloader = (
        ActivationOffloader(share, torch.device("cuda"), device_share=device_share) if share > 0 else None
    )
    torch.manual_seed(0)
    model = LlamaModel(cfg.model, checkpoint_fn=offloader.checkpoint if offloader else plain_checkpoint)
    model = model.to(device="cuda", dtype=dtype).train()
    results = []
    for step in range(steps):
        generator = torch.Generator(device="cuda").manual_seed(step)
        tokens = torch.randint(0, 512, (1, TOKENS + 1), device="cuda", generator=generator)
        positions = torch.arange(TOKENS, device="cuda").unsqueeze(0)
        model.zero_grad(set_to_none=True)
        gc.collect()  # garbage of earlier tests (a failure's traceback) freed mid-forward would skew `held`
        torch.cuda.synchronize()
        before = requested_bytes()
        loss, _ = model(tokens[:, :-1], positions, labels=tokens[:, 1:])
        torch.cuda.synchronize()
        held = requested_bytes() - before
        loss.backward()
        grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
        results.append((loss.item(), grads, held, offloader.device_kept_bytes if offloader else 0))
    return results


@pytest.mark.parametrize("share,device_share", [(1.0, 0.0), (0.5, 0.0), (0.25, 0.75)])
def test_fp32_offload_equals_plain_checkpointing(share, device_share):
    plain = run_steps(0.0, torch.float32)
    offloaded = run_steps(share, torch.float32, device_share=device_share)
    for (want_loss, want_grads, held_plain, _), (got_loss, got_grads, held, on_device) in zip(
        plain, offloaded
    ):
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
        layer_input = TOKENS * HIDDEN * 4
        # Plain checkpointing holds every layer input; offload holds the last layer's input only, and
        # the attention outputs kept on the device (copies of their tokens: not the whole outputs).
        assert held_plain >= LAYERS * layer_input
        assert (on_device > 0) == (device_share > 0)
        # (Slack for the allocator's rounding of the small tensors.)
        assert held <= held_plain - (LAYERS - 1) * layer_input + layer_input // 4 + on_device


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_bf16_offload_error_within_twice_plain(share):
    reference = run_steps(0.0, torch.float32, steps=1)[0][1]
    plain = run_steps(0.0, torch.bfloat16, steps=1)[0][1]
    offloaded = run_steps(share, torch.bfloat16, steps=1)[0][1]
    for name, want in reference.items():
        plain_error = (plain[name] - want).norm()
        offload_error = (offloaded[name] - want).norm()
        assert offload_error <= 2 * plain_error + 1e-6 * want.norm(), name


def test_hugging_face_model_offload_equals_plain_on_cuda():
    """The HF path (models/hf_offload.py) on the GPU's streams: fp32, inputs swapped, same gradients."""
    transformers = pytest.importorskip("transformers")
    from longloom.models.hf_offload import enable_activation_offload

    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=TOKENS,
    )  # fmt: skip
    tokens = torch.randint(
        0, 512, (1, TOKENS), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to("cuda").train()
        if offload:
            offloader = enable_activation_offload(model, 1.0, "cuda")
        else:
            model.gradient_checkpointing_enable()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (want_loss, want_grads), (got_loss, got_grads) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert offloader.swapped_bytes == (LAYERS - 1) * TOKENS * HIDDEN * 4, "inputs of all layers but the last"


def backward_peak(lag_cycles: int, layers: int = 12, tokens: int = 8192) -> tuple[int, int, torch.Tensor]:
    """(peak bytes reserved during backward, bytes the prefetch stream reserves after it, a gradient):
    fp32, every layer's input and attention output swapped. `lag_cycles` of a sleep kernel queued on the
    compute stream first make the GPU lag while the host runs the whole backward ahead of it."""
    cfg = load_config(
        None,
        ["model.vocab_size=512", f"model.hidden={HIDDEN}", f"model.layers={layers}", "model.heads=4",
         "model.kv_heads=2", "model.intermediate=512"],
    )  # fmt: skip
    offloader = ActivationOffloader(1.0, torch.device("cuda"))
    torch.manual_seed(0)
    model = LlamaModel(cfg.model, checkpoint_fn=offloader.checkpoint).to("cuda").train()
    ids = torch.randint(
        0, 512, (1, tokens + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    positions = torch.arange(tokens, device="cuda").unsqueeze(0)
    loss, _ = model(ids[:, :-1], positions, labels=ids[:, 1:])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # reserved = what is allocated now: backward's growth is what it reserves
    torch.cuda.reset_peak_memory_stats()
    if lag_cycles:
        torch.cuda._sleep(lag_cycles)
    loss.backward()
    torch.cuda.synchronize()
    prefetch = offloader.prefetch_stream.cuda_stream
    reserved = sum(s["total_size"] for s in torch.cuda.memory_snapshot() if int(s["stream"]) == prefetch)
    return torch.cuda.max_memory_reserved(), reserved, model.layers[0].mlp.down_proj.weight.grad.clone()


def test_prefetched_activations_live_on_the_compute_stream_however_far_the_host_runs_ahead():
    """The tensors a prefetch copies into come from the compute stream's pool and are reused in program
    order: with the GPU held back (the host enqueues every layer's backward, and its prefetches, first)
    the memory backward reserves grows by less than four layer inputs (allocator segments of 20 MiB), and the
    prefetch stream reserves nothing. From the prefetch stream's own pool a freed block came back only
    once the GPU had passed its free (record_stream), so each prefetch reserved a new block until the GPU
    caught up (session 14: a side stream held 30 GiB, none in use, at 384K tokens)."""
    peak, reserved, gradient = backward_peak(lag_cycles=0)
    lagged_peak, lagged_reserved, lagged_gradient = backward_peak(lag_cycles=2_000_000_000)  # ~1 s
    layer_input = 8192 * HIDDEN * 4  # 8 MiB; held back, the 11 swapped layers would reserve ~88 MiB more
    assert reserved == 0 and lagged_reserved == 0
    assert lagged_peak - peak < 4 * layer_input, (peak, lagged_peak)
    torch.testing.assert_close(lagged_gradient, gradient, rtol=0, atol=0)  # same stream order, same sums


def test_a_prefetch_never_loaded_gives_its_buffer_back_after_its_copy():
    """A backward that stops between a prefetch and its load: dropping the HostCopy returns its pinned
    buffer (through the finalizer that first makes the compute stream wait for the copy)."""
    import gc

    from longloom.offload.activations import HostCopy

    offloader = ActivationOffloader(1.0, torch.device("cuda"))
    source = torch.randn(1 << 20, device="cuda")
    stored = offloader._store(source, on_device=False)
    offloader._release_copied(keep=[])
    offloader._prefetch(stored)
    assert isinstance(stored, HostCopy) and stored.prefetch.tensor is not None
    in_use = offloader.pool.bytes_in_use
    del stored
    gc.collect()
    assert offloader.pool.bytes_in_use == in_use - (1 << 22)  # 4 MiB of fp32: one granule-rounded buffer
