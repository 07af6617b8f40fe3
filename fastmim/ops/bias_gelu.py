"""A transformer MLP's bias and GELU after its first matmul, as one op.

``bias_gelu(x, bias)`` = ``gelu(x + bias)`` (the exact, erf form of ``nn.GELU``), x = ``fc1``'s matmul without its
bias; fp32 arithmetic, x's dtype out (see ``bias_gelu_ref``). Forward: the same traffic as the GELU after a matmul
whose epilogue adds the bias (read x, write y). Backward: one pass reads dy and x and writes dx with the bias
gradient's partial sums, where the unfused ops write dx in GELU's backward and read it again for the bias gradient.
The bias gradient is summed in fp32 from the unrounded dx.

Backends: Triton (CUDA tensors; one launch forward, one backward plus the sum of the partials) and "torch", the same
formulas in fp32 (CPU tensors, dtypes the kernels do not take). Registered as ``torch.library.custom_op`` (fake
kernels, autograd), safe under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch

from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_shape,
    choose_backend,
    custom_op,
    eager_function,
    needs_autograd,
    no_autocast,
    no_second_derivative,
    stat_dtype,
    use_custom_op,
)
from fastmim.ops.reference import bias_gelu_ref

_OP = "bias_gelu"


def _triton_bias_gelu():
    from fastmim.ops.triton import bias_gelu

    return bias_gelu


def _backend(*tensors: torch.Tensor) -> str:
    return choose_backend(_OP, tensors[0].device, tuple(t.dtype for t in tensors))


def _fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [M, N] (contiguous from the public function; inductor may pass any layout), bias [N] -> [M, N] contiguous
    in x's dtype."""
    if _backend(x, bias) == "triton":
        return _triton_bias_gelu().bias_gelu_fwd(x.contiguous(), bias.contiguous())  # the kernels' layout
    with no_autocast(x.device):
        return bias_gelu_ref(x, bias).contiguous()


def _raw_check(x: torch.Tensor, bias: torch.Tensor) -> None:
    """The raw ops' shapes: x [M, N], bias [N]."""
    check_shape(_OP, "x", x, (None, None))
    check_shape(_OP, "bias", bias, (x.shape[1],))


_bias_gelu_op = custom_op("fastmim::bias_gelu", _fwd, _raw_check)


@_bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


def _bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, N] in x's dtype, dbias [N] in the statistics dtype, [0] when not needed)."""
    if _backend(dy, x, bias) == "triton":
        dx, db = _triton_bias_gelu().bias_gelu_bwd(dy.contiguous(), x.contiguous(), bias.contiguous(), need_b)
    else:
        stat = stat_dtype(x)
        with no_autocast(x.device):
            u = x.to(stat) + bias.to(stat)
            cdf = 0.5 * (1.0 + torch.erf(u * math.sqrt(0.5)))
            pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
            g = dy.to(stat) * (cdf + u * pdf)
            dx, db = g.to(x.dtype).contiguous(), (g.sum(0) if need_b else None)
    return dx, x.new_empty((0,), dtype=stat_dtype(x)) if db is None else db


def _raw_bwd_check(dy, x, bias, need_b) -> None:
    _raw_check(x, bias)
    check_shape("bias_gelu_backward", "dy", dy, tuple(x.shape))


_bias_gelu_backward_op = custom_op("fastmim::bias_gelu_backward", _bwd, _raw_bwd_check)
no_second_derivative(_bias_gelu_backward_op, "fastmim.ops.bias_gelu", "bias_gelu_ref")


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias, need_b):
    return x.new_empty(x.shape), x.new_empty((x.shape[1] if need_b else 0,), dtype=stat_dtype(x))


def _setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy, bwd=_bias_gelu_backward_op):
    x, bias = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad
    dx, db = bwd(dy, x, bias, need_b)
    return dx if need_x else None, db.to(bias.dtype) if need_b else None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup)

_BiasGelu = eager_function(
    "_BiasGelu", _fwd, _setup, lambda ctx, dy: _backward(ctx, dy, _bwd), graph_backward=_backward
)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` over the last dim (exact GELU, as ``nn.GELU()``), fp32 arithmetic, in x's dtype.

    Args:
        x: [..., N], a matmul's output without its bias (``F.linear(h, fc1.weight)``; bf16 under autocast).
        bias: [N] (``fc1.bias``; an fp32 parameter with bf16 x is fine: it is added in fp32).
    Returns: [..., N] in x's dtype. Gradients flow to x and bias (the bias's in its own dtype, summed in fp32).
    Under autocast the inputs are used as given (no casts).
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.bias_gelu_ref(x, bias)
    for name, t in (("x", x), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
        check_float(_OP, name, t)
    check_device(_OP, "bias", bias, x.device)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{_OP}: x must be [..., N] with N >= 1, got shape {tuple(x.shape)}")
    if tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"{_OP}: bias has shape {tuple(bias.shape)}, expected [N] = [{x.shape[-1]}]")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if use_custom_op():
        y = _bias_gelu_op(x2, bias)
    elif needs_autograd(x, bias):
        y = _BiasGelu.apply(x2, bias)
    else:
        y = _fwd(x2, bias)
    return y.view(shape)
