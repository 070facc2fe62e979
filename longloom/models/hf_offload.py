"""Activation offload for Hugging Face transformers models, through their checkpointing hook.

HF decoder layers (`transformers.modeling_layers.GradientCheckpointingLayer`) checkpoint themselves by
calling their `_gradient_checkpointing_func(partial(forward, layer, **kwargs), *args)`, the hidden
states first; the class documents assigning that function. Assigning longloom's
`ActivationOffloader.checkpoint` there moves each layer's input to pinned host memory as in longloom's
own model (offload/activations.py), the last layer excepted.

With longloom SP attention enabled first (`enable_sequence_parallel`, models/hf.py) the offloader
also passes `attention_outputs=` to each layer; HF hands its keyword arguments down to the attention
function, which then keeps the attention output of `share` of the tokens (host memory) and of
`device_share` more (GPU memory) and recomputes attention for the others only (attention/tokenwise.py).
With another attention implementation the layers only swap their input and are recomputed in full
(a device share, which would keep nothing there, is refused).

    enable_sequence_parallel(model, dims)                   # optional, first
    offloader = enable_activation_offload(model, share=1.0, device=device)
    model.train()                                           # HF checkpoints in training mode only
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import PreTrainedModel

from longloom.models.hf import decoder_layers, uses_sequence_parallel_attention
from longloom.offload.activations import ActivationOffloader


def enable_activation_offload(
    model: PreTrainedModel,
    share: float,
    device: torch.device | str,
    device_share: float = 0.0,
    device_layers: int = 0,
) -> ActivationOffloader:
    """Checkpoints every decoder layer of `model` through an ActivationOffloader; returns it.

    share: as `offload.activations`, the share of tokens whose attention output is swapped (0, 1].
    device_share: as `offload.device_activations`, the share whose attention output stays in GPU memory.
    device_layers: the run plan's first layers whose input stays in GPU memory (training/plan.py).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no transformers GradientCheckpointingLayer decoder layers: activation "
            "offload plugs into their checkpointing; use a model whose layers derive from it"
        )
    token_wise = uses_sequence_parallel_attention(model)
    if device_share > 0 and not token_wise:
        raise ValueError(
            f"offload.device_activations={device_share} keeps attention outputs of longloom's SP attention, "
            f"which {type(model).__name__} does not use: call enable_sequence_parallel(model, dims) first, "
            "or set offload.device_activations=0"
        )
    offloader = ActivationOffloader(
        share,
        torch.device(device),
        token_wise=token_wise,
        device_share=device_share,
        device_layers=device_layers,
        layer_kinds=["S"] * len(layers),  # decoder layers of one architecture: the same sizes each
    )
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = partial(offloader.checkpoint, is_last_layer=index == last)
        layer.gradient_checkpointing = True
    return offloader
