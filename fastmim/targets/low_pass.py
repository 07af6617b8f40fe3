"""PixMIM's low-frequency pixel target (Liu et al. 2023; mmselfsup's LowFreqTargetGenerator).

The normalised images are un-normalised to [0, 1], transformed (``fft2``), shifted (``fftshift``), kept inside an
ideal circle ``(i - (h-1)/2)^2 + (j - (w-1)/2)^2 <= r^2`` of the shifted spectrum, transformed back (``ifft2``,
without ``ifftshift``: the ``abs`` that follows removes the modulation the shift leaves) and normalised again. The
model then learns MAE's (norm-pix) reconstruction of these images instead of the raw ones.
"""

from __future__ import annotations

import torch

from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmim.ops import low_pass_target, low_pass_target_ref
from fastmim.ops.reference import low_pass_filter  # noqa: F401  (re-exported: the filter of the target)

# PixMIM's radius at 224 px; other sizes keep the same fraction of the spectrum
PIXMIM_RADIUS_224 = 40.0


def default_radius(img_size: int) -> float:
    """PixMIM's r = 40 at 224 px, scaled with the image side."""
    return PIXMIM_RADIUS_224 * img_size / 224


def low_pass_images(
    imgs: torch.Tensor, radius: float, mean=IMAGENET_MEAN, std=IMAGENET_STD, fused: bool = True
) -> torch.Tensor:
    """PixMIM's target: the low-frequency part of normalised images [B, C, H, W], normalised again (fp32); the fused
    ``fastmim.ops.low_pass_target``, or with ``fused=False`` the official computation (``low_pass_target_ref``: the
    same values; the plain-PyTorch path of ``--no-fused-ops`` and of the throughput benchmark's reference).

    Args:
        imgs: [B, C, H, W] images normalised with ``mean`` / ``std`` (C = len(mean)).
        radius: radius of the ideal circular filter in the shifted spectrum (PixMIM: 40 at 224 px).
        mean, std: the normalisation the images carry.
    """
    if fused:
        return low_pass_target(imgs, radius, mean, std)  # it checks the shapes, the radius and the normalisation
    return low_pass_target_ref(imgs.detach(), radius, mean, std)
