"""The host's lead over the GPU: at a layer's start it waits for the mark made `max_layers_ahead` layers
earlier, before any other hook of the layer (ZeRO-3's gathers), in forward and in recomputation."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longloom.training.run_ahead import MAX_LAYERS_AHEAD, RunAheadLimit, limit_run_ahead


class FakeMark:
    """A point on a fake GPU timeline; `log` records, in order, marks made and marks waited for."""

    made = 0

    def __init__(self, log: list[str]):
        FakeMark.made += 1
        self.name, self.log = f"m{FakeMark.made}", log
        log.append(f"make {self.name}")

    def synchronize(self) -> None:
        self.log.append(f"wait {self.name}")


@pytest.fixture
def log() -> list[str]:
    FakeMark.made = 0
    return []


def test_each_layer_waits_for_the_mark_two_layers_back(log):
    limit = RunAheadLimit(lambda: FakeMark(log), max_layers_ahead=2)
    for _ in range(4):
        limit.layer_starting()
    assert log == ["make m1", "make m2", "make m3", "wait m1", "make m4", "wait m2"]
    assert MAX_LAYERS_AHEAD == 2


def test_the_hook_runs_before_hooks_registered_earlier_and_later_and_again_in_recomputation(log):
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: log.append(f"gather {index}"))
    limit = RunAheadLimit(lambda: FakeMark(log), max_layers_ahead=1)
    for layer in layers:
        layer.register_forward_pre_hook(limit._hook, prepend=True)
        layer.register_forward_pre_hook(lambda module, args: log.append("later hook"))
    hidden = torch.randn(2, 4, requires_grad=True)
    for layer in layers:
        hidden = checkpoint(layer, hidden, use_reentrant=False)
    assert log == [
        "make m1", "gather 0", "later hook",
        "make m2", "wait m1", "gather 1", "later hook",
        "make m3", "wait m2", "gather 2", "later hook",
    ]  # fmt: skip
    log.clear()
    hidden.sum().backward()  # recomputation runs the layers' forward hooks again, last layer first
    assert log == [
        "make m4", "wait m3", "gather 2", "later hook",
        "make m5", "wait m4", "gather 1", "later hook",
        "make m6", "wait m5", "gather 0", "later hook",
    ]  # fmt: skip


def test_nothing_to_bound_off_cuda_and_a_lead_below_one_is_refused():
    layer = nn.Linear(2, 2)
    assert limit_run_ahead([layer], torch.device("cpu")) is None
    assert not layer._forward_pre_hooks
    with pytest.raises(ValueError, match="max_layers_ahead must be at least 1"):
        RunAheadLimit(lambda: None, max_layers_ahead=0)
