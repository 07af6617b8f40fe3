"""MaskFeat's HOG target as a module: ``HOGTarget(patch_size, cell, bins, gaussian_window)(imgs, mask)`` ->
[B, N, C * bins * (patch_size / cell)^2] fp32, the masked patches' rows computed by ``fastmim.ops.hog_target`` (the
others zero), or every patch by the official whole-image computation (``fused=False``)."""

from __future__ import annotations

import torch
from torch import nn

from fastmim.ops import hog_target, hog_target_ref


class HOGTarget(nn.Module):
    """No parameters; ``dim`` is the feature size per patch (108 for MaskFeat's 16-px RGB patches)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, cell: int = 8, bins: int = 9, gaussian_window: int = 0,
                 fused: bool = True):  # fmt: skip
        super().__init__()
        if patch_size % cell:
            raise ValueError(f"HOGTarget: patch_size {patch_size} must be a multiple of the cell size {cell}")
        self.patch_size, self.cell, self.bins, self.gaussian_window = patch_size, cell, bins, gaussian_window
        self.fused = fused
        self.dim = in_chans * bins * (patch_size // cell) ** 2

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] (normalised), mask [B, L] (1 = masked) -> HOG features [B, L, dim], fp32, no gradient.
        Fused: only the masked patches are computed, the other rows are zeros; reference: every patch. Either way,
        weigh the loss with the mask (``masked_mse_loss_patchified``): a mean over all patches would be diluted."""
        if self.fused:
            return hog_target(imgs, mask, self.patch_size, self.cell, self.bins, self.gaussian_window)
        with torch.no_grad():
            return hog_target_ref(imgs, self.patch_size, self.cell, self.bins, self.gaussian_window)
