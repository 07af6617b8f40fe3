"""Fixtures for fastmim.ops: every backend that can run here, and the low-precision tolerance rule."""

from __future__ import annotations

import os

import pytest
import torch

from fastmim import _ext
from fastmim.ops._dispatch import NO_CPP_KERNEL, NO_CUDA_KERNEL, triton_available

CPU_ONLY = "the C++ backend is CPU-only"
CUDA_ONLY = "the CUDA backend runs CUDA tensors only"


def _skip_reason(device: str, name: str) -> str | None:
    if name == "cpp":
        if device != "cpu":
            return CPU_ONLY
        return None if _ext.available() else f"fastmim._C not built ({_ext.load_error})"
    if name == "cuda":
        if device != "cuda":
            return CUDA_ONLY
        return None if _ext.cuda_available() else f"fastmim._cuda not built ({_ext.cuda_load_error})"
    if name == "triton":
        why = triton_available()
        if why is None and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            why = "TRITON_INTERPRET=1 is not set, so Triton cannot run CPU tensors"
        return why
    return None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    pytest.param(
        (d, name),
        id=f"{d}-{name}",
        marks=[pytest.mark.skipif(why is not None, reason=str(why))] + ([pytest.mark.gpu] if d == "cuda" else []),
    )
    for d in DEVICES
    for name in ("torch", "cpp", "triton", "cuda")
    if (why := _skip_reason(d, name)) not in (CPU_ONLY, CUDA_ONLY)
]


@pytest.fixture(params=CASES)
def backend(request, monkeypatch):
    """(device, backend name) with FASTMIM_BACKEND forcing that backend for the test. A test module whose op has no
    C++ kernel (its ``OP`` in ``NO_CPP_KERNEL``) skips "cpp": forced, it runs the "torch" backend, tested as such."""
    device, name = request.param
    op = getattr(request.module, "OP", None)
    if name == "cpp" and op in NO_CPP_KERNEL:
        pytest.skip(f"{op} has no C++ kernel: FASTMIM_BACKEND=cpp runs its torch backend, tested as 'torch'")
    if name == "cuda" and op in NO_CUDA_KERNEL:
        pytest.skip(f"{op} has no CUDA kernel: FASTMIM_BACKEND=cuda runs its Triton backend, tested as 'triton'")
    monkeypatch.setenv("FASTMIM_BACKEND", name)
    return torch.device(device), name


def assert_lowp_close(out: torch.Tensor, torch_out: torch.Tensor, gold: torch.Tensor, what: str, atol: float = 1e-6):
    """flash-attention's rule: the kernel's error against an fp32 ``gold`` is at most 2x PyTorch's own same-dtype
    error (``torch_out``), plus ``atol`` for outputs both compute exactly."""
    err = (out.double() - gold.double()).abs().max().item()
    torch_err = (torch_out.double() - gold.double()).abs().max().item()
    assert err <= 2 * torch_err + atol, f"{what}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {atol:g}"
