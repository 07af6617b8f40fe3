"""The kNN monitor of ``python -m fastmim.pretrain --eval-data ROOT --eval-every N``: DINO's weighted kNN top-1/top-5 of
the encoder being trained, on a held-out labelled set whose images are decoded once and kept in memory (uint8), so
each evaluation costs only the encoder's forward passes over them."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fastmim.data import ShieldedLoader
from fastmim.eval.encoder import (
    LabelledFolder,
    _autocast,
    check_pool,
    eval_view,
    kept,
    load_encoder,
    pooled_features,
    recipe_pool,
)
from fastmim.eval.knn import knn_accuracy

MAX_BYTES = 4 << 30  # decoded images held in memory


def labelled_split(spec: str, flag: str = "--eval-data") -> tuple[Path, Path]:
    """``builtin:digits`` -> the built-in digits' (train, val); ``ROOT`` -> (ROOT/train, ROOT/val), each holding
    ``<class>/<image>`` folders (``flag``: the option the error names)."""
    if spec in ("builtin:digits", "builtin"):
        from fastmim.data.samples import builtin_digits

        return builtin_digits()
    root = Path(spec)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise ValueError(f"{flag} {spec!r}: expected ROOT/train/<class>/ and ROOT/val/<class>/ image folders "
                         "(ImageNet style), or builtin:digits" + (", or give --val-path too" if flag == "--data-path"
                                                                   else ""))  # fmt: skip
    return root / "train", root / "val"


def _decode_all(dataset: LabelledFolder, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (shielded: a scheduler's SIGTERM meanwhile must not kill a worker and end the run with a traceback)
    loader = ShieldedLoader(dataset, batch_size=64, shuffle=False, num_workers=workers)
    xs, ys = zip(*loader, strict=True)
    y, x = kept(torch.cat(ys), torch.cat(xs))  # (unreadable images a bad="drop" folder skipped: left out)
    return x, y


class KnnMonitor:
    """Args: spec (``labelled_split``); model: the recipe's name (its encoder is evaluated); img_size; device;
    k, temperature: DINO's 20 and 0.07; pool: the feature (``pooled_features``); workers: decoding processes; vit:
    the ViT's options (``fastmim.config.encoder_options``: layer scale, relative position bias, ...); skip_bad:
    unreadable images are named and left out (the run's --skip-bad-files) instead of stopping it."""

    def __init__(self, spec: str, model: str, img_size: int, device: torch.device, k: int = 20,
                 temperature: float = 0.07, pool: str = "auto", workers: int = 0, batch_size: int = 256,
                 vit: dict | None = None, skip_bad: bool = False):  # fmt: skip
        train_root, val_root = labelled_split(spec)
        from fastmim.data.transforms import eval_transform

        view = eval_transform(img_size, **eval_view(img_size, model), normalize=False)  # uint8: normalised later
        bad = "drop" if skip_bad else "raise"
        train = LabelledFolder(train_root, view, bad=bad)
        val = LabelledFolder(val_root, view, classes=train.classes, bad=bad)
        need = (len(train) + len(val)) * 3 * img_size * img_size
        if need > MAX_BYTES:
            raise ValueError(f"--eval-data {spec!r}: {len(train) + len(val)} images at {img_size} px take "
                             f"{need / 2**30:.1f} GiB decoded, over the monitor's {MAX_BYTES >> 30} GiB: use a "
                             "smaller labelled set (tens of images per class are enough to follow a run)")  # fmt: skip
        # neither the encoder's throw-away init nor the loaders' seeds may move the run's random numbers
        with torch.random.fork_rng(devices=[]):
            self.encoder, _ = load_encoder(None, model, img_size, vit=vit)
            self.train_x, self.train_y = _decode_all(train, workers)
            self.val_x, self.val_y = _decode_all(val, workers)
        for name, labels, folder in (("training", self.train_y, train), ("validation", self.val_y, val)):
            if not len(labels):  # (every image left out as unreadable: an accuracy of nothing)
                raise ValueError(f"--eval-data {spec!r}: no image of the {name} folder {str(folder.root)!r} can "
                                 "be read")  # fmt: skip
        self.encoder.requires_grad_(False)
        pool = recipe_pool(model, pool)  # the feature python -m fastmim.eval takes for this recipe's encoder
        if hasattr(self.encoder, "blocks"):
            check_pool(self.encoder, pool, "--eval-pool")
        self.num_classes, self.device = len(train.classes), device
        self.k, self.temperature, self.pool, self.batch_size = k, temperature, pool, batch_size
        self.spec, self.train_images, self.val_images = spec, len(self.train_y), len(self.val_y)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255
        out = []
        for chunk in x.split(self.batch_size):
            imgs = (chunk.to(self.device, non_blocking=True).float() - mean) / std
            with _autocast(self.device):
                out.append(pooled_features(self.encoder, imgs, self.pool).float())
        return torch.cat(out)

    def __call__(self, encoder_state: dict[str, torch.Tensor]) -> dict[str, float]:
        """kNN of the encoder holding ``encoder_state`` (the recipe's ``encoder_state_dict()``): knn_top1, knn_top5
        (%) and knn_s (seconds, weights copied in included)."""
        t0 = time.perf_counter()
        self.encoder.load_state_dict(encoder_state, strict=True)
        self.encoder.to(self.device).eval()
        try:
            train, val = self._features(self.train_x), self._features(self.val_x)
            acc = knn_accuracy(train, self.train_y.to(self.device), val, self.val_y, self.num_classes, self.k,
                               self.temperature)  # fmt: skip
        finally:
            self.encoder.to("cpu")  # the device's memory is the training's between evaluations
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"knn_top1": acc["top1"], "knn_top5": acc["top5"], "knn_s": time.perf_counter() - t0}
