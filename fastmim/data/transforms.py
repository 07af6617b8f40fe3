"""MAE's pretraining augmentation and the fixed view used for reconstruction images."""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T

from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CROPS",
    "CROP_INTERPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIMPLE_CROP_PAD",
    "crop_and_flip",
    "denormalize",
    "eval_transform",
    "pretrain_transform",
]

# "random-resized": MAE's RandomResizedCrop; "simple": PixMIM's simple resized crop (DeiT III's SRC as mmselfsup's
# PixMIM config runs it: the short side resized to the output size, then a random square of it, reflect-padded)
CROPS = ("random-resized", "simple")
SIMPLE_CROP_PAD = 4  # the reflect padding of the simple crop on each side (mmselfsup: RandomCrop(padding=4))
CROP_INTERPS = ("bicubic", "bilinear")  # the crop's resize filter (PIL's antialiased ones)


def crop_interp(crop: str, interp: str | None = None) -> str:
    """The resize filter of ``crop``: ``interp``, or None: the crop's own (random-resized: bicubic, as MAE's;
    simple: bilinear, as mmselfsup's PixMIM). ValueError for another crop or filter."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if interp is not None and interp not in CROP_INTERPS:
        raise ValueError(f"crop_interp must be one of {', '.join(CROP_INTERPS)} (or None: the crop's own), got "
                         f"{interp!r}")  # fmt: skip
    return interp or ("bicubic" if crop == "random-resized" else "bilinear")


def pretrain_transform(
    img_size: int, crop_min: float = 0.2, hflip: float = 0.5, crop: str = "random-resized", interp: str | None = None
) -> T.Compose:
    """The pretraining augmentation: the crop, a horizontal flip with probability ``hflip`` (MAE 0.5, I-JEPA 0) and
    ImageNet normalisation. ``crop="random-resized"``: RandomResizedCrop(scale crop_min-1 (MAE: 0.2), aspect 3/4-4/3;
    bicubic, or ``interp="bilinear"`` (torchvision's default, which SimMIM and I-JEPA keep)). ``crop="simple"``
    (PixMIM): Resize(img_size: the short side; bilinear, or ``interp="bicubic"``; antialiased), then
    RandomCrop(img_size, padding=4, reflect), as mmselfsup's PixMIM pipeline; ``crop_min`` is not used."""
    mode = T.InterpolationMode(crop_interp(crop, interp))
    if crop == "random-resized":
        steps = [T.RandomResizedCrop(img_size, scale=(crop_min, 1.0), interpolation=mode)]
    else:
        steps = [
            T.Resize(img_size, interpolation=mode, antialias=True),
            T.RandomCrop(img_size, padding=SIMPLE_CROP_PAD, padding_mode="reflect"),
        ]
    return T.Compose(
        [
            *steps,
            T.RandomHorizontalFlip(p=hflip),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def pretrain_steps(transform: T.Compose) -> tuple[T.RandomResizedCrop, T.RandomHorizontalFlip]:
    """The crop and flip steps of ``pretrain_transform`` with the random-resized crop; TypeError for a transform that
    does not start with them (the simple crop, another transform, another filter than bicubic or bilinear)."""
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    ok = len(steps) >= 2 and isinstance(steps[0], T.RandomResizedCrop) and isinstance(steps[1], T.RandomHorizontalFlip)
    ok = ok and steps[0].interpolation.value in CROP_INTERPS
    if not ok:
        raise TypeError(
            "expected pretrain_transform with the random-resized crop (RandomResizedCrop, "
            f"RandomHorizontalFlip, ...), got {transform!r}"
        )
    return steps[0], steps[1]


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` for a width x height image, drawing from ``generator`` (None:
    torch's global generator): the (top, left, height, width) box. The same draws in the same order and precision
    (fp32 tensors), so a generator in the global generator's state gives get_params' box; tests/data check this
    against the installed torchvision. Up to ten tries of a random area fraction in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; then the centred crop of the whole image clamped to ``ratio``."""
    area = height * width
    log_lo, log_hi = (float(v) for v in torch.log(torch.tensor(ratio)))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    lo, hi = min(ratio), max(ratio)
    if width / height < lo:
        w, h = width, round(width / lo)
    elif width / height > hi:
        w, h = round(height * hi), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_steps(transform: T.Compose) -> tuple[str, str, float]:
    """(crop, filter, flip probability) of a ``pretrain_transform``: "random-resized" or "simple", "bicubic" or
    "bilinear". TypeError for another transform."""
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    try:
        crop, flip = pretrain_steps(transform)
        return "random-resized", crop.interpolation.value, flip.p
    except TypeError:
        pass
    simple = len(steps) >= 3 and isinstance(steps[0], T.Resize) and isinstance(steps[1], T.RandomCrop)
    simple = simple and isinstance(steps[2], T.RandomHorizontalFlip) and steps[0].interpolation.value in CROP_INTERPS
    simple = simple and steps[1].padding == SIMPLE_CROP_PAD and steps[1].padding_mode == "reflect"
    if not simple:
        raise TypeError(
            f"expected a pretrain_transform (random-resized or simple crop, then the flip), got {transform!r}"
        )
    return "simple", steps[0].interpolation.value, steps[2].p


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output (height, width): the short side ``size``, the long ``int(size * long /
    short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_and_flip(
    transform: T.Compose, img, generator: torch.Generator | None = None
) -> tuple[tuple[int, int, int, int], bool]:
    """What ``pretrain_transform`` draws for ``img`` (a PIL image, lazily opened: only its size is read): the crop
    box and whether to mirror it, the draws the transform makes, in its order, from ``generator`` (None: torch's
    global generator, as the transform itself), so a loader that crops elsewhere (on the GPU) sees the same crops as
    the CPU loader for the same seed. An explicit generator leaves the global one alone: nothing to lock against
    another thread's draws. The box: the random-resized crop's (top, left, height, width) in the image; the simple
    crop's (top, left) of its window in the resized image padded by ``SIMPLE_CROP_PAD``, and the resized (height,
    width)."""
    kind, _, p = crop_steps(transform)
    if kind == "random-resized":
        crop = transform.transforms[0]
        box = random_resized_crop_box(*img.size, crop.scale, crop.ratio, generator)
    else:  # RandomCrop.get_params on the padded resize: the row, then the column
        size = transform.transforms[1].size[0]
        h, w = resized_size(*img.size, size)
        top = int(torch.randint(0, h + 2 * SIMPLE_CROP_PAD - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, w + 2 * SIMPLE_CROP_PAD - size + 1, (1,), generator=generator))
        box = (top, left, h, w)
    return box, bool(torch.rand(1, generator=generator) < p)


def eval_transform(img_size: int, crop_pct: float = 1.0, normalize: bool = True, warp: bool = False) -> T.Compose:
    """Resize (bicubic, the short side to int(img_size / crop_pct), as MAE's ``build_transform``; evaluation protocols:
    0.875, 224 from 256) + centre crop + ImageNet normalisation: a deterministic view. ``warp``: the whole image
    resized to img_size x img_size instead, aspect not kept (ConvNeXt V2's view from 384 px). ``normalize=False``:
    uint8 [3, H, W], to normalise later."""
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else [T.PILToTensor()]
    if warp:
        return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC), *tail])
    size = int(img_size / crop_pct)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size), *tail])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] normalised -> [0, 1] pixels."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)
