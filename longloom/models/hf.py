"""Sequence parallelism for Hugging Face transformers models, through transformers' public hooks.

Idea: HF decoders call attention through `transformers.AttentionInterface`, and everything else in
them (embeddings, norms, MLPs, lm_head) works token by token. Registering an attention function that
runs longloom's Ulysses x TokenRing attention (parallel/two_d.py) on this rank's share of the
sequence therefore makes an unmodified HF model sequence-parallel, once RoPE sees global positions.

    enable_sequence_parallel(model, dims)                       # once, after ParallelDims.build
    batch = shard_causal_lm_batch(input_ids, dims)              # the full batch, same on the SP group
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss, stats = causal_lm_loss(logits, batch["shift_labels"], dims)
    loss.backward()                                             # then average grads over dp x sp

Supported: causal self-attention, over the whole sample or per packed document; right padding is
turned into ignored labels. Packed documents are given as transformers' flash-attention path takes
them: `position_ids` that restart at 0 where a document starts (cut by `shard_causal_lm_batch` from
the full sample's positions). A forward pre-hook turns them into document ids (token index minus
position: the index where each token's document starts, which never decreases) and hands them to
SP attention through HF's keyword arguments, with one `DocumentPlans` per forward
(attention/document_plans.py) so that every layer shares what attention derives from them. What SP
attention cannot reproduce raises ValueError instead of training on a silently different model:
padding masks, sliding windows shorter than the sequence, chunked or non-attention layers, attention
dropout, softcap, sinks, non-causal models, and KV caches (generation).
"""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.distributed as dist
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from longloom.attention.document_plans import DocumentPlans
from longloom.parallel.dims import ParallelDims
from longloom.parallel.loss import IGNORE_INDEX, LossStats, sequence_parallel_cross_entropy
from longloom.parallel.sharding import shard_tensor
from longloom.parallel.two_d import sequence_parallel_attention
from longloom.parallel.ulysses import kv_head_replication

# Keyword arguments through which HF models ask their attention function for math SP does not do.
UNSUPPORTED_ATTENTION_KWARGS = (
    "softcap",
    "s_aux",
    "sinks",
    "position_bias",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
)
# The keyword arguments through which the input hook passes packed-document ids down to attention,
# and the forward's plan cache that comes with them (`document_kwargs`).
DOCUMENT_IDS_KWARG = "longloom_document_ids"
DOCUMENT_PLANS_KWARG = "longloom_document_plans"
# Layer kinds that reach attention through AttentionInterface. Others (chunked attention, whose mask
# HF drops for custom implementations; linear attention or SSM layers, which would only see the
# local share of the sequence) would silently compute something else.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

ATTENTION_NAME_PREFIX = "longloom_sp_"
# transformers' registry is process-global and keyed by name: one fresh name per call keeps models
# enabled with different `dims` (or re-enabled) from rebinding each other's groups.
_registration_ids = itertools.count()


def enable_sequence_parallel(model: PreTrainedModel, dims: ParallelDims) -> str:
    """Makes `model` run its attention sequence-parallel over `dims`; returns the implementation name.

    The model then expects this rank's share of each sequence, with global `position_ids`, as made
    by `shard_causal_lm_batch`; a forward pre-hook checks its inputs. This changes `model.config`
    (another model built from the same config object switches too);
    `model.set_attn_implementation("sdpa")` switches back.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"enable_sequence_parallel needs a transformers PreTrainedModel, got {type(model).__name__}"
        )
    config = model.config.get_text_config()
    if not getattr(config, "is_causal", True):
        raise ValueError(
            f"{type(model).__name__} has config.is_causal=False (bidirectional attention): longloom's HF "
            "integration covers causal language models only"
        )
    layer_types = set(getattr(config, "layer_types", None) or ())
    if not layer_types <= set(SUPPORTED_LAYER_TYPES):
        raise ValueError(
            f"{type(model).__name__} has layer types {sorted(layer_types - set(SUPPORTED_LAYER_TYPES))} that "
            f"sequence parallelism cannot split (supported: {SUPPORTED_LAYER_TYPES}): use another model"
        )
    heads = getattr(config, "num_attention_heads", None)
    if heads is not None:  # fail before the first step, with the config keys to change
        kv_head_replication(heads, getattr(config, "num_key_value_heads", None) or heads, dims.ulysses)

    name = f"{ATTENTION_NAME_PREFIX}{next(_registration_ids)}"
    # dims travel in a closure, not in the forward kwargs: HF would pass `model(..., dims=dims)` down to
    # attention, but then every call site (trainer, eval, checkpointed recompute) must remember it, and
    # the model would not carry its own groups. No module-global "current dims" either (STYLE.md).
    AttentionInterface.register(name, _attention_function(dims))
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers.AttentionInterface "
            f"(its attention implementation stayed {model.config._attn_implementation!r}): it cannot use longloom SP"
        )
    # HF builds no mask for a custom implementation: it drops padding masks and position-id document
    # boundaries without a word. Checking the inputs once per forward turns that into an error.
    model.register_forward_pre_hook(
        _input_check(inspect.signature(model.forward), dims, name), with_kwargs=True
    )
    return name


def uses_sequence_parallel_attention(model: PreTrainedModel) -> bool:
    """Whether `enable_sequence_parallel` set `model`'s attention (and that it is still in place)."""
    return model.config._attn_implementation.startswith(ATTENTION_NAME_PREFIX)


