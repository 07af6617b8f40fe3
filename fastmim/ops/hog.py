"""MaskFeat's HOG target, computed for the masked patches only.

``hog_target(imgs, mask, patch_size=16, cell_size=8, nbins=9, gaussian_window=0)`` -> [B, L, C * nbins * K * K]
(K = patch_size / cell_size; 108 values per 16-px RGB patch) in fp32: the rows of masked patches hold their HOG
features as ``hog_target_ref`` (the official whole-image computation) gives them, to 1e-6, except on flat regions:
here the gradients are exact differences, 0 on a flat cell, whose HOG is then zero, where the official fp32
convolution leaves rounding noise (~1e-7) that the per-cell L2 normalisation turns into a unit vector (bin 0, or a
bin on a boundary flipped); on photos with flat areas (a black background) many rows differ there. The other rows
are zero and never computed (the loss reads masked rows only). ``mask=None`` computes every patch. A target: no
gradient.

Backends: Triton (CUDA tensors: one program per cell, reading its pixels and a one-pixel rim, no full-resolution
intermediate) and "torch" (CPU and other dtypes: the masked patches' pixel windows gathered once, then the same
arithmetic on [M, C, p, p] tensors). Both decide orientation-bin boundaries exactly (see ``hog_target_ref``).
Registered as ``torch.library.custom_op`` (fake kernel), safe under ``torch.compile(fullgraph=True)``.
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
    check_shape,
    choose_backend,
    custom_op,
    use_custom_op,
)
from fastmim.ops.reference import hog_gaussian_window

_OP = "hog_target"


def _triton_hog():
    from fastmim.ops.triton import hog

    return hog


@functools.cache
def boundary_trig(nbins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[2, 16] fp32: cos and sin of the bin boundaries k * pi / nbins (k < 16), from float64; cached per device (a
    copy to the GPU every call would wait for it, and could not be captured in a CUDA graph)."""
    angles = torch.arange(16, dtype=torch.float64) * math.pi / nbins
    return torch.stack([angles.cos(), angles.sin()]).float().to(device)


def orientation_bins(gx: torch.Tensor, gy: torch.Tensor, nbins: int) -> torch.Tensor:
    """``floor(atan2(gx, gy) / pi * nbins) mod nbins`` with boundaries decided exactly (as the Triton kernel does):
    the gradient turned into the upper half plane, counted against each boundary direction."""
    flip = (gx < 0) | ((gx == 0) & (gy < 0))
    u, v = torch.where(flip, -gy, gy), torch.where(flip, -gx, gx)
    trig = boundary_trig(nbins)
    bins = torch.zeros(gx.shape, dtype=torch.long, device=gx.device)
    for k in range(1, nbins):
        bins += (v * float(trig[0, k]) - u * float(trig[1, k]) >= 0).long()
    return bins


def _hog_torch(imgs, mask, window, patch_size: int, cell_size: int, nbins: int) -> torch.Tensor:
    b, c, h, w = imgs.shape
    p, k = patch_size, patch_size // cell_size
    gh, gw = h // p, w // p
    out = torch.zeros((b, gh * gw, c * nbins * k * k), device=imgs.device, dtype=torch.float32)
    sel = mask.reshape(b, gh * gw) if mask is not None else torch.ones(b, gh * gw, dtype=torch.bool, device=imgs.device)
    bi, li = sel.to(torch.bool).nonzero(as_tuple=True)
    if bi.numel() == 0:
        return out
    dev = imgs.device
    offs = torch.arange(-1, p + 1, device=dev)
    ys = (li // gw)[:, None] * p + offs  # [M, p + 2] rows of each patch and its rim
    xs = (li % gw)[:, None] * p + offs
    ys = torch.where(ys < 0, -ys, torch.where(ys >= h, 2 * h - 2 - ys, ys))  # reflect padding
    xs = torch.where(xs < 0, -xs, torch.where(xs >= w, 2 * w - 2 - xs, xs))
    a = imgs[bi[:, None, None], :, ys[:, :, None], xs[:, None, :]].float().permute(0, 3, 1, 2)  # [M, C, p+2, p+2]
    # Sobel as sums of differences of mirrored taps: exactly 0 where reflect padding mirrors them (image borders)
    top, mid, bot = a[..., :-2, :], a[..., 1:-1, :], a[..., 2:, :]
    gx = (top[..., :-2] - top[..., 2:]) + 2 * (mid[..., :-2] - mid[..., 2:]) + (bot[..., :-2] - bot[..., 2:])
    gy = (top[..., :-2] - bot[..., :-2]) + 2 * (top[..., 1:-1] - bot[..., 1:-1]) + (top[..., 2:] - bot[..., 2:])
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1)  # [M, C, p, p]
    if window is not None:
        s = window.shape[0]
        mag = mag * window[(ys[:, 1:-1] % s)[:, :, None], (xs[:, 1:-1] % s)[:, None, :]].unsqueeze(1)
    bins = orientation_bins(gx, gy, nbins)
    hist = torch.zeros(bi.numel(), c, nbins, p, p, device=dev).scatter_add_(2, bins.unsqueeze(2), mag.unsqueeze(2))
    hist = hist.view(-1, c, nbins, k, cell_size, k, cell_size).sum(dim=(4, 6))  # [M, C, bins, K, K]
    out[bi, li] = torch.nn.functional.normalize(hist, p=2, dim=2).flatten(1)
    return out


