"""Where a simple-crop sample came from: an independent reconstruction of PixMIM's simple resized crop (PIL's
antialiased bilinear resize of the short side, NumPy's reflect padding) and a search over every window of it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def simple_crop_source(path, size: int, pad: int = 4, resample=Image.BILINEAR) -> np.ndarray:
    """The image at ``path`` with its short side resized to ``size`` (torchvision's size rule: the long side is
    ``int(size * long / short)``; PIL's ``resample`` filter) and reflect-padded by ``pad``: [H + 2 pad, W + 2 pad, 3]
    float64 in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        small = np.asarray(im.resize((nw, nh), resample), dtype=np.float64) / 255
    return np.pad(small, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")


def best_window(sample: torch.Tensor, source: np.ndarray) -> tuple[float, tuple[int, int, bool], tuple[int, int]]:
    """(max abs error in [0, 1] pixels, (top, left, flipped), (the largest top, the largest left)) of the window of
    ``source`` (``simple_crop_source``) closest to ``sample`` (a normalised [3, S, S] loader output)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    x = sample.double().cpu() * std + mean
    s = x.shape[-1]
    src = torch.from_numpy(source).permute(2, 0, 1)
    best = (float("inf"), None)
    for flipped in (False, True):
        windows = (src.flip(-1) if flipped else src).unfold(1, s, 1).unfold(2, s, 1)  # [3, tops, lefts, S, S]
        err = (windows - x[:, None, None]).abs().amax(dim=(0, 3, 4))
        i = int(err.argmin())
        top, left = divmod(i, err.shape[1])
        if float(err.min()) < best[0]:
            # a flipped sample's window, read in the unflipped source: left counted from the other side
            best = (float(err.min()), (top, err.shape[1] - 1 - left if flipped else left, flipped))
    return best[0], best[1], (src.shape[1] - s, src.shape[2] - s)
