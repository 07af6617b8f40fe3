"""A2MIM's focal frequency loss with one FFT per batch instead of two per image.

``fft_loss(pred, target, mask=None, patch_size=None)`` equals ``fft_loss_ref`` (the official computation: each
image's FFT, spectra averaged over the batch, log-distance weights normalised by their maximum and detached, the
weighted mean of the squared spectrum distance). The FFT is linear and the loss only uses the difference of the
batch-averaged spectra, so it is the FFT of one image: ``e = mean_b(x_hat - target)``, where A2MIM's mixing of the
prediction (``pred * m + (0.5 * pred.detach() + 0.5 * target) * (1 - m)``) reduces to
``e = mean_b((pred - target) * (1 + m) / 2)``. Forward: that one reduction, one [C, H, W] FFT, the weights and the
mean. Backward: one inverse FFT (``2 Re(ifft2(w D)) / (C H W)``, orthonormal transforms) broadcast back over the
batch, times ``m`` for the prediction (the mixed-in ``pred.detach()`` takes no gradient) and ``-(1 + m) / 2`` for
the target. The FFTs run through ``torch.fft`` (cuFFT, pocketfft) in fp32; on CUDA tensors the batch reduction and the
gradient's broadcast are one Triton pass each (``fastmim/ops/triton/fft_loss.py``), elsewhere a few torch ops.

Registered as ``torch.library.custom_op`` (fake kernels, autograd), safe under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_image_grid,
    check_shape,
    check_tensor,
    choose_backend,
    custom_op,
    eager_function,
    needs_autograd,
    no_second_derivative,
    use_custom_op,
)

_OP = "fft_loss"


def _triton_fft():
    from fastmim.ops.triton import fft_loss

    return fft_loss


def _pixel_weight(mask: torch.Tensor, b: int, h: int, w: int, p: int) -> torch.Tensor:
    """(1 + m) / 2 per pixel, [B, 1, H, W] fp32, from the token mask [B, L]."""
    m = mask.reshape(b, h // p, w // p).float()
    m = m.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    return 0.5 * (1.0 + m)


def _fwd(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss [] fp32, w * D as a real view [C, H, W, 2] fp32 for the backward)."""
    b, c, h, w = pred.shape
    if choose_backend(_OP, pred.device, (pred.dtype, target.dtype)) == "triton":
        e = _triton_fft().mix_mean(pred, target, mask, patch_size)  # one pass over the batch
    else:
        diff = pred.float() - target.float()
        if mask is not None:
            diff = diff * _pixel_weight(mask, b, h, w, patch_size)
        e = diff.mean(0)  # [C, H, W]: the batch-averaged mixed prediction minus the batch-averaged target
    spec = torch.fft.fft2(e, norm="ortho")
    d2 = spec.real**2 + spec.imag**2
    wts = torch.log1p(torch.sqrt(d2))
    top = wts.max()
    wts = torch.where(top > 0, wts / top, torch.zeros_like(wts)).clamp(0.0, 1.0)  # 0 / 0 (no error) -> 0
    return (wts * d2).mean(), torch.view_as_real(wts * spec).contiguous()


