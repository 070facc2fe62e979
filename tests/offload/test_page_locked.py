"""runtime/page_locked.py on a machine without CUDA: which device a buffer is locked for, and the refusal.
Locking itself, copies and release: tests/gpu/test_page_locked_cuda.py."""

import pytest
import torch

from longloom.runtime import page_locked


def test_device_index_of_every_form(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert page_locked.device_index(1) == 1
    assert page_locked.device_index(torch.device("cuda", 2)) == 2
    assert page_locked.device_index(torch.device("cuda")) == 3  # the pool's device without an index
    assert page_locked.device_index(None) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_without_cuda_it_says_why():
    with pytest.raises(RuntimeError, match="registers host memory with CUDA, and CUDA is not available"):
        page_locked.page_locked_empty(1 << 20)
    with pytest.raises(ValueError, match="nbytes must be positive, got 0"):
        page_locked.page_locked_empty(0)
