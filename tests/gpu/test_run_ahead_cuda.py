"""On a GPU the host stays at most two layers ahead: when it has issued the last of N slow layers, the
GPU has finished all but the last three (without the bound it has finished none)."""

import pytest
import torch
from torch import nn

from longloom.training.run_ahead import limit_run_ahead

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LAYERS, SLEEP_CYCLES = 8, 50_000_000  # ~25 ms of GPU time per layer at ~2 GHz


class SlowLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.done = torch.cuda.Event()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(SLEEP_CYCLES)
        self.done.record()
        return hidden + 1


@pytest.mark.parametrize("bounded", [True, False])
def test_host_lead_is_bounded(bounded):
    layers = [SlowLayer() for _ in range(LAYERS)]
    limit = limit_run_ahead(layers, torch.device("cuda")) if bounded else None
    hidden = torch.zeros(4, device="cuda")
    torch.cuda.synchronize()
    for layer in layers:
        hidden = layer(hidden)
    finished = [layer.done.query() for layer in layers]
    torch.cuda.synchronize()
    assert hidden.tolist() == [LAYERS] * 4
    if bounded:
        assert limit is not None and limit.max_layers_ahead == 2
        # Issuing layer i waited for the start of layer i - 2, so layers up to LAYERS - 4 are done.
        assert all(finished[: LAYERS - 3]), finished
    else:
        assert not any(finished), finished
