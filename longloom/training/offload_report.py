"""The activation-offload line of the first step: what went to host memory, once the step measured it."""

from __future__ import annotations

import logging

from longloom.offload.activations import ActivationOffloader
from longloom.offload.memory import human_bytes

logger = logging.getLogger("longloom")


def log_activation_offload(offloader: ActivationOffloader) -> None:
    logger.info(
        "activation offload: %s per step to host memory (layer inputs and the attention outputs "
        "of %.0f%% of the tokens), pool %s in %d buffers",
        human_bytes(offloader.swapped_bytes),
        100 * offloader.share,
        human_bytes(offloader.pool.total_bytes),
        offloader.pool.num_buffers,
    )