def _mask_check(op: str, mask, b: int, h: int, w: int, patch_size: int) -> None:
    if mask is not None:
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"{op}: image size {h}x{w} is not a multiple of patch_size {patch_size}")
        check_shape(op, "mask", mask, (b, (h // patch_size) * (w // patch_size)))


def _raw_check(pred, target, mask, patch_size) -> None:
    """The raw op's shapes: pred and target [B, C, H, W], mask [B, L] of patch_size tokens."""
    check_shape(_OP, "pred", pred, (None, None, None, None))
    check_shape(_OP, "target", target, tuple(pred.shape))
    b, _, h, w = pred.shape
    _mask_check(_OP, mask, b, h, w, patch_size)


_fft_loss_op = custom_op("fastmim::fft_loss", _fwd, _raw_check)


@_fft_loss_op.register_fake
def _(pred, target, mask, patch_size):
    _, c, h, w = pred.shape
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((c, h, w, 2), dtype=torch.float32)


def _bwd(
    grad: torch.Tensor,
    weighted: torch.Tensor,
    mask: torch.Tensor | None,
    shape: list[int],
    patch_size: int,
    pred_dtype: torch.dtype,
    target_dtype: torch.dtype,
    need_pred: bool,
    need_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d pred, d target), [B, C, H, W] each in its input's dtype, [0] where not needed: ``g = 2 Re(ifft2(w D)) /
    (C H W B)`` is d loss / d x_hat for every image; the prediction's gradient is ``g * m`` (its visible part is the
    detached prediction), the target's ``-g * (1 + m) / 2`` (without a mask: ``g`` and ``-g``)."""
    b, c, h, w = shape
    g = torch.fft.ifft2(torch.view_as_complex(weighted), norm="ortho").real
    g = g * (grad.float() * 2.0 / (c * h * w * b))
    if choose_backend(_OP, weighted.device, (pred_dtype, target_dtype)) == "triton":
        dpred, dtarget = _triton_fft().spread_grad(g, mask, tuple(shape), patch_size, pred_dtype, target_dtype,
                                                   need_pred, need_target)  # fmt: skip
    else:
        g = g.unsqueeze(0)
        if mask is None:
            dpred = g.expand(shape).to(pred_dtype, copy=True) if need_pred else None
            dtarget = (-g).expand(shape).to(target_dtype, copy=True) if need_target else None
        else:
            half = _pixel_weight(mask, b, h, w, patch_size)  # (1 + m) / 2
            dpred = (g * (2.0 * half - 1.0)).to(pred_dtype) if need_pred else None
            dtarget = (-g * half).to(target_dtype) if need_target else None
    dpred = weighted.new_empty((0,), dtype=pred_dtype) if dpred is None else dpred
    dtarget = weighted.new_empty((0,), dtype=target_dtype) if dtarget is None else dtarget
    return dpred, dtarget


def _raw_bwd_check(grad, weighted, mask, shape, patch_size, pred_dtype, target_dtype, need_pred, need_target) -> None:
    op = "fft_loss_backward"
    if len(shape) != 4:
        raise ValueError(f"{op}: shape must be [B, C, H, W], got {list(shape)}")
    b, c, h, w = shape
    check_shape(op, "weighted", weighted, (c, h, w, 2))
    _mask_check(op, mask, b, h, w, patch_size)
    if grad.numel() != 1:
        raise ValueError(f"{op}: grad must hold one value, got shape {tuple(grad.shape)}")


_fft_loss_backward_op = custom_op("fastmim::fft_loss_backward", _bwd, _raw_bwd_check)
no_second_derivative(_fft_loss_backward_op, "fastmim.ops.fft_loss", "fft_loss_ref")


@_fft_loss_backward_op.register_fake
def _(grad, weighted, mask, shape, patch_size, pred_dtype, target_dtype, need_pred, need_target):
    dpred = weighted.new_empty(tuple(shape) if need_pred else (0,), dtype=pred_dtype)
    return dpred, weighted.new_empty(tuple(shape) if need_target else (0,), dtype=target_dtype)


def _setup(ctx, inputs, output):
    pred, target, mask, patch_size = inputs
    ctx.save_for_backward(output[1], mask)
    ctx.mark_non_differentiable(output[1])
    ctx.meta = (list(pred.shape), patch_size, pred.dtype, target.dtype)


def _backward(ctx, grad, _dw=None, bwd=_fft_loss_backward_op):
    weighted, mask = ctx.saved_tensors
    shape, p, pred_dtype, target_dtype = ctx.meta
    need_pred, need_target = ctx.needs_input_grad[:2]
    dpred, dtarget = bwd(grad, weighted, mask, shape, p, pred_dtype, target_dtype, need_pred, need_target)
    return dpred if need_pred else None, dtarget if need_target else None, None, None


_fft_loss_op.register_autograd(_backward, setup_context=_setup)

_FftLoss = eager_function(
    "_FftLoss", _fwd, _setup, lambda ctx, *g: _backward(ctx, *g, bwd=_bwd), graph_backward=_backward
)


def fft_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, patch_size: int | None = None
) -> torch.Tensor:
    """A2MIM's focal frequency loss of ``pred`` against ``target`` (see ``fft_loss_ref`` for the formula).

    Args:
        pred, target: [B, C, H, W] images (any float dtype; computed in fp32).
        mask: [B, L] (or [B, H/p, W/p]) token mask, 1 = masked: the visible pixels of the prediction are replaced
            by ``0.5 * pred.detach() + 0.5 * target`` first (A2MIM's "mixed" replacement). None: no replacement.
        patch_size: the mask's token side in pixels (required with a mask; H and W multiples of it).
    Returns: the scalar loss (fp32), with gradients for pred and target.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.fft_loss_ref(pred, target, mask, patch_size)
    for name, t in (("pred", pred), ("target", target)):
        check_tensor(_OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be [B, C, H, W], got {tuple(t.shape)}")
        check_float(_OP, name, t)
    if target.shape != pred.shape:
        raise ValueError(f"{_OP}: target has shape {tuple(target.shape)}, pred {tuple(pred.shape)}")
    check_device(_OP, "target", target, pred.device)
    b, c, h, w = pred.shape
    if b == 0:
        raise ValueError(f"{_OP}: an empty batch has no spectrum to average")
    if 0 in (c, h, w):
        raise ValueError(f"{_OP}: pred and target have no pixels to transform: C, H, W = {c}, {h}, {w}")
    p = 1
    if mask is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"{_OP}: a mask needs patch_size, a positive int, got {patch_size!r}")
        check_image_grid(_OP, pred, patch_size, "pred")
        n = (h // patch_size) * (w // patch_size)
        if not isinstance(mask, torch.Tensor) or mask.numel() != b * n or mask.shape[0] != b:
            raise ValueError(f"{_OP}: mask must be [B, L] = [{b}, {n}], got {getattr(mask, 'shape', mask)}")
        check_device(_OP, "mask", mask, pred.device)
        mask, p = mask.reshape(b, n).float(), patch_size
    if use_custom_op():
        return _fft_loss_op(pred, target, mask, p)[0]
    if needs_autograd(pred, target):
        return _FftLoss.apply(pred, target, mask, p)[0]
    return _fwd(pred, target, mask, p)[0]
