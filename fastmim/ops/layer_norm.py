"""The residual add of a pre-norm transformer block fused with the LayerNorm after it, as one op (and, with the
same kernels, a LayerNorm that writes its output in the next matmul's dtype: ``layer_norm``).

``add_layer_norm(x, residual, weight, bias, eps, out_dtype)`` returns ``(y, s)``: ``s = x + residual`` (the residual
stream, in the inputs' promoted dtype) and ``y = LayerNorm(s) * weight + bias`` with fp32 statistics, written
directly in ``out_dtype`` (default: the autocast dtype when autocast is on, the dtype the next matmul casts to; else
s's dtype). See ``add_layer_norm_ref``. A ViT block ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` becomes
``y, x = add_layer_norm(attn_out, x, norm2.weight, norm2.bias, norm2.eps)`` and so on across blocks: one read of
each input and one write of each output where the unfused ops read s back and write y twice (LayerNorm's fp32
output, then its cast).

Backends: Triton (CUDA tensors; one launch forward, one backward plus the sum of the weight and bias gradients'
per-program partials) and "torch" (CPU tensors, dtypes the kernels do not take): the add rounded as the kernel rounds
it, then ATen's own LayerNorm forward and backward in fp32 (float64 for float64), so F.layer_norm's precision.
Registered as ``torch.library.custom_op`` (fake kernels, autograd), safe under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

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
    is_finite_number,
    needs_autograd,
    no_autocast,
    no_second_derivative,
    stat_dtype,
    unaliased,
    use_custom_op,
)
from fastmim.ops.reference import default_norm_dtype

_OP = "add_layer_norm"


def _triton_ln():
    from fastmim.ops.triton import layer_norm

    return layer_norm


def _s_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _fwd_torch(x, residual, weight, bias, eps, out_dtype):
    s_dtype = _s_dtype(x, residual)
    with no_autocast(x.device):
        s = x if residual is None else x.to(s_dtype) + residual.to(s_dtype)
        sf = s.to(stat_dtype(s))
        if sf.shape[0] == 0:  # no rows
            return s.new_empty(s.shape, dtype=out_dtype), s, sf.new_empty((0,)), sf.new_empty((0,))
        # ATen's own LayerNorm kernel and its statistics (torch.var_mean over the last dim was 15x slower on CPU)
        y, mean, rstd = torch.native_layer_norm(sf, (sf.shape[1],), weight.to(sf.dtype), bias.to(sf.dtype), eps)
        return y.to(out_dtype), s, mean.view(-1), rstd.view(-1)  # statistics in fp32 (float64 for float64 inputs)


def _bwd_torch(dy, ds, s, weight, mean, rstd, x_dtype, r_dtype, need_w, need_b):
    stat = stat_dtype(s)
    with no_autocast(s.device):
        m, c = s.shape
        # ATen's LayerNorm backward on the fp32 rows (the statistics as its forward gives them, [M, 1]); its bias
        # argument only says that there is one (its values are not read): the weight stands in for it
        w = weight.to(stat)
        d, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy.to(stat), s.to(stat), (c,), mean.to(stat).view(m, 1), rstd.to(stat).view(m, 1), w, w,
            (True, need_w, need_b),
        )  # fmt: skip
        if ds is not None:
            d = d + ds.to(stat)
        dr = d.to(r_dtype)
        dx = dr if x_dtype == r_dtype else d.to(x_dtype)
    return dr, dx, dw if need_w else None, db if need_b else None


def _backend(*tensors: torch.Tensor, name: str = _OP) -> str:
    """add_layer_norm's backend (layer_norm runs its kernels: ``name`` is only what an error calls the op)."""
    return choose_backend(_OP, tensors[0].device, tuple(t.dtype for t in tensors), name=name)


def _fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # x, residual [M, C] contiguous (the public function reshapes); -> y, s, mean [M], rstd [M]. Without a residual
    # (layer_norm) s would be x itself: [0, C] is returned instead (a custom op's outputs may not alias its inputs)
    tensors = (x, weight, bias) if residual is None else (x, residual, weight, bias)
    if _backend(*tensors, name=_OP if residual is not None else "layer_norm") == "triton":
        x, weight, bias = (t.contiguous() for t in (x, weight, bias))  # the kernels' layout
        residual = None if residual is None else residual.contiguous()
        y, s, mean, rstd = _triton_ln().add_layer_norm_fwd(x, residual, weight, bias, eps, _s_dtype(x, residual),
                                                            out_dtype)  # fmt: skip
    else:
        y, s, mean, rstd = _fwd_torch(x, residual, weight, bias, eps, out_dtype)
    if residual is None:
        s = x.new_empty((0, x.shape[1]))
    return y, s, mean, rstd


