"""Shared checks for op tests: run an op and its reference on the same inputs, compare values and every gradient."""

from __future__ import annotations

import torch

from tests.ops.conftest import assert_lowp_close


def forward_backward(fn, inputs: list, grad_out: torch.Tensor | None = None, seed: int = 0):
    """(output, upstream gradient, gradients of every input that requires grad) for fn(*inputs)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)
    out.backward(grad_out)
    grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return out.detach(), grad_out, grads


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """assert_close with ``atol`` relative to the reference's largest magnitude (loss gradients are ~1e-5)."""
    scale = b.detach().abs().max().item() if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def check_against_reference(op, ref, inputs: list, what: str, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """Values and every gradient of ``op`` against ``ref``; low-precision inputs by the 2x-PyTorch-error rule.

    fp32: |op - ref| <= atol * max|ref| + rtol * |ref| for the value and each gradient."""
    out, grad_out, grads = forward_backward(op, inputs)
    lowp = any(isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) for t in inputs)
    if not lowp:
        ref_out, _, ref_grads = forward_backward(ref, inputs, grad_out)
        _assert_close(out, ref_out, rtol, atol, f"{what} value")
        for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
            _assert_close(a, b, rtol, atol, f"{what} grad {i}")
        return
    # gold: the reference in fp32 on the same (rounded) values; PyTorch's own error: the reference in low precision
    up = [t.double().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    gold, _, gold_grads = forward_backward(ref, up, grad_out.float())
    torch_out, _, torch_grads = forward_backward(ref, inputs, grad_out)
    assert out.dtype == torch_out.dtype, f"{what}: output dtype {out.dtype}, the reference gives {torch_out.dtype}"
    assert_lowp_close(out, torch_out, gold, f"{what} value", atol=1e-5 * gold.abs().max().item())
    for i, (a, t, g) in enumerate(zip(grads, torch_grads, gold_grads, strict=True)):
        assert a.dtype == t.dtype, f"{what} grad {i}: dtype {a.dtype}, the reference gives {t.dtype}"
        assert_lowp_close(a, t, g, f"{what} grad {i}", atol=1e-5 * g.abs().max().item())


def compile_backend(device: torch.device, name: str) -> str:
    """Inductor where it compiles real code quickly enough for a test (CUDA, and the C++ backend once on CPU);
    aot_eager elsewhere, which still traces the fake kernels and the autograd formulas."""
    return "inductor" if name == "cpp" or device.type == "cuda" else "aot_eager"
