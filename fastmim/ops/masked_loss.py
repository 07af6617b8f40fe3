"""Masked reconstruction loss (MAE norm-pix MSE, SimMIM-style L1) as one fused op, patchify included.

Public: ``masked_mse_loss`` (targets are the images, read in NCHW directly) and ``masked_mse_loss_patchified``
(targets already [B, L, D]). Both return ``sum_l(mask * patch_loss) / sum(mask)`` as a 0-d fp32 tensor (float64 for a
float64 ``pred``), with a gradient for ``pred`` only.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from fastmim.ops import _cpu, _cuda
from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_image_grid,
    check_patch_size,
    check_shape,
    check_tensors,
    choose_backend,
    custom_op,
    eager_function,
    forced_backend,
    forced_by,
    needs_autograd,
    no_second_derivative,
    stat_dtype,
    traced_op,
    triton_twin,
    unaliased,
    use_custom_op,
)
from fastmim.ops.reference import masked_mse_loss_patchified_ref, masked_mse_loss_ref, patch_stats_ref, patchify_ref


def _geometry(target: torch.Tensor, patch_size: int) -> tuple[int, ...]:
    """Stride formula parameters (gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c) that address target element e of
    patch l of sample b (see ``fastmim/ops/triton/masked_loss.py``)."""
    if target.dim() == 4:  # images [B, C, H, W]
        p = patch_size
        sb, sc, sh, sw = target.stride()
        return (target.shape[3] // p, sb, p * sh, p * sw, p, target.shape[1], sh, sw, sc)
    sb, sl, sd = target.stride()  # patches [B, L, D]
    return (target.shape[1], sb, 0, sl, 1, target.shape[2], 0, 0, sd)


# The Triton kernel keeps a whole patch in registers (one tile of next_pow2(D)); beyond this it would spill.
TRITON_MAX_PATCH = 16384


def _backend(pred: torch.Tensor, target: torch.Tensor) -> str:
    backend = choose_backend("masked_mse_loss", pred.device, (pred.dtype, target.dtype))
    if backend == "cuda" and pred.shape[-1] > _cuda.LOSS_MAX_D:
        if forced_backend() == "cuda":
            raise RuntimeError(
                f"masked_mse_loss: {forced_by()} cannot run here: patches of {pred.shape[-1]} values exceed "
                f"the CUDA kernel's {_cuda.LOSS_MAX_D}"
            )
        backend = "triton"
    if backend == "triton" and pred.shape[-1] > TRITON_MAX_PATCH:
        if forced_backend() == "triton":
            raise RuntimeError(
                f"masked_mse_loss: {forced_by()} cannot run here: patches of {pred.shape[-1]} values exceed "
                f"the Triton kernel's {TRITON_MAX_PATCH}"
            )
        return "torch"
    return backend


def _kernels(backend: str, target: torch.Tensor, patch_size: int):
    """(kernel module, target as that backend reads it, its geometry) for backend "cpp", "cuda" or "triton"."""
    if backend == "cpp":
        target = target.contiguous()  # the C++ kernels take dense buffers; Triton and CUDA read any strides
        return _cpu, target, _geometry(target, patch_size)
    if backend == "cuda":
        return _cuda, target, _geometry(target, patch_size)
    from fastmim.ops.triton import masked_loss

    return masked_loss, target, _geometry(target, patch_size)


def _loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, eps: float, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask weight sum), 0-d fp32 (the loss float64 for a float64 pred). target is [B, C, H, W] images or
    [B, L, D] patches."""
    return _loss_fwd_on(_backend(pred, target), pred, target, mask, patch_size, norm_pix, eps, p)


def _loss_fwd_on(backend: str, pred, target, mask, patch_size, norm_pix, eps, p) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        denom = mask.float().sum()
        _check_denom(denom)
        if target.dim() == 4:
            loss = masked_mse_loss_ref(pred, target, mask, patch_size, norm_pix, eps, p)
        else:
            loss = masked_mse_loss_patchified_ref(pred, target, mask, norm_pix, eps, p)
        return loss, denom
    kernels, target, geometry = _kernels(backend, target, patch_size)
    loss, denom = kernels.masked_loss_forward(pred, target, mask, geometry, norm_pix, eps, p)
    _check_denom(denom)
    return loss, denom


