"""BEiT-style block-wise masking: rectangles of random area and aspect ratio until a target count is masked.

Semantics follow BEiT's ``MaskingGenerator``: each block is tried up to ``max_attempts`` times with an area drawn
uniformly from ``[min_num_patches, remaining]`` and a log-uniform aspect ratio; a try counts only if it masks at least
one new cell and no more than the remaining budget, and only newly masked cells are counted. BEiT stops short when no
block fits (``exact=False``: on 14x14 with 75 hidden and blocks of 16+, 74.5 on average). ``exact=True`` (the
default, for recipes that drop the hidden tokens and need the same count in every sample) grows the blocks instead:
one random free cell next to a masked one at a time, which keeps BEiT's block statistics (scattered single cells
would add pieces: 1.8 connected pieces per mask instead of BEiT's 1.44).

``BlockMaskGenerator`` uses the C++ implementation in ``fastmim._C`` when it is built (multi-threaded over the
batch) and this module's ``block_mask_ref`` otherwise. The two draw from different random streams, so they agree on
the invariants, not bit for bit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from fastmim import _ext
from fastmim._args import as_int


@dataclass(frozen=True)
class BlockMaskConfig:
    """Args:
    height, width: token grid.
    num_masked: exact number of masked tokens per sample.
    min_num_patches: smallest block area tried.
    max_num_patches: largest block area (defaults to num_masked).
    min_aspect, max_aspect: aspect ratio range (max defaults to 1 / min_aspect).
    max_attempts: tries per block.
    exact: reach num_masked exactly by growing the blocks (False: stop short as BEiT does).
    """

    height: int
    width: int
    num_masked: int
    min_num_patches: int = 4
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None
    max_attempts: int = 10
    exact: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.exact, bool):
            raise TypeError(f"BlockMaskConfig.exact must be a bool, got {type(self.exact).__name__}")
        for name in ("height", "width", "num_masked", "min_num_patches", "max_attempts", "max_num_patches"):
            v = getattr(self, name)
            if name == "max_num_patches" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer):  # (a NaN, 30.5 or "30" too)
                raise TypeError(f"BlockMaskConfig.{name} must be an int, got {v!r}")
        for name in ("min_aspect", "max_aspect"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating)):
                raise TypeError(f"BlockMaskConfig.{name} must be a number, got {v!r}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid must be at least 1x1, got {self.height}x{self.width}")
        n = self.height * self.width
        if not 0 <= self.num_masked <= n:
            raise ValueError(f"num_masked={self.num_masked} is outside [0, {n}] for a {self.height}x{self.width} grid")
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {self.min_num_patches}")
        if self.max_num_patches is not None and self.max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches={self.max_num_patches} must be >= min_num_patches={self.min_num_patches}"
            )
        if not (math.isfinite(self.min_aspect) and self.min_aspect > 0):
            raise ValueError(f"min_aspect must be a finite number > 0, got {self.min_aspect}")
        if self.max_aspect is not None and not (math.isfinite(self.max_aspect) and self.max_aspect >= self.min_aspect):
            raise ValueError(f"max_aspect={self.max_aspect} must be finite and >= min_aspect={self.min_aspect}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    @property
    def block_area_max(self) -> int:
        return max(self.min_num_patches, self.num_masked if self.max_num_patches is None else self.max_num_patches)

    @property
    def aspect_range(self) -> tuple[float, float]:
        hi = self.max_aspect if self.max_aspect is not None else 1.0 / self.min_aspect
        return (min(self.min_aspect, hi), max(self.min_aspect, hi))


def block_mask_ref(cfg: BlockMaskConfig, rng: random.Random) -> np.ndarray:
    """One mask [height, width] (bool, True = masked), in plain Python."""
    mask = np.zeros((cfg.height, cfg.width), dtype=bool)
    log_lo, log_hi = (math.log(a) for a in cfg.aspect_range)
    count = 0
    while count < cfg.num_masked:
        budget = min(cfg.num_masked - count, cfg.block_area_max)
        added = 0
        for _ in range(cfg.max_attempts):
            area = rng.uniform(cfg.min_num_patches, budget)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < 1 or w < 1 or h >= cfg.height or w >= cfg.width:
                continue
            top = rng.randint(0, cfg.height - h)
            left = rng.randint(0, cfg.width - w)
            fresh = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < fresh <= budget:
                mask[top : top + h, left : left + w] = True
                added = fresh
                break
        if added == 0:
            break
        count += added
    while cfg.exact and count < cfg.num_masked:  # blocks are stuck: grow them one free neighbour at a time
        grown = np.zeros_like(mask)
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        frontier = np.flatnonzero((grown & ~mask).reshape(-1))
        if frontier.size == 0:
            frontier = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[frontier[rng.randrange(frontier.size)]] = True
        count += 1
    return mask


class BlockMaskGenerator:
    """Callable that returns block-wise masks as a bool tensor ``[batch, height, width]``.

    Args:
        cfg: the grid and block parameters.
        seed: base seed; call ``i`` of a generator uses seed ``(seed, i)``, so a run is reproducible.
        backend: "auto" (C++ when built), "cpp" or "torch" (the Python reference).
    """

    def __init__(self, cfg: BlockMaskConfig, seed: int = 0, backend: str = "auto"):
        if backend not in ("auto", "cpp", "torch"):
            raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
        if backend == "cpp":
            _ext.require()
        self.cfg = cfg
        self.seed = int(seed)
        self.backend = "cpp" if backend == "cpp" or (backend == "auto" and _ext.available()) else "torch"
        self._calls = 0

    def __call__(self, batch: int, seed: int | None = None) -> torch.Tensor:
        if as_int(batch) is None or batch < 0:
            raise ValueError(f"batch must be a non-negative int, got {batch!r}")
        batch = as_int(batch)
        if seed is None:
            seed = (self.seed * 1_000_003 + self._calls) & (2**63 - 1)
            self._calls += 1
        c = self.cfg
        if self.backend == "cpp":
            lo, hi = c.aspect_range
            out = _ext.require().block_mask(
                batch, c.height, c.width, c.num_masked, float(c.min_num_patches), float(c.block_area_max),
                lo, hi, c.max_attempts, seed, exact=c.exact,
            )  # fmt: skip
            return torch.from_numpy(out)
        rng = random.Random(seed)
        out = np.zeros((batch, c.height, c.width), dtype=bool)
        for i in range(batch):
            out[i] = block_mask_ref(c, rng)
        return torch.from_numpy(out)
