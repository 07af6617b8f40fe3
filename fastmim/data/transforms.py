"""MAE's pretraining augmentation and the fixed view used for reconstruction images."""

from __future__ import annotations

import torch
from torchvision import transforms as T

from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "crop_and_flip", "denormalize", "eval_transform", "pretrain_transform"]


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


def pretrain_steps(transform: T.Compose) -> tuple[T.RandomResizedCrop, T.RandomHorizontalFlip]:
    """The crop and flip steps of ``pretrain_transform``; TypeError for a transform that does not start with them."""
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    ok = len(steps) >= 2 and isinstance(steps[0], T.RandomResizedCrop) and isinstance(steps[1], T.RandomHorizontalFlip)
    if not ok:
        raise TypeError(f"expected pretrain_transform (RandomResizedCrop, RandomHorizontalFlip, ...): {transform!r}")
    return steps[0], steps[1]


def crop_and_flip(transform: T.Compose, img) -> tuple[tuple[int, int, int, int], bool]:
    """What ``pretrain_transform`` draws for ``img`` (a PIL image, lazily opened: only its size is read): the
    (top, left, height, width) crop box and whether to mirror it, consuming torch's RNG exactly as the transform does,
    so a loader that crops elsewhere (on the GPU) sees the same crops as the CPU loader for the same seed."""
    crop, flip = pretrain_steps(transform)
    box = crop.get_params(img, crop.scale, crop.ratio)
    return box, bool(torch.rand(1) < flip.p)


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
