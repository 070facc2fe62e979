"""Peak GPU memory of one training step: the fused LM-head loss and the tiled MLP must save what they claim.

The savings are stated as lower bounds from the tensors that no longer exist, not as measured figures:
- fused loss: the bf16 [tokens, vocab] logits (kept for backward on the logits path) never exist;
- tiled MLP: the [tokens, intermediate] gate / up activations of a layer's recompute exist for one tile.
Both runs must also give the same loss (bf16, one step from the same weights).
"""

import pytest
import torch
import torch.nn.functional as F

from longloom.config import load_config
from longloom.models.llama import LlamaModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOKENS, VOCAB, HIDDEN, INTERMEDIATE = 16384, 32000, 512, 4096


def step_peak(mlp_tiles: int | str, fused_loss: bool, vocab: int = VOCAB) -> tuple[int, float]:
    """(peak bytes above the model's own, loss) of forward + backward of a 2-layer bf16 model."""
    cfg = load_config(
        None,
        [f"model.vocab_size={vocab}", f"model.hidden={HIDDEN}", "model.layers=2", "model.heads=8",
         "model.kv_heads=4", f"model.intermediate={INTERMEDIATE}", f"model.mlp_tiles={mlp_tiles}"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(cfg.model)  # one device, no process group
    model = model.to(device="cuda", dtype=torch.bfloat16).train()
    tokens = torch.randint(0, vocab, (1, TOKENS + 1), device="cuda")
    positions = torch.arange(TOKENS, device="cuda").unsqueeze(0)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if fused_loss:
        loss, _ = model(tokens[:, :-1], positions, labels=tokens[:, 1:])
    else:
        logits = model(tokens[:, :-1], positions)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, loss.item()


def test_fused_loss_never_holds_the_logits():
    fused, fused_loss = step_peak(1, fused_loss=True)
    unfused, unfused_loss = step_peak(1, fused_loss=False)
    logits_bytes = TOKENS * VOCAB * 2
    assert fused <= unfused - logits_bytes, (fused / 2**20, unfused / 2**20)
    assert fused_loss == pytest.approx(unfused_loss, rel=2e-2)


def test_tiled_mlp_holds_one_tile_of_intermediates():
    # A small vocabulary: at 32K the fused loss's chunk of fp32 logits (and their gradient) outweighs
    # the MLP's intermediates and sets the peak on both sides.
    tiled, tiled_loss = step_peak("auto", fused_loss=True, vocab=512)
    untiled, untiled_loss = step_peak(1, fused_loss=True, vocab=512)
    gate_and_up_bytes = 2 * TOKENS * INTERMEDIATE * 2
    assert tiled <= untiled - gate_and_up_bytes, (tiled / 2**20, untiled / 2**20)
    assert tiled_loss == pytest.approx(untiled_loss, rel=2e-2)
