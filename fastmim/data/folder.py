"""Image folders: ImageNet-style class folders or a flat folder of images, read with PIL."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_images(root: str | Path) -> list[str]:
    """All image files below root (recursively, following class folders), sorted for a stable order.

    Raises:
        FileNotFoundError: root does not exist or is not a directory.
        ValueError: root holds no image file.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data path {str(root)!r} is not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise ValueError(f"data path {str(root)!r} holds no images (looked for {', '.join(IMG_EXTENSIONS)})")
    return sorted(files)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabelled images for masked-modeling pretraining; item i is ``transform(RGB image)``.

    Args:
        root: folder of images or of class folders of images.
        transform: applied to each PIL image.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None):
        self.root = str(root)
        self.files = list_images(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as e:  # PIL raises several types for truncated or non-image files
            raise RuntimeError(f"cannot read image {path!r}: {e}") from e

    def __getitem__(self, index: int):
        img = self.load(index)
        return self.transform(img) if self.transform is not None else img
