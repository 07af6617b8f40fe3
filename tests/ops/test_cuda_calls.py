"""The Python side of fastmim._cuda, checked on CPU with a stand-in module: what each call hands the kernels."""

from __future__ import annotations

import gc

import pytest
import torch

from fastmim.ops import _cuda


def _alive(ptr: int) -> bool:
    """Whether a live tensor still owns memory at ``ptr`` (a temporary freed before the call would not)."""
    return any(isinstance(o, torch.Tensor) and o.numel() and o.data_ptr() == ptr for o in gc.get_objects())


class _RecordingCuda:
    """Stands in for fastmim._cuda's two loss entry points: records whether the mask the kernel would read is alive."""

    def __init__(self):
        self.mask_alive: list[bool] = []

    def _record(self, args):
        self.mask_alive.append(_alive(args[8]))  # _loss_args: mask pointer after pred's 5 and target's 2 + geometry

    def masked_loss_forward(self, *args):
        self._record(args)

    def masked_loss_backward(self, *args):
        self._record(args)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float32])
def test_loss_mask_converted_for_the_kernel_is_held_until_the_call(monkeypatch, mask_dtype):
    """A float64 mask is converted to float32 for the kernels; the converted tensor must outlive the launch. Freed
    before it (as it was: converted inside the argument helper), its memory could be reused or handed back before the
    kernel reads it under PYTORCH_NO_CUDA_MEMORY_CACHING=1 or the cudaMallocAsync allocator."""
    fake = _RecordingCuda()
    monkeypatch.setattr(_cuda, "_cu", fake)
    monkeypatch.setattr(_cuda, "_raw_stream", lambda index: 0)
    monkeypatch.setattr(_cuda, "_loss_blocks", lambda index: 1)
    pred, target = torch.randn(2, 4, 12), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 4) > 0.5).to(mask_dtype)
    geometry = (0,) * 8
    _cuda.masked_loss_forward(pred, target, mask, geometry, True, 1e-6, 2)
    _cuda.masked_loss_backward(torch.ones(()), pred, target, mask, torch.ones(()), geometry, True, 1e-6, 2)
    assert fake.mask_alive == [True, True]