def _check_denom(denom: torch.Tensor) -> None:
    """The mask's sum must be positive; checked on CPU only (on CUDA the check would cost a sync: NaN there)."""
    if denom.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(denom > 0):
        raise ValueError(
            f"masked_mse_loss: the mask's weights sum to {float(denom):g}, not a positive number (no "
            "masked patch, or negative or NaN weights): the masked loss is undefined"
        )


def _check_eps(op: str, eps) -> None:
    """eps, added to each patch's variance: a finite number >= 0 (NaN, inf and a negative one are refused here, not
    by the kernels)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def _loss_check(pred, target, mask, patch_size, norm_pix, eps, p, grad_loss=None, denom=None) -> None:
    """The raw ops' shapes: pred [B, L, D]; target images [B, C, H, W] whose patches are L x D, or [B, L, D]
    (patch_size 0); mask [B, L]."""
    op = "masked_mse_loss"
    check_shape(op, "pred", pred, (None, None, None))
    b, n, d = pred.shape
    if target.dim() == 4:
        check_patch_size(op, patch_size)
        c, h, w = target.shape[1:]
        if target.shape[0] != b or h % patch_size or w % patch_size or (h // patch_size) * (w // patch_size) != n \
                or patch_size * patch_size * c != d:  # fmt: skip
            raise ValueError(f"{op}: target images {tuple(target.shape)} with patch size {patch_size} do not give "
                             f"pred's {b} x {n} patches of {d} values")  # fmt: skip
    else:
        check_shape(op, "target", target, (b, n, d))
    check_shape(op, "mask", mask, (b, n))
    if p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p}")
    _check_eps(op, eps)
    for name, t in (("target", target), ("mask", mask), ("grad_loss", grad_loss), ("denom", denom)):
        if t is not None:
            check_device(op, name, t, pred.device)
    for name, t in (("grad_loss", grad_loss), ("denom", denom)):
        if t is not None and t.numel() != 1:
            raise ValueError(f"{op}: {name} must hold one value, got shape {tuple(t.shape)}")
    if denom is not None and denom.dtype != torch.float32:  # the forward's mask sum; the kernels read a float
        raise TypeError(f"{op}: denom must be the forward's float32 mask sum, got {denom.dtype}")
    if denom is not None and denom.device.type == "cpu" and not bool(denom.reshape(()) > 0):  # (CUDA: no sync)
        raise ValueError(f"{op}: denom must be the forward's positive mask sum, got {float(denom.reshape(())):g}")


def _loss_bwd_check(grad_loss, pred, target, mask, denom, patch_size, norm_pix, eps, p) -> None:
    _loss_check(pred, target, mask, patch_size, norm_pix, eps, p, grad_loss, denom)


_masked_loss_op = custom_op("fastmim::masked_loss", unaliased(_loss_fwd), _loss_check)


@_masked_loss_op.register_fake
def _(pred, target, mask, patch_size, norm_pix, eps, p):
    return pred.new_empty((), dtype=stat_dtype(pred)), pred.new_empty((), dtype=torch.float32)


def _loss_bwd(
    grad_loss: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    denom: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    eps: float,
    p: int,
) -> torch.Tensor:
    return _loss_bwd_on(_backend(pred, target), grad_loss, pred, target, mask, denom, patch_size, norm_pix, eps, p)


def _loss_bwd_on(backend: str, grad_loss, pred, target, mask, denom, patch_size, norm_pix, eps, p) -> torch.Tensor:
    if backend == "torch":
        return _masked_loss_backward_ref(grad_loss, pred, target, mask, denom, patch_size, norm_pix, eps, p)
    kernels, target, geometry = _kernels(backend, target, patch_size)
    return kernels.masked_loss_backward(grad_loss, pred, target, mask, denom, geometry, norm_pix, eps, p)


def _masked_loss_backward_ref(grad_loss, pred, target, mask, denom, patch_size, norm_pix, eps, p):
    """The gradient of ``masked_mse_loss_ref`` w.r.t. pred, in closed form (autograd is off inside a custom op)."""
    dt = stat_dtype(pred)  # fp32, float64 for a float64 pred
    t = (patchify_ref(target, patch_size) if target.dim() == 4 else target).to(dt)  # [B, L, D]
    if norm_pix:
        mean, std = patch_stats_ref(t, eps)
        t = (t - mean) / std
    diff = pred.to(dt) - t
    local = diff.sign() if p == 1 else 2 * diff
    # (denom is the forward's fp32 sum, the kernels' contract: a float64 pred's own, of fractional weights, in
    # float64, as the reference's autograd has it)
    denom = mask.to(dt).sum() if dt == torch.float64 else denom.to(dt)
    coef = (mask.to(dt) * (grad_loss.to(dt) / denom / pred.shape[-1])).unsqueeze(-1)  # [B, L, 1]
    return torch.where(coef != 0, local * coef, 0.0).to(pred.dtype)  # weight-0 patches: 0 even if not finite


_masked_loss_backward_op = custom_op("fastmim::masked_loss_backward", _loss_bwd, _loss_bwd_check)
no_second_derivative(
    _masked_loss_backward_op,
    "fastmim.ops.masked_mse_loss (and masked_mse_loss_patchified)",
    "masked_mse_loss_ref (masked_mse_loss_patchified_ref)",
)


@_masked_loss_backward_op.register_fake
def _(grad_loss, pred, target, mask, denom, patch_size, norm_pix, eps, p):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    pred, target, mask, patch_size, norm_pix, eps, p = inputs
    ctx.save_for_backward(pred, target, mask, output[1])
    ctx.args = (patch_size, norm_pix, eps, p)
    ctx.mark_non_differentiable(output[1])


def _loss_backward(ctx, grad_loss, _grad_denom, bwd=_masked_loss_backward_op):
    pred, target, mask, denom = ctx.saved_tensors
    grad = bwd(grad_loss, pred, target, mask, denom, *ctx.args)
    return grad, None, None, None, None, None, None


_masked_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


_MaskedLoss = eager_function(
    "_MaskedLoss",
    _loss_fwd,
    _loss_setup,
    lambda ctx, gl, gd: _loss_backward(ctx, gl, gd, _loss_bwd),
    graph_backward=_loss_backward,
)


# the Triton twins inductor can see into (fastmim.ops._dispatch.traced_op); one AUTO_COMPILED entry,
# "masked_mse_loss", decides for both losses (one op)
_masked_loss_twin = triton_twin("masked_loss_triton", _loss_fwd, functools.partial(_loss_fwd_on, "triton"), _loss_check)
_masked_loss_backward_twin = triton_twin(
    "masked_loss_backward_triton", _loss_bwd, functools.partial(_loss_bwd_on, "triton"), _loss_bwd_check
)
if _masked_loss_twin is not None:
    _masked_loss_twin.register_autograd(
        lambda ctx, gl, gd: _loss_backward(ctx, gl, gd, _masked_loss_backward_twin), setup_context=_loss_setup
    )
    no_second_derivative(
        _masked_loss_backward_twin,
        "fastmim.ops.masked_mse_loss (and masked_mse_loss_patchified)",
        "masked_mse_loss_ref (masked_mse_loss_patchified_ref)",
    )


def _call(*args) -> torch.Tensor:
    if use_custom_op():
        pred = args[0]
        twin = _masked_loss_twin if pred.shape[-1] <= TRITON_MAX_PATCH else None
        return traced_op("masked_mse_loss", _masked_loss_op, twin, pred.device, (pred.dtype, args[1].dtype))(*args)[0]
    return (_MaskedLoss.apply(*args) if needs_autograd(args[0]) else _loss_fwd(*args))[0]


def _validate(op: str, pred, target, mask, norm_pix: bool, eps: float, p: int, target_name: str) -> torch.Tensor:
    if pred.dim() != 3:
        raise ValueError(f"{op}: pred must be [B, L, D] patches, got shape {tuple(pred.shape)}")
    check_float(op, "pred", pred)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{op}: {target_name} must be real-valued (float or integer), got {target.dtype}")
    check_device(op, target_name, target, pred.device)
    check_device(op, "mask", mask, pred.device)
    if type(p) is not int or p not in (1, 2):
        raise ValueError(f"{op}: p must be the int 1 (L1) or 2 (squared error), got {p!r}")
    if pred.shape[2] == 0:
        raise ValueError(f"{op}: pred has no values per patch (shape {tuple(pred.shape)})")
    if pred.shape[1] == 0:
        raise ValueError(f"{op}: pred has no patches (L = 0, shape {tuple(pred.shape)})")
    if not isinstance(norm_pix, bool):
        raise TypeError(f"{op}: norm_pix must be True or False, got {norm_pix!r}")
    _check_eps(op, eps)
    if tuple(mask.shape) != tuple(pred.shape[:2]):
        grid = " (a [B, h, w] grid of patches flattens with mask.flatten(1))" if mask.dim() == 3 else ""
        raise ValueError(f"{op}: mask has shape {tuple(mask.shape)}, expected [B, L] = {tuple(pred.shape[:2])}{grid}")
    if mask.dtype == torch.bool or not mask.is_floating_point():
        if mask.is_complex():
            raise TypeError(f"{op}: mask must be bool, integer or float, got {mask.dtype}")
        mask = mask.to(torch.float32)
    if norm_pix and pred.shape[2] < 2:
        raise ValueError(f"{op}: norm_pix needs at least 2 values per patch to take a variance, got D={pred.shape[2]}")
    for name, t in ((target_name, target), ("mask", mask)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{op}: {name} requires grad, but the fused loss differentiates pred only; detach it "
                "(or use the *_ref function)"
            )
    return mask


def _float_target(target: torch.Tensor) -> torch.Tensor:
    """Integer images (uint8 straight from a decoder) become float32 once; float targets pass as they are."""
    return target if target.is_floating_point() else target.float()


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    p: int = 2,
) -> torch.Tensor:
    """MAE's reconstruction loss in one pass over the masked patches, reading the images in NCHW directly.

    Per masked patch: the target patch (optionally normalised by its own mean and unbiased variance, in fp32), the
    mean squared (``p=2``) or absolute (``p=1``) error; then ``sum(mask * patch_loss) / sum(mask)``. Same value and
    gradient as ``masked_mse_loss_ref``.

    Args:
        pred: [B, L, p*p*C] predicted patches, (p, q, c) order inside a patch (MAE's patchify).
        imgs: [B, C, H, W] images (any strides; H and W divisible by ``patch_size``; integer images are converted
            to float32).
        mask: [B, L] weights: 1 for masked patches, 0 for visible ones (bool, integer or float). Patches with weight
            0 are never read, so NaN or inf there does not reach the loss (the reference ignores them too) nor the
            gradient (zeros there; the reference's gradient is NaN there, 0 x NaN).
        patch_size: patch side.
        norm_pix: normalise each target patch (MAE's ``norm_pix_loss``).
        eps: added to the per-patch variance.
        p: 2 for squared error, 1 for absolute error.
    Returns: 0-d fp32 loss (float64 for a float64 ``pred``); the gradient flows to ``pred`` only.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.masked_mse_loss_ref(pred, imgs, mask, patch_size, norm_pix, eps, p)
    op = "masked_mse_loss"
    check_tensors(op, pred=pred, imgs=imgs, mask=mask)
    if imgs.dim() != 4:
        raise ValueError(f"{op}: imgs must be [B, C, H, W], got shape {tuple(imgs.shape)}")
    check_patch_size(op, patch_size)
    check_image_grid(op, imgs, patch_size)
    b, c, h, w = imgs.shape
    expected = (b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)
    if tuple(pred.shape) != expected:
        raise ValueError(
            f"{op}: pred has shape {tuple(pred.shape)}, expected {expected} for images {tuple(imgs.shape)} "
            f"and patch size {patch_size}"
        )
    mask = _validate(op, pred, imgs, mask, norm_pix, eps, p, "imgs")
    return _call(pred, _float_target(imgs), mask, patch_size, norm_pix, float(eps), p)


def masked_mse_loss_patchified(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix: bool = True,
    eps: float = 1e-6,
    p: int = 2,
) -> torch.Tensor:
    """``masked_mse_loss`` for targets that are already [B, L, D] patches (HOG features, teacher tokens, ...).

    Args:
        pred: [B, L, D] predictions.
        target: [B, L, D] targets (any strides).
        mask, norm_pix, eps, p: as ``masked_mse_loss``.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.masked_mse_loss_patchified_ref(pred, target, mask, norm_pix, eps, p)
    op = "masked_mse_loss_patchified"
    check_tensors(op, pred=pred, target=target, mask=mask)
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{op}: target has shape {tuple(target.shape)}, pred {tuple(pred.shape)}")
    mask = _validate(op, pred, target, mask, norm_pix, eps, p, "target")
    return _call(pred, _float_target(target), mask, 0, norm_pix, float(eps), p)