def _fwd(
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: int,
    cell_size: int,
    nbins: int,
    gaussian_window: int,
) -> torch.Tensor:
    window = hog_gaussian_window(gaussian_window, imgs.device) if gaussian_window else None
    if choose_backend(_OP, imgs.device, (imgs.dtype,)) == "triton":
        return _triton_hog().hog_fwd(imgs, mask, window, patch_size, cell_size, nbins)
    return _hog_torch(imgs, mask, window, patch_size, cell_size, nbins)


def _raw_check(imgs, mask, patch_size, cell_size, nbins, gaussian_window) -> None:
    """The raw op's shapes: imgs [B, C, H, W] in whole patches of whole cells, mask [B, L] (the public function
    checks the rest)."""
    check_shape(_OP, "imgs", imgs, (None, None, None, None))
    b, _, h, w = imgs.shape
    if min(patch_size, cell_size, nbins) < 1 or patch_size % cell_size or h % patch_size or w % patch_size \
            or h < 2 or w < 2 or nbins > 16:  # fmt: skip
        raise ValueError(f"{_OP}: image size {h}x{w}, patch_size {patch_size}, cell_size {cell_size} and nbins "
                         f"{nbins} do not fit (whole patches of whole cells, at least 2x2 pixels, at most 16 "
                         "bins)")  # fmt: skip
    if gaussian_window < 0 or gaussian_window and (h % gaussian_window or w % gaussian_window):
        raise ValueError(f"{_OP}: gaussian_window {gaussian_window} must be 0 (none) or divide the image size "
                         f"{h}x{w}")  # fmt: skip
    check_shape(_OP, "mask", mask, (b, (h // patch_size) * (w // patch_size)))


_hog_op = custom_op("fastmim::hog_target", _fwd, _raw_check)


@_hog_op.register_fake
def _(imgs, mask, patch_size, cell_size, nbins, gaussian_window):
    b, c, h, w = imgs.shape
    k = patch_size // cell_size
    return imgs.new_empty((b, (h // patch_size) * (w // patch_size), c * nbins * k * k), dtype=torch.float32)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{_OP}: {name} must be a positive int, got {v!r}")
    return v


def hog_target(
    imgs: torch.Tensor,
    mask: torch.Tensor | None = None,
    patch_size: int = 16,
    cell_size: int = 8,
    nbins: int = 9,
    gaussian_window: int = 0,
) -> torch.Tensor:
    """MaskFeat's HOG features of the masked patches (see ``hog_target_ref`` for the formula).

    Args:
        imgs: [B, C, H, W], the normalised images the encoder sees; H, W multiples of patch_size, at least 2.
        mask: [B, L] (or [B, gh, gw]) bool or 0/1, True/1 = masked: the patches to compute; None: all.
        patch_size: token side in pixels; a multiple of cell_size.
        cell_size: HOG cell side (MaskFeat: 8).
        nbins: unsigned orientation bins (MaskFeat: 9; at most 16).
        gaussian_window: side of the Gaussian window multiplied into the magnitudes (0: none, the official image
            model; mmpretrain's MaskFeat uses 16); must divide H and W.
    Returns: [B, L, C * nbins * (patch_size / cell_size)^2] fp32, zero rows where the patch is not masked.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        if mask is not None:
            raise NotImplementedError(
                "fastmim.ops.hog_target with a mask under torch.func transforms: use "
                "fastmim.ops.hog_target_ref (every patch) and select the masked ones"
            )
        return _reference.hog_target_ref(imgs.detach(), patch_size, cell_size, nbins, gaussian_window)  # (a target)
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        raise ValueError(f"{_OP}: imgs must be [B, C, H, W], got {getattr(imgs, 'shape', type(imgs).__name__)}")
    check_float(_OP, "imgs", imgs)
    for name, v in (("patch_size", patch_size), ("cell_size", cell_size), ("nbins", nbins)):
        _positive_int(name, v)
    if nbins > 16:
        raise ValueError(f"{_OP}: nbins must be at most 16, got {nbins}")
    if patch_size % cell_size:
        raise ValueError(f"{_OP}: patch_size {patch_size} is not a multiple of cell_size {cell_size}")
    b, c, h, w = imgs.shape
    check_image_grid(_OP, imgs, patch_size)
    if h < 2 or w < 2:
        raise ValueError(f"{_OP}: image size {h}x{w} is too small: the Sobel gradients need at least 2x2 pixels")
    if isinstance(gaussian_window, bool) or not isinstance(gaussian_window, int) or gaussian_window < 0:
        raise ValueError(f"{_OP}: gaussian_window must be an int >= 0, got {gaussian_window!r}")
    if gaussian_window and (h % gaussian_window or w % gaussian_window):
        raise ValueError(f"{_OP}: gaussian_window {gaussian_window} must divide the image size {h}x{w}")
    n = (h // patch_size) * (w // patch_size)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.numel() != b * n or mask.shape[0] != b:
            raise ValueError(f"{_OP}: mask must be [B, L] = [{b}, {n}], got {getattr(mask, 'shape', mask)}")
        check_device(_OP, "mask", mask, imgs.device)
        mask = mask.reshape(b, n).to(torch.bool)
    imgs = imgs.detach()
    if use_custom_op():
        return _hog_op(imgs, mask, patch_size, cell_size, nbins, gaussian_window)
    return _fwd(imgs, mask, patch_size, cell_size, nbins, gaussian_window)
