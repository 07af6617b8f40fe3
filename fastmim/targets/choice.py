"""The target a ViT recipe predicts, chosen by name: the recipes' ``target`` argument (``--model-args target=...``).

- "pixels": the image itself, with the recipe's own pixel loss (MAE: norm-pix MSE per masked patch; SimMIM and
  A2MIM: L1 on the masked pixels).
- "lowpass": the same pixel loss on PixMIM's low-frequency image (``low_pass_images``; ``low_pass_radius``, None:
  40 x side / 224 as PixMIM).
- "hog": MaskFeat's HOG features of each masked patch (``HOGTarget``; ``hog_cell``, None: half the patch;
  ``hog_bins``, None: 9; ``gaussian_window``, None: none);
  the head predicts them and the loss is their plain MSE over the masked patches.

So a recipe is its Mask and Encoder with any of these Targets: MAE's encoder and decoder on HOG or low-pass targets,
SimMIM's encoder on HOG (a linear head, as MaskFeat) or low-pass targets.
"""

from __future__ import annotations

import torch

from fastmim._args import check_int, check_number
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmim.ops import masked_mse_loss_patchified, masked_mse_loss_patchified_ref
from fastmim.targets.hog import HOGTarget
from fastmim.targets.low_pass import default_radius, low_pass_images

TARGETS = ("pixels", "lowpass", "hog")


class TargetChoice:
    """Mixed into a ViT recipe that has ``patch_size``, ``in_chans``, ``grid_size`` and ``fused_ops``; ``set_target``
    in its ``__init__`` picks the target, then ``target_images`` gives the images a pixel loss compares with and
    ``hog_loss`` the HOG target's loss."""

    target = "pixels"

    def set_target(self, target: str, hog_cell: int | None = None, hog_bins: int | None = None,
                   gaussian_window: int | None = None, low_pass_radius: float | None = None,
                   image_mean=None, image_std=None) -> int:  # fmt: skip
        """Sets the target; returns the values per token the head predicts (p * p * C pixels, or the HOG size).
        ``hog_*`` and ``gaussian_window`` (None: half the patch, 9 bins, no window) are the HOG target's;
        ``image_mean`` / ``image_std`` (None: ImageNet's) the normalisation the images carry, which the low-pass
        target undoes before filtering (the filtered image is not the same for another normalisation)."""
        name = type(self).__name__
        if target not in TARGETS:
            raise ValueError(f"{name}: target must be one of {', '.join(TARGETS)}, got {target!r}")
        given = {"hog_cell": hog_cell, "hog_bins": hog_bins, "gaussian_window": gaussian_window,
                 "low_pass_radius": low_pass_radius, "image_mean": image_mean, "image_std": image_std}  # fmt: skip
        for key, value in given.items():
            applies = "lowpass" if key in ("low_pass_radius", "image_mean", "image_std") else "hog"
            if value is not None and target != applies:
                raise ValueError(f"{name}: {key} applies to target='{applies}', not {target!r}")
        self.target = target
        p = self.patch_size
        if target == "hog":
            cell = p // 2 if hog_cell is None else check_int(name, "hog_cell", hog_cell)
            if p % cell:
                raise ValueError(f"{name}: the patch size {p} must be a multiple of hog_cell, got {hog_cell!r}")
            bins = 9 if hog_bins is None else check_int(name, "hog_bins", hog_bins)  # (2.5 failed deep in torch)
            window = 0 if gaussian_window is None else check_int(name, "gaussian_window", gaussian_window, lo=0)
            self.hog = HOGTarget(p, self.in_chans, cell, bins, window, fused=self.fused_ops)
            self.predicts_pixels = False  # the trainer shows no reconstructions
            return self.hog.dim
        if target == "lowpass":
            if (image_mean is None) != (image_std is None):
                raise ValueError(f"{name}: give image_mean and image_std together (the images' normalisation)")
            if image_mean is None and self.in_chans != len(IMAGENET_MEAN):  # (undone before the filter)
                raise ValueError(f"{name}: the low-pass target un-normalises the images with ImageNet's 3-channel mean "
                                 f"and std by default; for in_chans={self.in_chans} give image_mean and image_std "
                                 f"({self.in_chans} values each)")  # fmt: skip
            self.image_mean = IMAGENET_MEAN if image_mean is None else _channels(name, "image_mean", image_mean,
                                                                                 self.in_chans)  # fmt: skip
            self.image_std = IMAGENET_STD if image_std is None else _channels(name, "image_std", image_std,
                                                                              self.in_chans, positive=True)  # fmt: skip
            side = min(self.grid_size) * p
            if low_pass_radius is None:
                self.low_pass_radius = default_radius(side)
            else:
                self.low_pass_radius = check_number(name, "low_pass_radius", low_pass_radius, lo=1e-6)
            h, w = (g * p for g in self.grid_size)
            corner = (((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2) ** 0.5  # the farthest frequency from the centre
            if self.low_pass_radius >= corner:
                raise ValueError(f"{name}: low_pass_radius={low_pass_radius!r} keeps the whole spectrum of a {h}x{w} "
                                 f"image (its corner is {corner:.1f} from the centre): the target would be the image "
                                 f"itself; give a radius below {corner:.1f} (PixMIM's: {default_radius(side):g}), or "
                                 "target='pixels'")  # fmt: skip
        return p * p * self.in_chans

    def target_images(self, imgs: torch.Tensor) -> torch.Tensor:
        """The images a pixel or HOG target is read from: ``imgs``, or their low-frequency part (fp32, no gradient);
        a subclass may give others of the same shape (edges, another colour space)."""
        if self.target == "lowpass":
            return low_pass_images(imgs, self.low_pass_radius, self.image_mean, self.image_std, fused=self.fused_ops)
        return imgs

    def checked_target_images(self, imgs: torch.Tensor) -> torch.Tensor:
        """``target_images(imgs)``, refused by name unless it is a floating-point tensor of the images' shape (a
        subclass's own target of another shape failed in the loss, which blamed ``pred``)."""
        t = self.target_images(imgs)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != imgs.shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{type(self).__name__}.target_images(imgs) must give a floating-point tensor shaped as "
                             f"the images, {tuple(imgs.shape)} (the head predicts its patches), got {got}; a target "
                             "of another width replaces the head and forward_loss too")  # fmt: skip
        return t

    def hog_loss(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE of the predicted HOG features [B, N, dim] against the masked patches' (MaskFeat's loss)."""
        loss_fn = masked_mse_loss_patchified if self.fused_ops else masked_mse_loss_patchified_ref
        # (from target_images: a subclass's own images, such as edges, give their HOG; it was ignored, unsaid)
        return loss_fn(pred, self.hog(self.checked_target_images(imgs), mask), mask, norm_pix=False)


def _channels(who: str, name: str, values, channels: int, positive: bool = False) -> tuple[float, ...]:
    """A per-channel normalisation constant: ``channels`` finite numbers (> 0 where ``positive``)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != channels:
        raise ValueError(f"{who}: {name} must be {channels} numbers, one per channel, got {values!r}")
    out = tuple(check_number(who, name, v) for v in values)
    if positive and min(out) <= 0:
        raise ValueError(f"{who}: {name} must be > 0, got {values!r}")
    return out
