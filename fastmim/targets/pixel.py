"""Pixel targets: each patch's pixels in MAE's (p, q, c) order, optionally normalised per patch (norm-pix)."""

from __future__ import annotations

import torch

from fastmim.ops import masked_mse_loss
from fastmim.ops.reference import masked_mse_loss_ref, patch_stats_ref, patchify_ref, unpatchify_ref


class PixelTarget:
    """Target + loss for models that predict patch pixels [B, L, p*p*C] (MAE, FCMAE).

    Mixed into a model that has ``patch_size``, ``grid_size`` (gh, gw), ``in_chans``, ``norm_pix_loss`` and
    ``fused_ops`` (True: ``fastmim.ops.masked_mse_loss`` reads the targets straight from the images; False: the
    plain reference, the same value).
    """

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C]."""
        return patchify_ref(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        return unpatchify_ref(x, self.patch_size, self.grid_size, self.in_chans)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE against (norm-pix) targets; computed in fp32. A target that
        requires grad (images a user differentiates the loss by) takes the plain path, which carries it: the fused
        loss differentiates the prediction only (fused_ops changes the speed, never the gradients)."""
        carried = imgs.requires_grad and torch.is_grad_enabled()
        loss_fn = masked_mse_loss if self.fused_ops and not carried else masked_mse_loss_ref
        return loss_fn(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Prediction [B, L, p*p*C] back in the images' (normalised) pixel space: norm-pix is undone with each target
        patch's own mean and std, as MAE's visualisation does. Returns [B, C, H, W]."""
        if not getattr(self, "predicts_pixels", True):
            what = getattr(self, "target", "feature")
            raise ValueError(f"{type(self).__name__} predicts {what} targets, not pixels: there is no image to "
                             "reconstruct")  # fmt: skip
        if pred.dim() != 3 or pred.shape[0] != imgs.shape[0]:
            raise ValueError(f"reconstruct: pred must be [B, L, D] for the B={imgs.shape[0]} images given, got shape "
                             f"{tuple(pred.shape)}")  # fmt: skip
        pred = pred.float()
        if self.norm_pix_loss:
            mean, std = patch_stats_ref(self.patchify(imgs.float()))
            pred = pred * std + mean
        return self.unpatchify(pred)
