"""Global Response Norm (ConvNeXt V2's GRN) of each sample's rows as one fused op.

``grn(x, weight, bias, eps)`` on x [B, N, C]: per sample b and channel c, ``gx = ||x[b, :, c]||_2``,
``nx = gx / (mean_c gx[b] + eps)``, ``out = x * (1 + weight * nx) + bias`` (see ``grn_ref``). FCMAE's sparse
ConvNeXt V2 calls it on each sample's visible pixels; a dense [B, H, W, C] map is ``x.view(B, H * W, C)``.

Backends: Triton (CUDA tensors; two launches forward, three backward, the [B, C] statistics inside the kernels) and
"torch", a few fused PyTorch ops with a closed-form backward (CPU tensors, dtypes the kernels do not take). There is
no C++ kernel: where the C++ backend would be chosen (or is forced) the torch backend runs. Statistics and arithmetic
are fp32 (float64 for float64 input) and the result is rounded once to x's dtype. Registered as
``torch.library.custom_op`` (fake kernels, autograd), so it runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_shape,
    checked,
    choose_backend,
    eager_function,
    is_finite_number,
    no_autocast,
    no_second_derivative,
    stat_dtype,
    use_custom_op,
)

_OP = "grn"


def _triton_grn():
    from fastmim.ops.triton import grn

    return grn


def _norms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gx [B, 1, C] and d = mean_c gx + eps [B, 1, 1], in the statistics dtype."""
    gx = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True, dtype=stat_dtype(x))
    return gx, gx.mean(dim=-1, keepdim=True) + eps


def _fwd_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * (1 + weight * nx) + bias`` with the per-(sample, channel) scale an fp32 [B, 1, C]: one pass for the norm,
    one fused multiply-add (in fp32: addcmul promotes) and the cast."""
    stat = stat_dtype(x)
    with no_autocast(x.device):
        gx, d = _norms(x, eps)
        scale = torch.addcmul(torch.ones_like(gx), weight.to(stat), gx / d)  # [B, 1, C]
        # (contiguous, as the Triton kernel's and the fake's: addcmul would follow a strided x's layout)
        return torch.addcmul(bias.to(stat), x, scale).to(x.dtype).contiguous()


def _bwd_torch(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, need_x: bool, need_w: bool, need_b: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The closed-form gradients (autograd is off inside a custom op): with P = sum_n grad * x, dweight = sum_b nx * P,
    dbias = sum grad, dnx = weight * P, dgx = dnx / d - sum_c(dnx * gx) / (C d^2) and
    dx = grad * (1 + weight * nx) + x * dgx / gx, the last term zero where gx = 0 (vector_norm's subgradient)."""
    stat = stat_dtype(x)
    dx = dw = db = None
    with no_autocast(x.device):
        if need_b:
            db = grad.sum(dim=(0, 1), dtype=stat)
        if not (need_x or need_w):
            return dx, dw, db
        gx, d = _norms(x, eps)
        nx = gx / d  # [B, 1, C]
        p = (grad.to(stat) * x).sum(dim=1, keepdim=True)  # [B, 1, C]
        if need_w:
            dw = (p * nx).sum(dim=(0, 1))
        if need_x:
            w = weight.to(stat)
            dnx = w * p
            dgx = dnx / d - (dnx * gx).sum(dim=-1, keepdim=True) / (gx.shape[-1] * d * d)
            t = torch.where(gx > 0, dgx / torch.where(gx > 0, gx, 1.0), 0.0)  # [B, 1, C]
            scale = torch.addcmul(torch.ones_like(nx), w, nx)
            dx = torch.addcmul(grad * scale, x, t).to(x.dtype).contiguous()
    return dx, dw, db


def _backend(*tensors: torch.Tensor) -> str:
    return choose_backend(_OP, tensors[0].device, tuple(t.dtype for t in tensors))


def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    if _backend(x, weight, bias) == "triton":
        return _triton_grn().grn_fwd(x, weight, bias, eps)
    return _fwd_torch(x, weight, bias, eps)


def _raw_check(x, weight, bias=None, eps=0.0) -> None:
    """The raw ops' shapes: x [B, N, C], weight and bias [C]."""
    check_shape(_OP, "x", x, (None, None, None))
    check_shape(_OP, "weight", weight, (x.shape[2],))
    check_shape(_OP, "bias", bias, (x.shape[2],))