def _raw_check(x, residual, weight, bias, eps, out_dtype) -> None:
    """The raw op's shapes: x and residual [M, C], weight and bias [C]."""
    check_shape(_OP, "x", x, (None, None))
    check_shape(_OP, "residual", residual, tuple(x.shape))
    _check_inputs(x, x if residual is None else residual, weight, bias, eps)


_add_ln_op = custom_op("fastmim::add_layer_norm", _fwd, _raw_check)


@_add_ln_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    m, c = x.shape
    s_dtype = _s_dtype(x, residual)
    stats = x.new_empty((m,), dtype=torch.promote_types(s_dtype, torch.float32))
    s = x.new_empty((m if residual is not None else 0, c), dtype=s_dtype)
    return x.new_empty((m, c), dtype=out_dtype), s, stats, torch.empty_like(stats)


def _bwd(
    dy: torch.Tensor,
    ds: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_ds: bool,
    x_dtype: torch.dtype,
    r_dtype: torch.dtype,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_residual [M, C], d_x [M, C] or [0, C] when it is d_residual's dtype (then d_residual serves both),
    d_weight [C] and d_bias [C] in the statistics dtype or [0]): a custom op returns no None (and, through
    ``unaliased``, no aliases)."""
    ds_ = ds if has_ds else None
    if _backend(dy, s, weight) == "triton":
        # upstream gradients may be expanded (a .sum() gives stride 0): the kernels read contiguous rows
        dy, s, weight = dy.contiguous(), s.contiguous(), weight.contiguous()
        mean, rstd = mean.contiguous(), rstd.contiguous()  # read as [M] runs (a raw call may pass expanded ones)
        ds_ = None if ds_ is None else ds_.contiguous()
        dr, dx, dw, db = _triton_ln().add_layer_norm_bwd(dy, ds_, s, weight, mean, rstd, x_dtype, r_dtype, need_w,
                                                         need_b)  # fmt: skip
    else:
        dr, dx, dw, db = _bwd_torch(dy, ds_, s, weight, mean, rstd, x_dtype, r_dtype, need_w, need_b)
    dx = s.new_empty((0, s.shape[1]), dtype=x_dtype) if dx is dr else dx
    dw = s.new_empty((0,), dtype=stat_dtype(s)) if dw is None else dw
    db = s.new_empty((0,), dtype=stat_dtype(s)) if db is None else db
    return dr, dx, dw, db


def _raw_bwd_check(dy, ds, s, weight, mean, rstd, has_ds, x_dtype, r_dtype, need_w, need_b) -> None:
    """The kernels read [M, C] rows of dy, ds and s and [M] statistics: a smaller tensor would be overrun."""
    op = "add_layer_norm_backward"
    check_shape(op, "s", s, (None, None))
    for name, t, shape in (("dy", dy, s.shape), ("ds", ds if has_ds else None, s.shape), ("weight", weight,
                           s.shape[1:]), ("mean", mean, s.shape[:1]), ("rstd", rstd, s.shape[:1])):  # fmt: skip
        check_shape(op, name, t, tuple(shape))


# the Triton backend's d_weight and d_bias are rows of one [2, C] sum: cloned apart for the custom op only
_add_ln_backward_op = custom_op("fastmim::add_layer_norm_backward", unaliased(_bwd), _raw_bwd_check)
no_second_derivative(
    _add_ln_backward_op, "fastmim.ops.add_layer_norm (and layer_norm)", "add_layer_norm_ref (layer_norm_ref)"
)


@_add_ln_backward_op.register_fake
def _(dy, ds, s, weight, mean, rstd, has_ds, x_dtype, r_dtype, need_w, need_b):
    m, c = s.shape
    dx = s.new_empty((m, c) if x_dtype != r_dtype else (0, c), dtype=x_dtype)
    stat = stat_dtype(s)
    return (s.new_empty((m, c), dtype=r_dtype), dx, s.new_empty((c if need_w else 0,), dtype=stat),
            s.new_empty((c if need_b else 0,), dtype=stat))  # fmt: skip


def _setup(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)  # the normalised rows
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # s unused elsewhere (a final norm): no zero gradient to read
    ctx.dtypes = (x.dtype, x.dtype if residual is None else residual.dtype, weight.dtype, bias.dtype)
    ctx.has_res = residual is not None  # without one, s is an empty stand-in: a gradient into it carries nothing


def _backward(ctx, dy, ds, _dmean=None, _drstd=None, bwd=_add_ln_backward_op):
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    if not ctx.has_res:
        ds = None
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if dy is None:  # only s was used: the add's gradient
        if ds is None:
            return None, None, None, None, None, None
        return ds.to(x_dtype) if need_x else None, ds.to(r_dtype) if need_r else None, None, None, None, None
    has_ds = ds is not None
    dr, dx, dw, db = bwd(dy, ds if has_ds else dy, s, weight, mean, rstd, has_ds, x_dtype, r_dtype, need_w, need_b)
    if dx.shape[0] == 0 and dr.shape[0] != 0:
        dx = dr
    return (
        dx if need_x else None,
        dr if need_r else None,
        dw.to(w_dtype) if need_w else None,
        db.to(b_dtype) if need_b else None,
        None,
        None,
    )


_add_ln_op.register_autograd(_backward, setup_context=_setup)

_AddLayerNorm = eager_function(
    "_AddLayerNorm", _fwd, _setup, lambda ctx, *g: _backward(ctx, *g, bwd=_bwd), graph_backward=_backward
)


def _check_inputs(x, residual, weight, bias, eps, op: str = _OP) -> None:
    named = [("x", x), ("residual", residual), ("weight", weight), ("bias", bias)]
    for name, t in named if op == _OP else named[:1] + named[2:]:  # layer_norm: no residual
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        check_float(op, name, t)
        check_device(op, name, t, x.device)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., C] with C >= 1, got shape {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}; they must match")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (c,):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [C] = [{c}] (C: the last "
                             f"dimension of x, whose shape is {tuple(x.shape)}: the norm is over it)")  # fmt: skip
    if not (is_finite_number(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")


def _check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype must be a floating-point torch.dtype (torch.bfloat16, torch.float32, ...) "
                        f"or None, got {out_dtype!r}")  # fmt: skip


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``y = LayerNorm(s)`` (over the last dim, fp32 statistics) in one pass; returns (y, s).

    Args:
        x: [..., C], a block branch's output (e.g. bf16 under autocast).
        residual: the residual stream, x's shape (e.g. fp32).
        weight, bias: [C], the LayerNorm's affine parameters (fp32 parameters with bf16 inputs are fine).
        eps: added to the variance.
        out_dtype: y's dtype; default the autocast dtype when autocast is on for x's device, else s's dtype.
    Returns: y [..., C] in out_dtype, s [..., C] in the promoted dtype of x and residual. Gradients flow to x,
    residual, weight and bias (each in its own dtype) from both outputs. Under autocast the inputs are used as given.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.add_layer_norm_ref(x, residual, weight, bias, eps, out_dtype)
    _check_inputs(x, residual, weight, bias, eps)
    _check_out_dtype(_OP, out_dtype)
    shape, c = x.shape, x.shape[-1]
    out_dtype = out_dtype or default_norm_dtype(x, residual)
    x2, r2 = x.reshape(-1, c).contiguous(), residual.reshape(-1, c).contiguous()
    eps = float(eps)
    if use_custom_op():
        y, s, _, _ = _add_ln_op(x2, r2, weight, bias, eps, out_dtype)
    elif needs_autograd(x, residual, weight, bias):
        y, s, _, _ = _AddLayerNorm.apply(x2, r2, weight, bias, eps, out_dtype)
    else:
        y, s, _, _ = _fwd(x2, r2, weight, bias, eps, out_dtype)
    return y.view(shape), s.view(shape)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``LayerNorm(x) * weight + bias`` over the last dim with fp32 statistics, written directly in ``out_dtype``: the
    ``add_layer_norm`` kernels without the add (see ``layer_norm_ref``). Under autocast F.layer_norm casts a bf16
    input to fp32, writes fp32 and the next matmul casts back (three passes, three launches, and as many again
    backward); this reads bf16 and writes bf16 once.

    Args:
        x: [..., C] (bf16 under autocast, or any float dtype).
        weight, bias: [C] (fp32 parameters with bf16 inputs are fine).
        eps: added to the variance.
        out_dtype: the output's dtype; default the autocast dtype when autocast is on for x's device, else x's dtype.
    Returns: [..., C] in out_dtype. Gradients flow to x, weight and bias (each in its own dtype).
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.layer_norm_ref(x, weight, bias, eps, out_dtype)
    op = "layer_norm"
    _check_inputs(x, None, weight, bias, eps, op)
    _check_out_dtype(op, out_dtype)
    shape, c = x.shape, x.shape[-1]
    out_dtype = out_dtype or default_norm_dtype(x, x)
    x2 = x.reshape(-1, c).contiguous()
    eps = float(eps)
    if use_custom_op():
        y = _add_ln_op(x2, None, weight, bias, eps, out_dtype)[0]
    elif needs_autograd(x, weight, bias):
        y = _AddLayerNorm.apply(x2, None, weight, bias, eps, out_dtype)[0]
    else:
        y = _fwd(x2, None, weight, bias, eps, out_dtype)[0]
    return y.view(shape)
