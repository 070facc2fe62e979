"""Llama-style decoder (RMSNorm, RoPE from position ids, SwiGLU, GQA) with per-layer attention kind.

`model.layer_pattern` picks each layer's token mixer: "S" softmax attention (sequence-parallel via
parallel/two_d.py: Ulysses, TokenRing or both) or "L" linear attention (LASP-2, parallel/lasp2.py)
as in Lightning Attention / the Linear-Llama3 of the LASP-2 paper: SiLU feature map on q and k, a
fixed per-head decay, an RMS norm on the output and a SiLU output gate. "LLLS" gives a LASP-2H hybrid.

The model sees only this rank's share of the sequence: `tokens` and `position_ids` are
[B, S_local] cut by `ParallelDims.shard_batch`, and RoPE uses the global positions, so the result
equals the unsharded model. Activation checkpointing wraps each layer through `checkpoint_fn`
(offload/activations.py swaps in one that moves the saved inputs to host memory and passes the layer
`attention_outputs`, for token-wise attention recomputation).

Long-sequence memory (ALST, "Arctic Long Sequence Training", 2025): the MLP runs over tiles of tokens
(models/tiled_mlp.py, `model.mlp_tiles`; the trainer passes the run plan's resolved count as
`mlp_tiles`, training/plan.py), and training calls `model(tokens, positions, labels=...)`,
which fuses the LM head into the loss so that the [tokens, vocab] logits never exist at once.

Packed documents: `document_ids` [B, S_local] (sharded with the tokens; data/packing.py makes them)
go to every attention layer, softmax and linear, so that no token sees another document
(parallel/two_d.py, parallel/lasp2.py); None keeps plain causal attention over the whole sample.
Each forward makes one `DocumentPlans` (attention/document_plans.py) that rides along with the ids,
so what attention derives from them (checks, gathers, ring and ragged segment plans) is made once
for all layers, their checkpoint recomputation and their backward, not once per layer and pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longloom.attention.blocks import document_attention
from longloom.attention.document_plans import DocumentPlans
from longloom.attention.local import sdpa_attention
from longloom.attention.tokenwise import AttentionOutputs, LocalCausalSchedule, tokenwise_attention
from longloom.config import ModelConfig
from longloom.models.tiled_mlp import resolve_mlp_tiles, tiled_mlp
from longloom.parallel.dims import ParallelDims
from longloom.parallel.lasp2 import lasp2_linear_attention
from longloom.parallel.loss import LossStats, sequence_parallel_linear_cross_entropy
from longloom.parallel.two_d import sequence_parallel_attention

# checkpoint_fn(layer, hidden, cos, sin[, document_ids, document_plans], is_last_layer=...) -> hidden
CheckpointFn = Callable[..., torch.Tensor]


def plain_checkpoint(layer: nn.Module, *inputs: torch.Tensor, is_last_layer: bool = False) -> torch.Tensor:
    return checkpoint(layer, *inputs, use_reentrant=False)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as [B, S, 1, head_dim/2] in fp32 from (global) position ids [B, S]."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # [B, S, D/2]
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (first half, second half) of the head dimension, as in Llama / HF."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims | None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden, bias=False)
        self.dims = dims

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        document_plans: DocumentPlans | None = None,
        attention_outputs: AttentionOutputs | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim)
        # attention_outputs: token-wise recomputation under activation offload (attention/tokenwise.py).
        if self.dims is not None:
            out = sequence_parallel_attention(
                q,
                k,
                v,
                dims=self.dims,
                causal=True,
                attention_outputs=attention_outputs,
                document_ids=document_ids,
                document_plans=document_plans,
            )
        elif attention_outputs is not None:
            schedule = LocalCausalSchedule(document_ids=document_ids, document_plans=document_plans)
            out = tokenwise_attention(q, k, v, attention_outputs, schedule)
        elif document_ids is not None:
            out = document_attention(q, k, v, document_ids, causal=True, document_plans=document_plans)
        else:
            out = sdpa_attention(q, k, v, causal=True)
        return self.o_proj(out.reshape(b, s, self.heads * self.head_dim))


def retention_decays(heads: int) -> torch.Tensor:
    """Per-head decay 1 - 2^(-5 - h * 8 / H): memories from ~32 to ~8K tokens (RetNet / Lightning)."""
    return 1.0 - torch.pow(2.0, -5.0 - torch.arange(heads, dtype=torch.float64) * 8.0 / max(heads, 1))


class LinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims | None):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = self.heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, inner, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden, inner, bias=False)
        self.out_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(inner, cfg.hidden, bias=False)
        # Kept out of the module's buffers: a bf16 cast of the model would round 1 - 2^-13 to 1.0
        # and silently switch off the decay of the slow heads. Made per device, in fp32, on first use.
        self.decay_values = retention_decays(self.heads).tolist() if cfg.linear_decay else None
        self._decay_by_device: dict[torch.device, torch.Tensor] = {}
        self.dims = dims

    def decay(self, device: torch.device) -> torch.Tensor | None:
        if self.decay_values is None:
            return None
        if device not in self._decay_by_device:
            self._decay_by_device[device] = torch.tensor(
                self.decay_values, dtype=torch.float32, device=device
            )
        return self._decay_by_device[device]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        document_plans: DocumentPlans | None = None,
        attention_outputs: AttentionOutputs | None = None,
    ) -> torch.Tensor:
        # attention_outputs: softmax attention's token-wise recomputation; a linear-attention layer is
        # recomputed in full (its chunked state pass is linear in tokens, like the projections).
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)
        # SiLU keeps q.k >= -small without normalising by a running sum; the output norm fixes the scale.
        q = F.silu(self.q_proj(x).view(shape)) * self.head_dim**-0.5
        k = F.silu(self.k_proj(x).view(shape))
        v = self.v_proj(x).view(shape)
        group = self.dims.sp_group if self.dims is not None and self.dims.sp > 1 else None
        layout = self.dims.layout if self.dims is not None else "contiguous"
        out = lasp2_linear_attention(
            q,
            k,
            v,
            group=group,
            decay=self.decay(x.device),
            layout=layout,
            document_ids=document_ids,
            document_plans=document_plans,
        )
        out = self.out_norm(out) * F.silu(self.gate_proj(x).view(shape))
        return self.o_proj(out.reshape(b, s, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), over `model.mlp_tiles` tiles of tokens (models/tiled_mlp.py)."""

    def __init__(self, hidden: int, width: int, tiles: int | str = 1):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.hidden, self.tiles = hidden, tiles

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = resolve_mlp_tiles(self.tiles, x.numel() // self.hidden, self.hidden)
        return tiled_mlp(self.swiglu, self, x, tiles)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, kind: str, dims: ParallelDims | None, mlp_tiles: int | str | None = None
    ):
        super().__init__()
        self.kind = kind
        self.input_layernorm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.self_attn = SoftmaxAttention(cfg, dims) if kind == "S" else LinearAttention(cfg, dims)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp_width, cfg.mlp_tiles if mlp_tiles is None else mlp_tiles)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        document_plans: DocumentPlans | None = None,
        attention_outputs: AttentionOutputs | None = None,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            self.input_layernorm(hidden),
            cos,
            sin,
            document_ids=document_ids,
            document_plans=document_plans,
            attention_outputs=attention_outputs,
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LanguageModelHead(nn.Linear):
    """The output projection; given labels it returns the fused token-weighted loss instead of logits.

    The loss is computed inside this module's own forward so that DeepSpeed ZeRO-3, which gathers a
    module's parameters in its forward / backward hooks, has the full weight there.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
        if labels is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise ValueError("the fused LM-head loss supports a head without bias (lm_head bias=False)")
        return sequence_parallel_linear_cross_entropy(hidden, self.weight, labels, group=loss_group)


class LlamaModel(nn.Module):
    """mlp_tiles: the MLP's token tiles as the run plan resolved them (training/plan.py); None keeps
    `cfg.mlp_tiles` ("auto" is then resolved per call from the tokens seen: evaluation at other lengths)."""

    def __init__(
        self,
        cfg: ModelConfig,
        dims: ParallelDims | None = None,
        checkpoint_fn: CheckpointFn | None = None,
        mlp_tiles: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind, dims, mlp_tiles) for kind in cfg.layer_kinds())
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head = LanguageModelHead(cfg.hidden, cfg.vocab_size, bias=False)
        self.checkpoint_fn = checkpoint_fn or plain_checkpoint
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_group: dist.ProcessGroup | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
        """tokens, position_ids: [B, S_local] -> logits [B, S_local, vocab].

        With labels [B, S_local] (pre-shifted, -100 ignored): `(loss_for_backward, stats)` of
        parallel/loss.py's token-weighted loss normalised over `loss_group` (None = this rank alone),
        with the LM head fused into the loss so that no [B, S_local, vocab] logits are made.
        `document_ids` [B, S_local] (packed documents, sharded like the tokens): attention stays within
        each document in every layer.
        """
        hidden = self.embed_tokens(tokens)
        cos, sin = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        # Documents ride along as a layer input (so checkpointing replays with them), with this call's
        # plan cache (one per call: micro batches with other ids never share plans); None adds nothing.
        inputs = (cos, sin) if document_ids is None else (cos, sin, document_ids, DocumentPlans())
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                hidden = self.checkpoint_fn(layer, hidden, *inputs, is_last_layer=index == last)
            else:
                hidden = layer(hidden, *inputs)
        return self.lm_head(self.norm(hidden), labels=labels, loss_group=loss_group)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + causal attention (Megatron convention)."""
        matmul_params = self.num_parameters() - self.embed_tokens.weight.numel()
        softmax_layers = sum(1 for layer in self.layers if layer.kind == "S")
        linear_layers = len(self.layers) - softmax_layers
        attention = 6 * softmax_layers * self.cfg.hidden * seq_len  # 12 * L * h * S / 2 for causal
        linear = 12 * linear_layers * self.cfg.hidden * self.cfg.head_dim  # state update + readout
        return 6.0 * matmul_params + attention + linear
