"""Reconstruction grids: original | masked | reconstruction, one row per image, in real pixel colours."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from fastmim.data.transforms import denormalize
from fastmim.train.checkpoint import atomic_write


class NotPixels(ValueError):
    """The model's predictions cannot be drawn as the image's patches."""


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[3, H', W'] image in [0, 1] for a batch of normalised images [B, 3, H, W].

    The mask is drawn from a fixed seed so successive grids of a run are comparable, without touching the training
    RNG. With norm-pix, predictions are de-normalised with each patch's own statistics before the pixels are shown.
    """
    was_training = model.training
    model.eval()
    devices = [imgs.device] if imgs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, pred, mask = model(imgs)
    model.train(was_training)
    try:
        recon = model.reconstruct(imgs, pred)  # [B, 3, H, W], normalised pixel space
    except ValueError as e:  # (a model of the user's own that predicts another target with pixel_target's head)
        raise NotPixels(f"the model's predictions {tuple(pred.shape)} are not pixel patches ({e}); a model class "
                        "with predicts_pixels = False, or --vis-interval 0, draws none") from e  # fmt: skip
    p = model.patch_size
    pix_mask = mask.reshape(-1, *model.grid_size, 1, 1).float()
    pix_mask = pix_mask.expand(-1, -1, -1, p, p).permute(0, 1, 3, 2, 4).reshape(imgs.shape[0], 1, *imgs.shape[-2:])
    original = denormalize(imgs.float())
    masked = original * (1 - pix_mask) + 0.5 * pix_mask  # removed patches shown grey
    pasted = original * (1 - pix_mask) + denormalize(recon) * pix_mask  # visible patches are the input's own
    rows = torch.stack([original, masked, pasted], dim=1).flatten(0, 1)  # [3B, 3, H, W]
    return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: str | Path) -> None:
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
