"""The activation-offload line of the first step: what went to host memory and what stayed on the GPU,
once the step measured it."""

from __future__ import annotations

import logging

from longloom.offload.activations import ActivationOffloader
from longloom.offload.memory import human_bytes

logger = logging.getLogger("longloom")


def activation_offload_line(offloader: ActivationOffloader) -> str:
    if not offloader.token_wise:
        recomputation = "attention recomputed in full (the model's attention keeps no outputs)"
    else:
        recomputed = max(0.0, 1.0 - offloader.share - offloader.device_share)
        last_layer = " (the last layer's for all)" if offloader.device_share == 0 else ""
        recomputation = (
            f"attention recomputed for the other {100 * recomputed:.0f}% of the tokens{last_layer}"
        )
    inputs = (
        f"the inputs of all layers but the first {offloader.device_layers} (kept in GPU memory: the host "
        "could not pin them all) and the last"
        if offloader.device_layers
        else "layer inputs"
    )
    return (
        f"activation offload: {human_bytes(offloader.swapped_bytes)} per step to host memory ({inputs} "
        f"and the attention outputs of {100 * offloader.share:.0f}% of the tokens), "
        f"{human_bytes(offloader.device_kept_bytes)} kept in GPU memory (the attention outputs of "
        f"{100 * offloader.device_share:.0f}% of the tokens, offload.device_activations), {recomputation}; "
        f"pool {human_bytes(offloader.pool.total_bytes)} in {offloader.pool.num_buffers} buffers, "
        f"{'page-locked' if offloader.pool.pin else 'allocated'} in {offloader.pool.allocation_seconds:.1f} s, "
        f"{offloader.pool.waited_seconds:.1f} s of it holding up the forward (the rest ahead, on the pool's thread)"
    )


def log_activation_offload(offloader: ActivationOffloader) -> None:
    logger.info("%s", activation_offload_line(offloader))
