"""Frequency losses as a module: what a masked model's reconstruction is compared with in the Fourier domain.

``FrequencyLoss("batch", patch_size)(rec, imgs, mask)``: A2MIM's focal frequency loss of a reconstructed image
[B, C, H, W] (batch-averaged spectra; ``fastmim.ops.fft_loss``). ``FrequencyLoss("patch", patch_size)(pred, imgs,
mask)``: the patch-based focal frequency loss of predicted patches [B, L, p*p*C] (MAE's layout) on the masked patches
(each patch's own spectrum; ``fastmim.ops.patch_fft_loss``). ``fused=False`` runs the official computations
(``*_ref``), which give the same values.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmim.ops import fft_loss, fft_loss_ref, patch_fft_loss, patch_fft_loss_ref

KINDS = ("batch", "patch")


class FrequencyLoss(nn.Module):
    """No parameters.

    Args:
        kind: "batch" (A2MIM: whole images, spectra averaged over the batch) or "patch" (each masked patch).
        patch_size: the mask's token side in pixels.
        alpha, log_weights: the patch loss's weight exponent and log weighting (``patch_fft_loss``).
        fused: fastmim.ops (True) or the official computation.
    """

    def __init__(self, kind: str = "batch", patch_size: int = 16, alpha: float = 1.0, log_weights: bool = True,
                 fused: bool = True):  # fmt: skip
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"FrequencyLoss: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.patch_size, self.fused = kind, patch_size, fused
        self.alpha, self.log_weights = alpha, log_weights

    def forward(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """pred: [B, C, H, W] ("batch") or [B, L, p*p*C] ("patch"); imgs [B, C, H, W]; mask [B, L] (1 = masked)."""
        if self.kind == "batch":
            return (fft_loss if self.fused else fft_loss_ref)(pred, imgs, mask, self.patch_size)
        if mask is None:
            raise ValueError("FrequencyLoss('patch') needs the mask: it compares the masked patches only")
        fn = patch_fft_loss if self.fused else patch_fft_loss_ref
        return fn(pred, imgs, mask, self.patch_size, self.alpha, self.log_weights)
