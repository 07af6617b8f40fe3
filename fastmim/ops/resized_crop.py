"""``resized_crop``: the random-resized-crop augmentation of a batch of decoded images of different sizes (crop,
antialiased bicubic or bilinear resize, mirror, normalise) in two Triton launches, for GPU-decoded training data.

Not differentiable (data augmentation) and not a ``torch.library`` op: its input is a list of differently-sized
images, which is the loader's business, not a compiled graph's.
"""

from __future__ import annotations

import functools

import torch

from fastmim.ops._dispatch import choose_backend
from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD, resized_crop_ref

_OP = "resized_crop"
INTERPS = ("bicubic", "bilinear")  # the filter radii: 2 and 1 input pixels (times the shrink factor)
_RADIUS = {"bicubic": 2, "bilinear": 1}


@functools.cache
def _triton_resized_crop():
    from fastmim.ops.triton import resized_crop

    return resized_crop


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(1 / (255 std), mean / std) per channel: ``(x / 255 - mean) / std`` as ``x * a - b``."""
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return (1 / (255 * s)).float().to(device), (m / s).float().to(device)


def _taps(lengths: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """How many filter taps an output position of an axis of each of ``lengths`` resized to ``size`` can have at
    most (PIL's support radius * max(length / size, 1) on either side, plus the rounding of its ends)."""
    return torch.ceil(2 * radius * torch.clamp(lengths.double() / size, min=1.0)).long() + 2


def resized_crop(
    images: list[torch.Tensor],
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    out_dtype: torch.dtype = torch.float32,
    interp: str = "bicubic",
) -> torch.Tensor:
    """Crops image n to ``boxes[n]``, resizes it to ``size x size`` (antialiased bicubic or bilinear, as torchvision's
    ``RandomResizedCrop`` on PIL images), mirrors it where ``flips[n]`` and normalises it: ``resized_crop_ref``.

    Args:
        images: N decoded images [C, H_n, W_n] on one device, uint8 (0-255; or float on that scale), any sizes.
        boxes: [N, 4] integer (top, left, height, width) inside each image, on the CPU (read on the host).
        flips: [N] bool, on the CPU.
        size: the output side S.
        mean, std: per-channel normalisation of ``x / 255`` (ImageNet's by default).
        out_dtype: float32 (default), bfloat16 or float16.
        interp: the resize filter, "bicubic" (MAE's crop) or "bilinear" (torchvision's default: SimMIM's, I-JEPA's).
    Returns: [N, C, S, S] ``out_dtype`` on the images' device.
    """
    n = len(images)
    if boxes.shape != (n, 4) or boxes.is_floating_point() or boxes.device.type != "cpu":
        raise ValueError(f"{_OP}: boxes must be a CPU integer tensor [{n}, 4], got {boxes.dtype} "
                         f"{tuple(boxes.shape)} on {boxes.device}")  # fmt: skip
    if flips.shape != (n,) or flips.device.type != "cpu":
        raise ValueError(f"{_OP}: flips must be a CPU tensor [{n}], got {tuple(flips.shape)} on {flips.device}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{_OP}: size must be a positive int, got {size!r}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{_OP}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if interp not in INTERPS:
        raise ValueError(f"{_OP}: interp must be one of {', '.join(INTERPS)}, got {interp!r}")
    if n == 0:
        return torch.empty(0, len(mean), size, size, dtype=out_dtype)
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.is_complex():
            what = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"{_OP}: image {i} is {what}; images must be real [C, H, W] tensors")
    device, dtype, c = images[0].device, images[0].dtype, images[0].shape[0]
    if len(mean) != c or len(std) != c or any(s == 0 for s in std):
        raise ValueError(f"{_OP}: mean and std need {c} values (std nonzero), got {mean}, {std}")
    for i, img in enumerate(images):
        if img.shape[0] != c or img.device != device or img.dtype != dtype:
            first = f"{dtype} {tuple(images[0].shape)} on {device}"
            raise ValueError(f"{_OP}: image {i} is {img.dtype} {tuple(img.shape)} on {img.device}; image 0 is "
                             f"{first}: all must be [{c}, H, W] alike")  # fmt: skip
    top, left, h, w = boxes.long().unbind(1)
    heights = torch.tensor([img.shape[1] for img in images])
    widths = torch.tensor([img.shape[2] for img in images])
    # (no sums of box values: top + h could wrap past int64 and pass; every value then fits the kernels' int32)
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (h > heights - top) | (w > widths - left)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{_OP}: box {i} {boxes[i].tolist()} (top, left, height, width) is not inside its "
                         f"{int(heights[i])}x{int(widths[i])} image")  # fmt: skip
    if choose_backend(_OP, device, (torch.float32,)) != "triton":
        return resized_crop_ref(images, boxes, flips, size, mean, std, interp).to(out_dtype)
    numel = heights * widths * c
    src_off = torch.cumsum(numel, 0) - numel
    tmp_rows = c * h * size
    tmp_off = torch.cumsum(tmp_rows, 0) - tmp_rows
    radius = _RADIUS[interp]
    cols = [src_off, heights, widths, top, left, h, w, tmp_off, flips.long(), _taps(w, size, radius),
            _taps(h, size, radius)]  # fmt: skip
    meta = torch.stack(cols, 1).to(device)
    src = torch.cat([img.reshape(-1) for img in images])  # [sum C*H*W]: one buffer the kernels index
    a, b = _affine(tuple(map(float, mean)), tuple(map(float, std)), device)
    out = torch.empty(n, c, size, size, dtype=out_dtype, device=device)
    return _triton_resized_crop().resized_crop_fwd(src, meta.contiguous(), int(tmp_rows.sum()), int(h.max()), a, b,
                                                   out, interp == "bilinear")  # fmt: skip