def _raw_bwd_check(grad, x, weight, eps, need_x, need_w, need_b) -> None:
    _raw_check(x, weight)
    check_shape("grn_backward", "grad", grad, tuple(x.shape))


_grn_op = torch.library.custom_op("fastmim::grn", checked(_fwd, _raw_check), mutates_args=())


@_grn_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_x [B, N, C] (x's dtype; [0, 0, C] if not needed), grad_weight [C] and grad_bias [C] in the statistics
    dtype (fp32, or float64 for float64 x; [0] if not needed)."""
    if _backend(grad, x, weight) == "triton":
        dx, dw, db = _triton_grn().grn_bwd(grad, x, weight, eps, need_x, need_w, need_b)
    else:
        dx, dw, db = _bwd_torch(grad, x, weight, eps, need_x, need_w, need_b)
    if dx is None:
        dx = x.new_empty((0, 0, x.shape[2]))
    # (each its own empty tensor: a custom op's outputs may not alias each other, which torch.compile checks)
    dw = x.new_empty((0,), dtype=stat_dtype(x)) if dw is None else dw
    db = x.new_empty((0,), dtype=stat_dtype(x)) if db is None else db
    return dx, dw, db


_grn_backward_op = torch.library.custom_op("fastmim::grn_backward", checked(_bwd, _raw_bwd_check), mutates_args=())
no_second_derivative(_grn_backward_op, "fastmim.ops.grn", "grn_ref")


@_grn_backward_op.register_fake
def _(grad, x, weight, eps, need_x, need_w, need_b):
    b, n, c = x.shape
    stat = stat_dtype(x)
    dx = x.new_empty((b, n, c) if need_x else (0, 0, c))
    return dx, x.new_empty((c if need_w else 0,), dtype=stat), x.new_empty((c if need_b else 0,), dtype=stat)


def _setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype


def _backward(ctx, grad, bwd=_grn_backward_op):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, _ = ctx.needs_input_grad
    dx, dw, db = bwd(grad, x, weight, ctx.eps, need_x, need_w, need_b)
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None,
    )


_grn_op.register_autograd(_backward, setup_context=_setup)


_Grn = eager_function("_Grn", _fwd, _setup, lambda ctx, grad: _backward(ctx, grad, _bwd), graph_backward=_backward)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
    if x.dim() != 3:
        raise ValueError(f"{_OP}: x must be [B, N, C] (N rows per sample), got shape {tuple(x.shape)}")
    check_float(_OP, "x", x)
    c = x.shape[2]
    if c == 0:
        raise ValueError(f"{_OP}: x has no channels (shape {tuple(x.shape)}): the mean norm over C is undefined")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
        check_float(_OP, name, t)
        if tuple(t.shape) != (c,):
            raise ValueError(f"{_OP}: {name} has shape {tuple(t.shape)}, expected [C] = [{c}]")
        check_device(_OP, name, t, x.device)
    if not (is_finite_number(eps) and eps >= 0):
        raise ValueError(f"{_OP}: eps must be a finite float >= 0, got {eps!r}")


def grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global Response Norm of each sample's rows: ``out = x * (1 + weight * nx) + bias`` with
    ``nx = gx / (mean_c gx + eps)`` and ``gx[b, c] = ||x[b, :, c]||_2`` (see ``grn_ref``).

    Args:
        x: [B, N, C], N rows per sample (float32, bfloat16 or float16 for the fused kernels; other float dtypes run
            the torch backend). Any strides.
        weight: [C] (timm's ``grn.weight``, the paper's gamma); fp32 parameters with bf16 x are fine.
        bias: [C].
        eps: added to the mean norm.
    Returns: [B, N, C] in x's dtype, statistics and arithmetic in fp32, one rounding. Gradients flow to x, weight and
    bias, each in its own dtype; a channel that is zero in a sample gets vector_norm's zero subgradient (finite).
    Under autocast the inputs are used as given (no casts).
    """
    _check_inputs(x, weight, bias, eps)  # (shapes first: the reference would normalise a [N, C] x over C)
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.grn_ref(x, weight, bias, eps)
    eps = float(eps)
    if use_custom_op():
        return _grn_op(x, weight, bias, eps)
    return _Grn.apply(x, weight, bias, eps)
