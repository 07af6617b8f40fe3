"""Draws masks over a photo, one tile per sample, into a PNG: a quick look at what a mask strategy hides.

    python -m fastmim.masking.show --strategy block --ratio 0.4                   # -> masks_block.png
    python -m fastmim.masking.show --strategy multiblock --param num_targets=3 --num 4
    python -m fastmim.masking.show --strategy uniform --param secondary_ratio=0.5 --image cat.jpg --out um.png
    python -m fastmim.masking.show --strategy tube --ratio 0.9 --param frames=4 --num 3

Hidden tokens are darkened. multiblock: the context block is tinted cyan and each target block has its own colour
(filled and outlined), the other tokens are darkened. uniform: the secondary tokens (visible, but fed to the encoder
as mask tokens) are tinted orange. tube: each row is one sample, its frames side by side.

The image is the first of the built-in sample photos (scikit-image's, as fastmim's default dataset finds them) or
``--image``, center-cropped and resized to 16 px per token. attention and hardpatch need a per-token score: the
demo score is each token's pixel variance in the image ("hard = textured"), the same for every sample.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from fastmim.masking.base import IMPLS, Masks
from fastmim.masking.strategies import STRATEGIES, build_mask, strategy_params

PX = 16  # pixels per token in the drawing
GAP = 4  # pixels between tiles and around the canvas
LEGEND_H = 22  # the legend strip under the tiles
HIDDEN_GAIN = 0.3  # hidden tokens keep this much of their brightness
BACKGROUND = (255, 255, 255)
CONTEXT = (0, 200, 255)
SECONDARY = (255, 140, 0)
TARGETS = ((228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (255, 255, 51),
           (166, 86, 40), (247, 129, 191))  # fmt: skip


def default_image_path() -> Path:
    """The first of the built-in sample photos (``fastmim.data.samples.SAMPLE_PHOTOS`` in scikit-image's data)."""
    from fastmim.data import samples

    src = samples._skimage_data_dir()
    for name in samples.SAMPLE_PHOTOS:
        if (src / name).is_file():
            return src / name
    raise RuntimeError(f"found none of scikit-image's sample photos in {src}; pass --image PATH")


def load_image(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8: the image center-cropped to the aspect of ``size`` (height, width) and resized to it."""
    path = Path(path) if path is not None else default_image_path()
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    with Image.open(path) as img:
        img = ImageOps.fit(img.convert("RGB"), (size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def demo_scores(image: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """[H*W] float: each token's pixel variance (grey levels in [0, 1]): high where the image is textured."""
    h, w = grid
    grey = image.astype(np.float64).mean(-1) / 255.0
    patches = grey.reshape(h, grey.shape[0] // h, w, grey.shape[1] // w).transpose(0, 2, 1, 3).reshape(h * w, -1)
    return torch.from_numpy(patches.var(axis=1)).float()


def _up(m: np.ndarray) -> np.ndarray:
    """[H, W] token map -> [H*PX, W*PX] pixel map."""
    return np.repeat(np.repeat(m, PX, axis=0), PX, axis=1)


def _tint(img: np.ndarray, where: np.ndarray, colour, alpha: float) -> None:
    img[where] = (1.0 - alpha) * img[where] + alpha * np.asarray(colour, dtype=np.float32)


def _bbox(m: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def render_tile(image: np.ndarray, mask: np.ndarray, targets: np.ndarray | None = None,
                secondary: np.ndarray | None = None) -> Image.Image:  # fmt: skip
    """One sample: ``mask`` [H, W] bool (True = hidden), optional ``targets`` [K, H, W] and ``secondary`` [H, W]."""
    img = image.astype(np.float32)
    hidden = mask if targets is None else mask & ~targets.any(0)
    img[_up(hidden)] *= HIDDEN_GAIN
    if targets is not None:
        _tint(img, _up(~mask), CONTEXT, 0.25)
        for k, t in enumerate(targets):
            _tint(img, _up(t), TARGETS[k % len(TARGETS)], 0.5)
    if secondary is not None:
        _tint(img, _up(secondary), SECONDARY, 0.6)
    tile = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    if targets is not None:  # outlines: overlapping target blocks stay readable
        draw = ImageDraw.Draw(tile)
        for k, t in enumerate(targets):
            box = _bbox(t)
            if box is not None:
                y0, x0, y1, x1 = (v * PX for v in box)
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=TARGETS[k % len(TARGETS)], width=2)
    return tile


def canvas_size(tile: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of ``rows`` x ``cols`` tiles of (height, width) ``tile`` with the legend."""
    return cols * tile[1] + (cols + 1) * GAP, rows * tile[0] + (rows + 1) * GAP + LEGEND_H


def legend(strategy: str, masks: Masks) -> list[tuple[tuple[int, int, int] | None, str]]:
    """(swatch colour or None, label) pairs, the strategy's name first."""
    title = strategy + (" (demo score: token pixel variance)" if STRATEGIES[strategy].inputs else "")
    items: list[tuple[tuple[int, int, int] | None, str]] = [(None, title + ":"), ((60, 60, 60), "hidden")]
    if masks.targets is not None:
        items[1:] = [((60, 60, 60), "hidden, not a target"), (CONTEXT, "context")]
        items += [(TARGETS[k % len(TARGETS)], f"target {k + 1}") for k in range(masks.targets.shape[1])]
    if masks.secondary is not None:
        items.append((SECONDARY, "secondary (mask token)"))
    if strategy == "tube":
        items.append((None, "rows: samples, columns: frames"))
    return items


def draw_grid(image: np.ndarray, masks: Masks, strategy: str, cols: int | None = None) -> Image.Image:
    """The PNG canvas: one tile per sample (tube: a row per sample, a tile per frame) and a legend strip."""
    mask = masks.mask.cpu().numpy()
    targets = None if masks.targets is None else masks.targets.cpu().numpy()
    secondary = None if masks.secondary is None else masks.secondary.cpu().numpy()
    tiles: list[Image.Image] = []
    if mask.ndim == 4:  # tube: [B, T, H, W]
        rows, cols = mask.shape[0], mask.shape[1]
        tiles = [render_tile(image, frame) for sample in mask for frame in sample]
    else:
        n = mask.shape[0]
        cols = max(1, min(n, cols or 4))
        rows = math.ceil(n / cols)
        for i in range(n):
            tiles.append(render_tile(image, mask[i], None if targets is None else targets[i],
                                     None if secondary is None else secondary[i]))  # fmt: skip
    th, tw = image.shape[:2]
    canvas = Image.new("RGB", canvas_size((th, tw), rows, cols), BACKGROUND)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas.paste(tile, (GAP + c * (tw + GAP), GAP + r * (th + GAP)))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x, y = GAP, canvas.height - LEGEND_H + 3
    for colour, label in legend(strategy, masks):
        if colour is not None:
            draw.rectangle((x, y + 2, x + 11, y + 13), fill=colour, outline=(0, 0, 0))
            x += 15
        draw.text((x, y + 1), label, fill=(0, 0, 0), font=font)
        x += int(draw.textlength(label, font=font)) + 12
    return canvas


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or HxW (e.g. 14 or 12x16), got {text!r}")
    return parts[0], parts[1]


def _parse_param(text: str) -> tuple[str, object]:
    from fastmim.config import key_value

    try:
        return key_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastmim.masking.show", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--strategy", required=True, help=f"the mask strategy: {', '.join(STRATEGIES)}")
    ap.add_argument("--ratio", type=float, default=None,
                    help="the strategy's ratio parameter (its default when left out); uniform and multiblock have "
                    "none: set their parameters with --param")  # fmt: skip
    ap.add_argument("--grid", type=_parse_grid, default=(14, 14), help="token grid: 14 or HxW (default 14)")
    ap.add_argument("--num", type=int, default=8, help="masks to draw: samples 0..num-1 (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="the strategy's seed (default 0)")
    ap.add_argument("--impl", choices=IMPLS, default="torch", help="implementation that draws the masks (default "
                    "torch)")  # fmt: skip
    ap.add_argument("--image", default=None, help="image to draw on (default: the first built-in sample photo, "
                    "scikit-image's astronaut); center-cropped to 16 px per token")  # fmt: skip
    ap.add_argument("--cols", type=int, default=None, help="tiles per row (default: up to 4; tube: one per frame)")
    ap.add_argument("--out", default=None, help="output PNG (default masks_<strategy>.png)")
    ap.add_argument("--param", type=_parse_param, action="append", default=[], metavar="KEY=VALUE",
                    help="a strategy parameter, repeatable (Python literals: --param target_scale=(0.15,0.2)). "
                    "attention and hardpatch get a demo per-token score: the image's pixel variance in each token "
                    "(textured = high score / hard)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.strategy not in STRATEGIES:
        ap.error(f"unknown strategy {args.strategy!r}; choose from {', '.join(STRATEGIES)}")
    if args.num < 1:
        ap.error(f"--num must be at least 1, got {args.num}")
    if args.cols is not None and args.cols < 1:
        ap.error(f"--cols must be at least 1, got {args.cols}")
    params = dict(args.param)
    if len(params) != len(args.param):
        ap.error("--param: a key is given twice")
    for reserved in ("seed", "impl", "grid"):
        if reserved in params:
            ap.error(f"--param {reserved}=...: use --{reserved}")
    cls = STRATEGIES[args.strategy]
    if args.ratio is not None:
        names = sorted(strategy_params(cls))
        if "ratio" not in names:
            ap.error(f"--ratio: the {args.strategy} strategy has no ratio parameter; set its parameters with "
                     f"--param KEY=VALUE ({', '.join(names)})")  # fmt: skip
        if "ratio" in params:
            ap.error("--ratio and --param ratio=... both given")
        params["ratio"] = args.ratio
    try:
        strategy = build_mask(args.strategy, args.grid, seed=args.seed, impl=args.impl, **params)
    except (TypeError, ValueError, RuntimeError) as e:
        ap.error(f"{args.strategy}: {e}")
    h, w = strategy.grid
    try:
        image = load_image(args.image, (h * PX, w * PX))
    except (OSError, RuntimeError) as e:
        ap.error(f"--image: {e}")
    inputs = {}
    if strategy.inputs:
        scores = demo_scores(image, (h, w)).expand(args.num, -1)
        inputs = {name: scores for name in strategy.inputs}
    try:
        masks = strategy(args.num, **inputs)
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError) as e:  # e.g. no C++ build
        ap.error(f"{args.strategy} (impl={args.impl}): {e}")
    out = Path(args.out or f"masks_{args.strategy}.png")
    if out.is_dir() or out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        ap.error(f"--out {str(out)!r}: name an image file (.png, .jpg, ...)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_grid(image, masks, args.strategy, args.cols).save(out)
    except OSError as e:
        ap.error(f"--out {str(out)!r}: cannot write it ({e.strerror or e})")
    hidden = masks.mask.flatten(1).sum(1).float()
    per = masks.mask.shape[0] // max(args.num, 1)  # (a strategy drawing several masks per image: num_masks)
    count = f"{args.num} images x {per} masks" if per > 1 else f"{args.num} masks"
    print(f"{args.strategy} (impl {args.impl}, {h}x{w} grid): {count}, {hidden.mean():.1f} of "
          f"{masks.mask[0].numel()} tokens hidden on average", file=sys.stderr)  # fmt: skip
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
