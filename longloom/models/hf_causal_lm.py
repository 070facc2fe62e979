"""A Hugging Face causal LM behind the call the trainer makes on longloom's own model.

    model = HFCausalLM(causal_lm, dims)        # installs SP attention (models/hf.py) when dims is given
    loss, stats = model(tokens, position_ids, labels=labels, loss_group=dist.group.WORLD)
    logits = model(tokens, position_ids)       # without labels

`tokens`, `position_ids` and the pre-shifted `labels` are this rank's share [B, S/P], cut by
`ParallelDims.shard_batch`, exactly as for models/llama.py's LlamaModel, and the loss is the same
token-weighted loss (parallel/loss.py) with the LM head fused in: the decoder (HF's base model) gives
the final normed hidden states and the head's weight goes straight into
`sequence_parallel_linear_cross_entropy`, so no [tokens, vocab] logits are made.

The HF model's `lm_head` is replaced by longloom's `LanguageModelHead` around the same weight
(`set_output_embeddings`, transformers' public hook): it returns logits like `nn.Linear` when called
without labels, so the HF model itself still works (generation, export), and computes the loss inside
its own forward, where DeepSpeed ZeRO-3 has gathered the weight. A head tied to the embedding stays tied.

The adapter registers the HF model's children under their own names, so parameter and state-dict names
are the HF ones ("model.layers.0...", "lm_head.weight"): checkpoints and HF export need no renaming.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel

from longloom.models.hf import decoder_layers, document_kwargs, enable_sequence_parallel, packed_document_ids
from longloom.models.llama import LanguageModelHead
from longloom.parallel.dims import ParallelDims
from longloom.parallel.loss import LossStats

# Output transforms an HF head applies to the logits that the fused loss (a plain linear head) would skip.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class HFCausalLM(nn.Module):
    """`causal_lm` (modified in place: longloom's head, and SP attention when `dims` is given) as LlamaModel's call.

    `causal_lm` stays reachable as `.causal_lm` (config, save_pretrained, generation) but is not a submodule.
    """

    def __init__(self, causal_lm: PreTrainedModel, dims: ParallelDims | None = None):
        super().__init__()
        _check_plain_head(causal_lm)
        decoder_name = causal_lm.base_model_prefix
        names = {name for name, _ in causal_lm.named_children()}
        if names != {decoder_name, "lm_head"}:
            raise ValueError(
                f"{type(causal_lm).__name__} has modules {sorted(names)}; longloom's HF adapter runs a decoder "
                f"({decoder_name!r}) and an 'lm_head' only: use a plain decoder-only causal LM"
            )
        old_head = causal_lm.get_output_embeddings()
        # Built on the meta device, then given the existing weight: nothing allocated, ZeRO-3 attributes kept.
        head = LanguageModelHead(old_head.in_features, old_head.out_features, bias=False, device="meta")
        head.weight = old_head.weight
        causal_lm.set_output_embeddings(head)
        if dims is not None:
            enable_sequence_parallel(causal_lm, dims)
        # The HF model's own children, under their own names (HF parameter names). The wrapper itself is
        # kept out of the module tree: registering it too would list every parameter twice.
        for name, child in causal_lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "causal_lm", causal_lm)
        self.decoder_name, self.dims = decoder_name, dims

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_group: dist.ProcessGroup | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
        """tokens, position_ids: [B, S_local] -> logits [B, S_local, vocab]; with labels, (loss_for_backward, stats).

        As LlamaModel.forward: labels pre-shifted, -100 ignored; the loss normalised over `loss_group`;
        `document_ids` [B, S_local] (packed documents, sharded with the tokens) keep attention inside each
        document, handed to SP attention through HF's attention kwargs.
        """
        extra = {}
        if document_ids is not None:
            if self.dims is None:
                raise ValueError(
                    "document_ids need longloom SP attention: build HFCausalLM with dims (ParallelDims)"
                )
            extra = document_kwargs(document_ids)
        elif self.dims is not None and packed_document_ids(position_ids, self.dims) is not None:
            # The trainer gives document ids exactly when the data asks for document masking
            # (data.document_masking); positions that restart without them would let SP attention run
            # across documents, as the HF model's own forward (models/hf.py's input hook) never does.
            raise ValueError(
                "position_ids restart at 0 inside a sample (packed documents) but no document_ids were given: "
                "SP attention would attend across the documents; pass their document_ids "
                "(data.document_masking: true), or use one document per sample"
            )
        decoder = getattr(self, self.decoder_name)
        hidden = decoder(
            input_ids=tokens, position_ids=position_ids, use_cache=False, **extra
        ).last_hidden_state
        return self.lm_head(hidden, labels=labels, loss_group=loss_group)

    def decoder_layers(self) -> list[nn.Module]:
        """The HF model's decoder layers (transformers' GradientCheckpointingLayer modules), in order."""
        return decoder_layers(self.causal_lm)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counted once); under ZeRO-3 the full sizes, not the partitions."""
        return sum(_numel(p) for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, as LlamaModel: 6 x matmul params + causal attention (Megatron convention).

        The LM head is a matmul even when tied to the embedding (whose lookup is not).
        """
        text = self.causal_lm.config.get_text_config()
        embedding = self.causal_lm.get_input_embeddings().weight
        matmul_params = self.num_parameters() - _numel(embedding)
        if self.lm_head.weight is embedding:
            matmul_params += _numel(embedding)  # the tied head, counted once in num_parameters
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        attention_width = text.num_attention_heads * head_dim
        attention = 6 * text.num_hidden_layers * attention_width * seq_len  # 12 * L * width * S / 2, causal
        return 6.0 * matmul_params + attention


def _numel(parameter: torch.Tensor) -> int:
    return parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()


def _check_plain_head(causal_lm: PreTrainedModel) -> None:
    if not isinstance(causal_lm, PreTrainedModel):
        raise TypeError(f"HFCausalLM needs a transformers PreTrainedModel, got {type(causal_lm).__name__}")
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(
            f"{type(causal_lm).__name__}.lm_head is {head!r}: the fused LM-head loss needs a linear head "
            "without bias"
        )
    text = causal_lm.config.get_text_config()
    transforms = {
        key: getattr(text, key)
        for key in LOGIT_TRANSFORM_KEYS
        if getattr(text, key, None) not in (None, 1, 1.0)
    }
    if transforms:
        raise ValueError(
            f"{type(causal_lm).__name__} transforms its logits ({transforms}), which the fused LM-head loss "
            "does not: use a model with a plain linear head"
        )
