"""``nn.Module`` forms of the fused ops, for code that composes losses and layers as modules (a ``criterion=``
argument, an ``nn.Sequential``). Each holds its settings (and GRN its parameters) and calls the functional op."""

from __future__ import annotations

import torch
from torch import nn

from fastmim._args import check_bool, check_int, check_number
from fastmim.ops._dispatch import check_patch_size
from fastmim.ops.fft_loss import fft_loss
from fastmim.ops.grn import grn
from fastmim.ops.hog import hog_target
from fastmim.ops.low_pass import low_pass_target
from fastmim.ops.masked_loss import masked_mse_loss, masked_mse_loss_patchified
from fastmim.ops.patch_fft_loss import patch_fft_loss

__all__ = ["GRN", "FFTLoss", "HOGTarget", "LowPassTarget", "MaskedL1Loss", "MaskedMSELoss", "PatchFFTLoss"]


class MaskedMSELoss(nn.Module):
    """MAE's loss over the masked patches (``masked_mse_loss``): ``forward(pred [B, L, p*p*C], target, mask [B, L])``
    with ``target`` images [B, C, H, W] (patchified on the fly, never copied) or patches [B, L, D]
    (``masked_mse_loss_patchified``: HOG, teacher tokens).

    Args: patch_size (for image targets); norm_pix: normalise each target patch by its mean and unbiased variance
    (MAE's ``norm_pix_loss``); eps; p: 2 (squared error) or 1 (absolute error)."""

    def __init__(self, patch_size: int | None = None, norm_pix: bool = True, eps: float = 1e-6, p: int = 2):
        super().__init__()
        name = type(self).__name__  # (the settings are checked here, not at the first call)
        if type(p) is not int or p not in (1, 2):
            raise ValueError(f"{name}: p must be the int 1 or 2, got {p!r}")
        if patch_size is not None:
            check_patch_size(name, patch_size)
        check_bool(name, "norm_pix", norm_pix)
        check_number(name, "eps", eps, lo=0.0)
        self.patch_size, self.norm_pix, self.eps, self.p = patch_size, norm_pix, eps, p

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if target.dim() == 3:
            return masked_mse_loss_patchified(pred, target, mask, self.norm_pix, self.eps, self.p)
        if self.patch_size is None:
            raise ValueError(f"{type(self).__name__}: image targets [B, C, H, W] need patch_size")
        return masked_mse_loss(pred, target, mask, self.patch_size, self.norm_pix, self.eps, self.p)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}, eps={self.eps}, p={self.p}"


class MaskedL1Loss(MaskedMSELoss):
    """``MaskedMSELoss`` with the absolute error (SimMIM's L1 over masked pixels, per patch)."""

    def __init__(self, patch_size: int | None = None, norm_pix: bool = False, eps: float = 1e-6):
        super().__init__(patch_size, norm_pix, eps, p=1)


class FFTLoss(nn.Module):
    """A2MIM's Fourier-domain loss (``fft_loss``): ``forward(pred, target, mask=None)`` on [B, C, H, W] images."""

    def __init__(self, patch_size: int | None = None):
        super().__init__()
        if patch_size is not None:
            check_patch_size(type(self).__name__, patch_size)
        self.patch_size = patch_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return fft_loss(pred, target, mask, self.patch_size)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


class PatchFFTLoss(nn.Module):
    """The patch-wise focal frequency loss (``patch_fft_loss``): ``forward(pred [B, L, p*p*C], imgs, mask)``."""

    def __init__(self, patch_size: int, alpha: float = 1.0, log_weights: bool = True):
        super().__init__()
        check_patch_size(type(self).__name__, patch_size)
        if check_number(type(self).__name__, "alpha", alpha, lo=0.0) == 0:
            raise ValueError(f"{type(self).__name__}: alpha must be a finite number > 0, got {alpha!r}")
        check_bool(type(self).__name__, "log_weights", log_weights)
        self.patch_size, self.alpha, self.log_weights = patch_size, alpha, log_weights

    def forward(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return patch_fft_loss(pred, imgs, mask, self.patch_size, self.alpha, self.log_weights)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, alpha={self.alpha}, log_weights={self.log_weights}"


class HOGTarget(nn.Module):
    """MaskFeat's HOG target (``hog_target``): ``forward(imgs, mask=None)`` -> [B, L, features per patch]."""

    def __init__(self, patch_size: int = 16, cell_size: int = 8, nbins: int = 9, gaussian_window: int = 0):
        super().__init__()
        name = type(self).__name__
        check_patch_size(name, patch_size)
        check_int(name, "cell_size", cell_size)
        check_int(name, "nbins", nbins)
        check_int(name, "gaussian_window", gaussian_window, lo=0)
        self.patch_size, self.cell_size, self.nbins, self.gaussian_window = (
            patch_size,
            cell_size,
            nbins,
            gaussian_window,
        )

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return hog_target(imgs, mask, self.patch_size, self.cell_size, self.nbins, self.gaussian_window)

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, cell_size={self.cell_size}, nbins={self.nbins}, "
                f"gaussian_window={self.gaussian_window}")  # fmt: skip


class LowPassTarget(nn.Module):
    """PixMIM's low-pass target (``low_pass_target``): ``forward(imgs)`` with the images' normalisation undone and
    redone around the filter."""

    def __init__(self, radius: float, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        check_number(type(self).__name__, "radius", radius, lo=0.0)
        if len(tuple(mean)) != len(tuple(std)):
            raise ValueError(f"{type(self).__name__}: mean and std need one value per channel each, got "
                             f"{len(tuple(mean))} and {len(tuple(std))}")  # fmt: skip
        self.radius, self.mean, self.std = radius, tuple(mean), tuple(std)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return low_pass_target(imgs, self.radius, self.mean, self.std)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, mean={self.mean}, std={self.std}"


class GRN(nn.Module):
    """ConvNeXt V2's Global Response Norm on [B, N, C] rows (or channels-last [B, H, W, C]), fused (``grn``);
    parameters ``weight`` and ``bias`` [C] as timm's, zero-initialised (the identity)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        check_int("GRN", "dim", dim)
        self.eps = check_number("GRN", "eps", eps, lo=0.0)
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            dim = self.weight.shape[0]
            if x.shape[-1] != dim and x.shape[1] == dim:
                raise ValueError(f"GRN({dim}) takes channels-last images [B, H, W, C], got shape {tuple(x.shape)}: "
                                 "channels first? pass x.permute(0, 2, 3, 1)")  # fmt: skip
            return grn(x.reshape(x.shape[0], -1, x.shape[-1]), self.weight, self.bias, self.eps).view(x.shape)
        return grn(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}"
