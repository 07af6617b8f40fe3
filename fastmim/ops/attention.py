"""Multi-head self-attention for short sequences (MAE's encoder and decoder) from the packed qkv a ViT makes.

``attention(qkv, scale)``: qkv [B, N, 3, H, hd] (``qkv_proj(x).reshape(B, N, 3, H, hd)``) -> [B, N, H, hd], the
output projection's input after a free reshape. The kernels read q, k and v through their strides and write the
output (and, backward, the packed gradient) in the layout the neighbouring matmuls use, so the permutes and copies
around ``scaled_dot_product_attention`` disappear. See ``attention_ref``.

Backends: Triton (CUDA tensors: flash-attention forward with the log-sum-exp saved, a deterministic two-kernel
backward) and "torch" (the same formulas on fp32 matrices: CPU tensors, other dtypes). Registered as
``torch.library.custom_op`` (fake kernels, autograd), safe under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
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
    use_custom_op,
)

_OP = "attention"
_LOG2E = 1.4426950408889634


def _triton_attn():
    from fastmim.ops.triton import attention

    return attention


def _fwd_torch(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _, h, d = qkv.shape
    with no_autocast(qkv.device):
        q, k, v = qkv.to(stat_dtype(qkv)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd], fp32 (f64 for f64)
        s = (q @ k.transpose(-2, -1)) * scale
        lse = torch.logsumexp(s, dim=-1)  # [B, H, N]
        out = torch.exp(s - lse[..., None]) @ v
        return out.transpose(1, 2).to(qkv.dtype).contiguous(), (lse * _LOG2E).reshape(b * h, n)


def _bwd_torch(grad, qkv, out, lse, scale) -> torch.Tensor:
    b, n, _, h, d = qkv.shape
    with no_autocast(qkv.device):
        stat = stat_dtype(qkv)
        q, k, v = qkv.to(stat).permute(2, 0, 3, 1, 4).unbind(0)
        do = grad.to(stat).transpose(1, 2)  # [B, H, N, hd]
        p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # recomputed whole: N is short
        delta = (do * out.to(stat).transpose(1, 2)).sum(-1, keepdim=True)
        dv = p.transpose(-2, -1) @ do
        ds = p * (do @ v.transpose(-2, -1) - delta)
        dq, dk = (ds @ k) * scale, (ds.transpose(-2, -1) @ q) * scale
        return torch.stack((dq, dk, dv), dim=2).transpose(1, 3).to(qkv.dtype).contiguous()  # [B, N, 3, H, hd]


def _backend(*tensors: torch.Tensor) -> str:
    return choose_backend(_OP, tensors[0].device, tuple(t.dtype for t in tensors))


def _fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend(qkv) == "triton":
        return _triton_attn().attention_fwd(qkv, scale)
    return _fwd_torch(qkv, scale)


def _raw_check(qkv: torch.Tensor, scale: float) -> None:
    check_shape(_OP, "qkv", qkv, (None, None, 3, None, None))


def _raw_bwd_check(grad, qkv, out, lse, scale) -> None:
    """grad and out [B, N, H, hd], lse [B * H, N] for qkv [B, N, 3, H, hd]."""
    _raw_check(qkv, scale)
    b, n, _, h, d = qkv.shape
    op = "attention_backward"
    check_shape(op, "grad", grad, (b, n, h, d))
    check_shape(op, "out", out, (b, n, h, d))
    check_shape(op, "lse", lse, (b * h, n))


_attention_op = custom_op("fastmim::attention", _fwd, _raw_check)


@_attention_op.register_fake
def _(qkv, scale):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty((b, n, h, d)), qkv.new_empty((b * h, n), dtype=stat_dtype(qkv))


def _bwd(grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    if _backend(grad, qkv) == "triton":
        return _triton_attn().attention_bwd(grad, qkv, out, lse, scale)
    return _bwd_torch(grad, qkv, out, lse, scale)


_attention_backward_op = custom_op("fastmim::attention_backward", _bwd, _raw_bwd_check)
no_second_derivative(_attention_backward_op, "fastmim.ops.attention", "attention_ref")


@_attention_backward_op.register_fake
def _(grad, qkv, out, lse, scale):
    return qkv.new_empty(qkv.shape)


def _setup(ctx, inputs, output):
    qkv, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.scale = scale


def _backward(ctx, grad, _dlse=None, bwd=_attention_backward_op):
    qkv, out, lse = ctx.saved_tensors
    return bwd(grad, qkv, out, lse, ctx.scale), None


_attention_op.register_autograd(_backward, setup_context=_setup)

_Attention = eager_function(
    "_Attention", _fwd, _setup, lambda ctx, *g: _backward(ctx, *g, bwd=_bwd), graph_backward=_backward
)


def attention(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per sample and head from a packed qkv; returns [B, N, H, hd] in qkv's dtype.

    Args:
        qkv: [B, N, 3, H, hd], any strides (a view of the qkv projection's output); float32, bfloat16 or float16 for
            the Triton kernels (other float dtypes run the torch backend).
        scale: multiplies the scores; default hd^-0.5.
    Under autocast the input is used as given (a bf16 projection gives bf16 attention with fp32 softmax).
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.attention_ref(qkv, scale)
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"{_OP}: qkv must be [B, N, 3, H, hd], got {shape}")
    check_float(_OP, "qkv", qkv)
    if qkv.shape[-1] == 0:
        raise ValueError(f"{_OP}: the head dim is 0 (qkv shape {tuple(qkv.shape)})")
    scale = int(qkv.shape[-1]) ** -0.5 if scale is None else scale  # int(): a traced head dim is specialised
    if isinstance(scale, torch.Tensor) and scale.dim() == 0 and scale.dtype != torch.bool:
        scale = scale.item()  # a 0-d tensor holding the number
    if not is_finite_number(scale):
        what = f"a {tuple(scale.shape)} tensor" if isinstance(scale, torch.Tensor) else repr(scale)
        hint = (
            " (attention takes no mask: it attends over all N tokens, as MAE's encoder and decoder do; use "
            "F.scaled_dot_product_attention for masked attention)"
            if isinstance(scale, torch.Tensor) and scale.dim() > 0  # (a mask passed where the scale goes)
            else ""
        )
        raise ValueError(f"{_OP}: scale must be a finite number, got {what}{hint}")
    scale = float(scale)
    if use_custom_op():
        return _attention_op(qkv, scale)[0]
    if needs_autograd(qkv):
        return _Attention.apply(qkv, scale)[0]
    return _fwd(qkv, scale)[0]


def _register_flop_formulas() -> None:
    """torch.utils.flop_counter counts the op as it counts scaled_dot_product_attention: 4 B H N^2 hd forward (q k^T,
    then p v), 10 B H N^2 hd backward (the scores again and the four gradient matmuls), so a model's FLOPs and MFU
    come out the same with either."""
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # older torch: the counter just sees no FLOPs here
        return

    def per_matmul(qkv_shape) -> int:
        b, n, _, h, d = qkv_shape
        return 2 * b * h * n * n * d

    @register_flop_formula(torch.ops.fastmim.attention)
    def _fwd_flops(qkv_shape, *args, **kwargs) -> int:
        return 2 * per_matmul(qkv_shape)

    @register_flop_formula(torch.ops.fastmim.attention_backward)
    def _bwd_flops(grad_shape, qkv_shape, *args, **kwargs) -> int:
        return 5 * per_matmul(qkv_shape)


_register_flop_formulas()
