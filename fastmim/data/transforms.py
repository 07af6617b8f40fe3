"""MAE's pretraining augmentation and the fixed view used for reconstruction images."""

from __future__ import annotations

import torch
from torchvision import transforms as T

from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "eval_transform", "pretrain_transform"]


def pretrain_transform(img_size: int, crop_min: float = 0.2) -> T.Compose:
    """RandomResizedCrop(scale crop_min-1 (MAE: 0.2), bicubic) + horizontal flip + ImageNet normalisation."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(crop_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(img_size: int, crop_pct: float = 1.0, normalize: bool = True) -> T.Compose:
    """Resize (bicubic, the short side to img_size / crop_pct; evaluation protocols: 0.875, 224 from 256) + centre crop
    + ImageNet normalisation: a deterministic view. ``normalize=False``: uint8 [3, H, W], to normalise later."""
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else [T.PILToTensor()]
    size = round(img_size / crop_pct)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size), *tail])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] normalised -> [0, 1] pixels."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)
