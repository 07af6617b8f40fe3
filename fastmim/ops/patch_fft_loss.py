"""The patch-based focal frequency loss on masked patches, each patch's DFT as a small matrix product.

``patch_fft_loss(pred, imgs, mask, patch_size, alpha=1.0, log_weights=True)`` equals ``patch_fft_loss_ref`` (the
official focal frequency loss with one FFT per token patch, weights normalised per patch spectrum, averaged over the
masked patches with ``masked_mse_loss``'s weighting). What it avoids:

- **no images, no unmasked patches, no second FFT.** The DFT is linear, so ``F_pred - F_img = DFT(pred - img)``: the
  difference of each masked patch is read straight from the predicted patches (MAE's [B, L, p*p*C]) and the images,
  and transformed once.
- **a DFT of a p x p patch is a [p^2, p^2] matrix product** (``kron(D, D)``), and for a real patch half the spectrum
  (frequencies (u, v) with v <= p/2) holds everything: the rest is its complex conjugate, with the same distance and
  weight (``mult`` counts it). At p = 16: one [M * C, 256] x [256, 288] GEMM instead of batched 16 x 16 FFTs.
- **the weight normalisation factors out**: ``sum(w * d2) = sum(u * d2) / max(u)`` with ``u = log(1 + |dF|^alpha)``,
  so nothing of size spectrum is kept for the backward except each spectrum's maximum; the backward recomputes the
  spectrum (``d loss / d e = 2 s Re(K^H (w F))``, one more matrix product with the transposed DFT matrices).

Backends: "triton" (CUDA: one kernel each way, everything in registers, see ``fastmim/ops/triton/patch_fft_loss.py``)
and "torch" (CPU and other dtypes: the masked patches' differences gathered once, then ``rfft2`` of the [M, C, p, p]
differences and, backward, one ``irfft2`` of ``w F``: on a CPU the batched small FFTs beat the GEMM). The gradient
flows to ``pred`` only. Registered as ``torch.library.custom_op`` (fake kernels, autograd), safe under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math

import torch

from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_image_grid,
    check_patch_size,
    check_shape,
    choose_backend,
    custom_op,
    eager_function,
    needs_autograd,
    no_autocast,
    no_second_derivative,
    use_custom_op,
)

_OP = "patch_fft_loss"


def _triton_pfft():
    from fastmim.ops.triton import patch_fft_loss

    return patch_fft_loss


@functools.lru_cache(maxsize=16)
def half_dft(p: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Kr, Ki [p*p, H2], mult [H2]) with H2 = p * (p // 2 + 1): column k = (u, v) (v <= p / 2) of the orthonormal
    2-D DFT of a p x p patch flattened row-major: ``F[k] = sum_n e[n] (Kr + i Ki)[n, k]``; ``mult`` is 2 where the
    conjugate frequency (-u, -v) lies outside the half (counted through this one), else 1."""
    y, x = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")
    u, v = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p // 2 + 1, dtype=torch.float64),
                          indexing="ij")  # fmt: skip
    phase = 2 * math.pi * (y.reshape(-1, 1) * u.reshape(1, -1) + x.reshape(-1, 1) * v.reshape(1, -1)) / p
    kr, ki = torch.cos(phase) / p, -torch.sin(phase) / p
    vv = v.reshape(-1)
    mult = torch.where((vv == 0) | ((p % 2 == 0) & (vv == p // 2)), 1.0, 2.0)
    return kr.to(device, dtype).contiguous(), ki.to(device, dtype).contiguous(), mult.to(device, dtype)


def _gather_diff(pred: torch.Tensor, imgs: torch.Tensor, sel: torch.Tensor, p: int) -> torch.Tensor:
    """[M, C, p, p]: predicted minus image patch of each selected flat (sample, token) index, in the compute dtype."""
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    dt = torch.promote_types(pred.dtype, torch.float32)
    target = imgs.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, p, p)
    rows = pred.reshape(b * gh * gw, -1).index_select(0, sel).to(dt).view(-1, p, p, c).permute(0, 3, 1, 2)
    return rows - target.index_select(0, sel).to(dt)


def _spectrum(e: torch.Tensor, alpha: float, log_weights: bool):
    """(F [M, C, p, p//2 + 1] complex: the orthonormal half spectrum of each patch, d2 = |F|^2, u, mult [p//2 + 1]:
    how many full-spectrum frequencies each column stands for)."""
    p = e.shape[-1]
    f = torch.fft.rfft2(e, norm="ortho")
    mag = f.abs()
    u = mag if alpha == 1.0 else mag.pow(alpha)
    if log_weights:
        u = torch.log(u + 1.0)
    mult = torch.full((p // 2 + 1,), 2.0, dtype=mag.dtype, device=mag.device)
    mult[0] = 1.0
    if p % 2 == 0:
        mult[-1] = 1.0
    return f, mag.square(), u, mult


def _fwd(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, alpha: float, log_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss [] fp32, each (patch, channel) spectrum's max weight [B, L, C] fp32, 0 where unmasked)."""
    p = patch_size
    b, n, _ = pred.shape
    c = imgs.shape[1]
    denom = mask.sum() * (c * p * p)
    if choose_backend(_OP, pred.device, (pred.dtype, imgs.dtype)) == "triton":
        kr, ki, mult = half_dft(p, torch.float32, str(pred.device))
        rowmax, rowloss = _triton_pfft().patch_fft_fwd(pred, imgs, mask.contiguous(), kr, ki, mult, p, alpha,
                                                       log_weights)  # fmt: skip
        return rowloss.sum() / denom, rowmax
    with no_autocast(pred.device):
        sel = (mask.reshape(-1) != 0).nonzero().squeeze(1)
        _, d2, u, mult = _spectrum(_gather_diff(pred, imgs, sel, p), alpha, log_weights)
        top = u.amax(dim=(-2, -1))  # [M, C]
        s = ((u * d2) @ mult).sum(-1)  # [M, C]: sum of u * d2 over the full spectrum
        # [M]: sum of w * d2 over the patch's spectra; a zero spectrum counts 0, a NaN or infinite one gives NaN
        rows = torch.where(s == 0, 0.0, s / torch.where(top == 0, 1.0, top)).sum(-1)
        loss = (rows * mask.reshape(-1)[sel].to(rows.dtype)).sum() / denom
        rowmax = torch.zeros((b * n, c), device=pred.device, dtype=torch.float32)
        rowmax[sel] = top.float()
    return loss.float(), rowmax.view(b, n, c)


def _raw_check(pred, imgs, mask, patch_size, alpha=1.0, log_weights=False, rowmax=None, grad=None) -> None:
    """The raw ops' shapes: pred [B, L, p*p*C] for imgs [B, C, H, W] in p x p patches, mask [B, L], rowmax
    [B, L, C], grad one value."""
    check_shape(_OP, "imgs", imgs, (None, None, None, None))
    b, c, h, w = imgs.shape
    p = patch_size
    if p < 1 or h % p or w % p:
        raise ValueError(f"{_OP}: image size {h}x{w} is not divisible by the patch size {p}")
    n = (h // p) * (w // p)
    check_shape(_OP, "pred", pred, (b, n, p * p * c))
    check_shape(_OP, "mask", mask, (b, n))
    check_shape(_OP, "rowmax", rowmax, (b, n, c))
    if grad is not None and grad.numel() != 1:
        raise ValueError(f"{_OP}: grad must hold one value, got shape {tuple(grad.shape)}")


def _raw_bwd_check(grad, pred, imgs, mask, rowmax, patch_size, alpha, log_weights) -> None:
    _raw_check(pred, imgs, mask, patch_size, alpha, log_weights, rowmax, grad)


_pfft_op = custom_op("fastmim::patch_fft_loss", _fwd, _raw_check)


@_pfft_op.register_fake
def _(pred, imgs, mask, patch_size, alpha, log_weights):
    b, n, _ = pred.shape
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((b, n, imgs.shape[1]), dtype=torch.float32)


def _bwd(
    grad: torch.Tensor,
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    rowmax: torch.Tensor,
    patch_size: int,
    alpha: float,
    log_weights: bool,
) -> torch.Tensor:
    """d pred [B, L, p*p*C] in pred's dtype: ``2 s mask_l K^H (w F)`` on masked patches (w = u / max u), 0 elsewhere."""
    p = patch_size
    b, n, _ = pred.shape
    c = imgs.shape[1]
    scale = (grad.float() / (mask.sum() * (c * p * p))).reshape(1)
    if choose_backend(_OP, pred.device, (pred.dtype, imgs.dtype)) == "triton":
        kr, ki, mult = half_dft(p, torch.float32, str(pred.device))
        return _like(pred, _triton_pfft().patch_fft_bwd(scale, pred, imgs, mask.contiguous(), rowmax, kr, ki, mult, p,
                                                        alpha, log_weights))  # fmt: skip
    with no_autocast(pred.device):
        sel = (mask.reshape(-1) != 0).nonzero().squeeze(1)
        f, _, u, _ = _spectrum(_gather_diff(pred, imgs, sel, p), alpha, log_weights)
        top = rowmax.reshape(-1, c)[sel].to(u.dtype)[..., None, None]  # [M, C, 1, 1]
        w = torch.where(top > 0, u / top, 0.0)  # the weights; irfft2 adds the conjugate half itself
        de = torch.fft.irfft2(w * f, s=(p, p), norm="ortho")  # [M, C, p, p]
        de = de * (2.0 * scale.to(de.dtype) * mask.reshape(-1)[sel].to(de.dtype)).view(-1, 1, 1, 1)
        dpred = torch.zeros(pred.shape, device=pred.device, dtype=pred.dtype)
        dpred.view(b * n, -1)[sel] = de.permute(0, 2, 3, 1).reshape(len(sel), -1).to(pred.dtype)
    return _like(pred, dpred)


def _like(pred: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The contiguous ``grad`` in ``torch.empty_like(pred)``'s layout (a transposed pred's), as the fake kernel says
    and inductor checks."""
    out = torch.empty_like(pred)
    return grad if out.stride() == grad.stride() else out.copy_(grad)


_pfft_backward_op = custom_op("fastmim::patch_fft_loss_backward", _bwd, _raw_bwd_check)
no_second_derivative(_pfft_backward_op, "fastmim.ops.patch_fft_loss", "patch_fft_loss_ref")


@_pfft_backward_op.register_fake
def _(grad, pred, imgs, mask, rowmax, patch_size, alpha, log_weights):
    return torch.empty_like(pred)


def _setup(ctx, inputs, output):
    pred, imgs, mask, patch_size, alpha, log_weights = inputs
    ctx.save_for_backward(pred, imgs, mask, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.meta = (patch_size, alpha, log_weights)


def _backward(ctx, grad, _dmax=None, bwd=_pfft_backward_op):
    pred, imgs, mask, rowmax = ctx.saved_tensors
    return bwd(grad, pred, imgs, mask, rowmax, *ctx.meta), None, None, None, None, None


_pfft_op.register_autograd(_backward, setup_context=_setup)

_PatchFftLoss = eager_function(
    "_PatchFftLoss", _fwd, _setup, lambda ctx, *g: _backward(ctx, *g, bwd=_bwd), graph_backward=_backward
)


def patch_fft_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    alpha: float = 1.0,
    log_weights: bool = True,
) -> torch.Tensor:
    """The focal frequency loss of each masked patch's spectrum (see ``patch_fft_loss_ref`` for the formula).

    Args:
        pred: [B, L, p*p*C] predicted patches, MAE's (p, q, c) order (any float dtype; computed in fp32).
        imgs: [B, C, H, W] target images (H and W multiples of ``patch_size``; no gradient).
        mask: [B, L] weights, 1 for masked patches (the only ones read), 0 for visible (bool, integer or float).
        patch_size: patch side p.
        alpha: exponent of the spectrum distance in the weights (the focal frequency loss's alpha), > 0.
        log_weights: weights ``log(1 + |dF|^alpha)`` (the official ``log_matrix``) instead of ``|dF|^alpha``.
    Returns: the 0-d fp32 loss ``sum(mask * patch_loss) / sum(mask)``; the gradient flows to ``pred`` only.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.patch_fft_loss_ref(pred, imgs, mask, patch_size, alpha, log_weights)
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3:
        raise ValueError(f"{_OP}: pred must be [B, L, D] patches, got {getattr(pred, 'shape', type(pred).__name__)}")
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        raise ValueError(f"{_OP}: imgs must be [B, C, H, W], got {getattr(imgs, 'shape', type(imgs).__name__)}")
    check_float(_OP, "pred", pred)
    check_float(_OP, "imgs", imgs)
    check_patch_size(_OP, patch_size)
    check_image_grid(_OP, imgs, patch_size)
    b, c, h, w = imgs.shape
    if 0 in (c, h, w):
        raise ValueError(f"{_OP}: imgs have no pixels to transform: C, H, W = {c}, {h}, {w}")
    expected = (b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)
    if tuple(pred.shape) != expected:
        raise ValueError(f"{_OP}: pred has shape {tuple(pred.shape)}, expected {expected} for images "
                         f"{tuple(imgs.shape)} and patch size {patch_size}")  # fmt: skip
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"{_OP}: alpha must be a finite number > 0, got {alpha!r}")
    check_device(_OP, "imgs", imgs, pred.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected[:2]:
        raise ValueError(f"{_OP}: mask must be [B, L] = {list(expected[:2])}, got {getattr(mask, 'shape', mask)}")
    check_device(_OP, "mask", mask, pred.device)
    if mask.is_complex():
        raise TypeError(f"{_OP}: mask must be bool, integer or float, got {mask.dtype}")
    for name, t in (("imgs", imgs), ("mask", mask)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: {name} requires grad, but the fused loss differentiates pred only; detach it "
                             "(or use patch_fft_loss_ref)")  # fmt: skip
    mask = mask.float()
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(mask.sum() > 0):
        raise ValueError(f"{_OP}: mask has no masked patch: the masked loss is undefined")
    args = (pred, imgs, mask, patch_size, float(alpha), bool(log_weights))
    if use_custom_op():
        return _pfft_op(*args)[0]
    if needs_autograd(pred):
        return _PatchFftLoss.apply(*args)[0]
    return _fwd(*args)[0]