def _attention_function(dims: ParallelDims):
    def longloom_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """HF's attention-function contract: q [B, Hq, S/P, D], k/v [B, Hkv, S/P, D] -> ([B, S/P, Hq, D], None)."""
        _check_attention_call(module, query, key, attention_mask, dropout, kwargs, dims)
        out = sequence_parallel_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            dims=dims,
            causal=True,
            softmax_scale=scaling,
            # From the layer call of activation offload (models/hf_offload.py), through HF's kwargs.
            attention_outputs=kwargs.get("attention_outputs"),
            # From the input hook (packed documents in position_ids), through HF's kwargs.
            document_ids=kwargs.get(DOCUMENT_IDS_KWARG),
            document_plans=kwargs.get(DOCUMENT_PLANS_KWARG),
        )
        return out, None  # no attention weights: the full S x S matrix never exists anywhere

    return longloom_attention


def _check_attention_call(module, query, key, attention_mask, dropout, kwargs, dims: ParallelDims) -> None:
    where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if attention_mask is not None:
        raise ValueError(
            f"{where} got an attention mask of shape {tuple(attention_mask.shape)}: longloom SP attention is "
            "plain causal; drop attention_mask (shard_causal_lm_batch turns right padding into ignored labels)"
        )
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError(f"{where} is not causal: longloom's HF integration covers causal attention only")
    if dropout > 0:
        raise ValueError(
            f"{where} asks for attention dropout {dropout} in training: SP attention has none; "
            "set config.attention_dropout=0"
        )
    sequence = query.size(2) * dims.sp
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and window < sequence:
        raise ValueError(
            f"{where} has a sliding window of {window} tokens, shorter than the sequence ({sequence} tokens): "
            "SP attention is full causal; use sequences of at most the window or a full-attention model"
        )
    unsupported = [name for name in UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"{where} asks for {unsupported}, which longloom SP attention does not implement")
    if key.size(2) != query.size(2):
        raise ValueError(
            f"{where}: {key.size(2)} keys for {query.size(2)} queries (a KV cache): SP is for training; "
            "call the model with use_cache=False and no past_key_values"
        )


def _input_check(signature: inspect.Signature, dims: ParallelDims, name: str):
    def check(model: PreTrainedModel, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # A later enable (or set_attn_implementation) leaves this hook behind: it then does nothing.
        if model.config._attn_implementation != name:
            return
        inputs = signature.bind_partial(*args, **kwargs).arguments
        mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
        if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
            raise ValueError(
                f"attention_mask of shape {tuple(mask.shape)} masks tokens out: longloom SP attention is plain "
                "causal; drop it (shard_causal_lm_batch turns right padding into ignored labels)"
            )
        if positions is None:
            if dims.sp > 1:
                raise ValueError(
                    f"no position_ids with the sequence split over {dims.sp} ranks: HF would number this rank's "
                    "tokens from 0; pass position_ids from shard_causal_lm_batch"
                )
            return
        # The local positions are this rank's share of consecutive ones (up to an offset per row) for one
        # document per sample; positions that restart at 0 mark packed documents.
        document_ids = packed_document_ids(positions, dims)
        if document_ids is None:
            return None
        return args, {**kwargs, **document_kwargs(document_ids)}

    return check


def document_kwargs(document_ids: torch.Tensor) -> dict:
    """The HF forward kwargs that carry one forward's document ids to SP attention: the ids and a fresh
    plan cache for them (one per forward, shared by its layers, recomputation and backward)."""
    return {DOCUMENT_IDS_KWARG: document_ids, DOCUMENT_PLANS_KWARG: DocumentPlans()}


def packed_document_ids(positions: torch.Tensor, dims: ParallelDims) -> torch.Tensor | None:
    """Document ids [B, S/P] from this rank's share of position ids; None if every row is one document.

    The one derivation of packed documents from positions: the input hook passes them to SP attention,
    and HFCausalLM refuses packed positions that come without the trainer's document ids.

    A token's id is its index in the full sample minus its position: the index where its document
    starts. Whether a row holds several documents is decided over the whole SP group (one tiny
    all-reduce): a boundary on a shard edge leaves each rank's own ids constant, and every rank must
    take the same path (the document path gathers ids). Raises ValueError where positions neither
    continue (+1) nor restart at 0.
    """
    positions = positions if positions.dim() == 2 else positions.view(1, -1)
    local = positions.size(-1)
    index = shard_tensor(
        torch.arange(local * dims.sp, device=positions.device), 0, dims.sp_rank, dims.sp, dims.layout
    )
    document_ids = index - positions
    spread = torch.stack((document_ids.amax(-1), -document_ids.amin(-1)))  # [2, B]: max and -min id
    if dims.sp > 1:
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=dims.sp_group)
    if bool((spread[0] == -spread[1]).all()):
        return None
    # Consecutive tokens continue (+1) or restart at 0; zigzag's second chunk is far from its first.
    restarts = document_ids[:, 1:] != document_ids[:, :-1]
    chunk_starts = torch.zeros_like(restarts)
    if dims.layout == "zigzag":
        chunk_starts[:, local // 2 - 1] = True  # the second chunk is far from the first: no rule there
    bad = restarts & ~chunk_starts & (positions[:, 1:] != 0)
    if bool(bad.any()):
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"position_ids go from {int(positions[row, column])} to {int(positions[row, column + 1])} at local "
            f"position {column + 1} of row {row}: within a sample, positions must count up by 1 and restart at "
            "0 where a packed document starts; cut them with shard_causal_lm_batch from the full positions"
        )
    return document_ids


def shard_causal_lm_batch(
    input_ids: torch.Tensor,
    dims: ParallelDims,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's share of a full causal-LM batch: {"input_ids", "position_ids", "shift_labels"} [B, S/P].

    `input_ids` [B, S] (same on every rank of the SP group); `labels` as given to HF's
    `model(labels=...)`: unshifted, IGNORE_INDEX (-100) ignored, default `input_ids`. They are shifted
    here, before cutting, because the label of a shard's last token is another rank's first token.
    `attention_mask` [B, S] may only mark right padding: padded tokens get ignored labels and the mask
    is dropped (under a causal mask no real token sees a later pad, so the logits that count are exact).
    Do not pass `shift_labels` as `labels` to the model: HF would shift them again.
    `position_ids` [B, S] (packed documents): positions that restart at 0 where each document starts,
    as for transformers' flash-attention path; attention then stays inside each document.
    Default: 0 .. S-1 (one document per sample).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got {tuple(input_ids.shape)}")
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} disagree")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} disagree"
            )
        kept = attention_mask.bool()
        if not bool((kept[:, 1:] <= kept[:, :-1]).all()):
            raise ValueError(
                "attention_mask is not right padding (a masked token before a kept one: left padding or "
                "holes): longloom SP attention cannot mask; pad on the right (tokenizer padding_side='right')"
            )
        labels = labels.masked_fill(~kept, IGNORE_INDEX)
    shift_labels = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)), dim=1)
    positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    if position_ids is not None:
        if position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} and input_ids {tuple(input_ids.shape)} disagree"
            )
        positions = position_ids
    return dims.shard_batch({"input_ids": input_ids, "position_ids": positions, "shift_labels": shift_labels})


def causal_lm_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, dims: ParallelDims
) -> tuple[torch.Tensor, LossStats]:
    """(loss_for_backward, stats) from this rank's logits [B, S/P, V] and `shift_labels` [B, S/P].

    Token-weighted over the whole dp x sp world (parallel/loss.py): `stats.loss` is the mean over every
    valid label of every rank, the loss one device would compute on the whole batch. Backward, then
    AVERAGE gradients over all dims.world_size ranks (DeepSpeed, or DDP over the default group).
    """
    group = dist.group.WORLD if dims.world_size > 1 else None
    return sequence_parallel_cross_entropy(logits, shift_labels, group=group)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """`model`'s decoder layers in order: transformers' GradientCheckpointingLayer modules."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
