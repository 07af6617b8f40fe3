"""Every mask family of masked modeling behind one interface (``fastmim.masking.base.MaskStrategy``).

=================  ==========================================================================================
``random``         MAE: exactly ``N - int(N * (1 - ratio))`` tokens hidden per sample, uniformly.
``block``          BEiT: rectangles of random area and log-uniform aspect ratio until the target count (exact:
                   a stuck sample is topped up with random cells).
``simmim``         SimMIM: random masking of a coarser mask-patch grid (e.g. 32 px over 16-px tokens), upsampled.
``uniform``        UM-MAE: one visible token per 2x2 cell; then ``secondary_ratio`` of the visible ones become
                   mask tokens (``Masks.secondary``).
``multiblock``     I-JEPA: K target blocks and one context block; the context excludes the targets.
``tube``           VideoMAE: one spatial mask repeated over T frames ([B, T, H, W]).
``attention``      AttMask / MILAN: hide the highest-scoring tokens of a given per-token score, a ``random_share``
                   of the hidden ones drawn at random among the rest.
``hardpatch``      HPM: hide tokens drawn without replacement with probability proportional to a given predicted
                   loss (Gumbel top-k), a ``random_share`` of them uniformly.
``inverse_block``  data2vec 2.0: the visible tokens are a few 3x3 squares, trimmed or topped up to an exact count.
=================  ==========================================================================================

``build_mask(name, grid, **params)`` builds one by name. Each has a batched PyTorch implementation (no per-sample
Python loop; GPU) and a readable per-sample reference; block, multiblock and uniform also a C++ one.
"""

from __future__ import annotations

import math
import numbers
import random

import numpy as np
import torch

from fastmim._args import as_int, check_bool
from fastmim.masking.base import Masks, MaskStrategy, as_grid, check_range, check_ratio
from fastmim.masking.random import num_visible
from fastmim.masking.rng import randint, uniform


def exact_hidden(n: int, ratio: float) -> int:
    """Hidden tokens for a ratio, as MAE counts (``num_visible``: int(N * (1 - ratio)), at least one of each)."""
    return n - num_visible(n, ratio)


def _scatter_true(shape: tuple[int, int], ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bool, device=ids.device)
    return out.scatter_(1, ids, True)


def _rank(values: torch.Tensor) -> torch.Tensor:
    """[B, N] -> rank of each entry in ascending order (0 = smallest), ties broken by position."""
    order = torch.argsort(values, dim=1, stable=True)
    return torch.argsort(order, dim=1)


class RandomMask(MaskStrategy):
    """MAE's random masking. Args: grid, ratio (hidden fraction, in (0, 1)), seed, impl."""

    name = "random"

    def __init__(self, grid, ratio: float = 0.75, **kw):
        super().__init__(grid, **kw)
        self.ratio = check_ratio("ratio", ratio)
        self.num_hidden = exact_hidden(self.num_tokens, self.ratio)

    @property
    def exact_hidden(self) -> int | None:
        return self.num_hidden

    def _torch(self, keys):
        ids = torch.argsort(uniform(keys, self.num_tokens), dim=1, stable=True)[:, : self.num_hidden]
        return Masks(_scatter_true((keys.shape[0], self.num_tokens), ids).view(keys.shape[0], *self.grid))

    def _ref(self, rng):
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        mask[rng.sample(range(self.num_tokens), self.num_hidden)] = True
        return Masks(mask.view(self.grid))


class BlockMask(MaskStrategy):
    """BEiT's block-wise masking.

    Each block: up to ``max_attempts`` tries of an area uniform in [min_num_patches, budget] (budget: what is left
    to hide, at most ``max_num_patches``), a log-uniform aspect ratio in [min_aspect, max_aspect] (default
    1 / min_aspect), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), a uniform position; a try counts
    if it hides at least one new token and no more than the budget. When no try succeeds, ``exact=True`` (default:
    the same count in every sample, which recipes that drop tokens need) grows the blocks one random free neighbour
    at a time until the count, keeping BEiT's block shapes; ``exact=False`` stops short as BEiT does (the count then
    varies: for recipes that replace hidden tokens, such as MaskFeat and BEiT).
    """

    name = "block"
    has_cpp = True
    has_triton = True

    def __init__(self, grid, ratio: float = 0.4, min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None, max_attempts: int = 10,
                 exact: bool = True, **kw):  # fmt: skip
        super().__init__(grid, **kw)
        self.ratio = check_ratio("ratio", ratio)
        self.num_hidden = exact_hidden(self.num_tokens, self.ratio)
        from fastmim.masking.block import BlockMaskConfig

        self.config = BlockMaskConfig(
            self.grid[0],
            self.grid[1],
            self.num_hidden,
            min_num_patches,
            max_num_patches,
            min_aspect,
            max_aspect,
            max_attempts,
            exact,
        )  # fmt: skip (validates)

    @property
    def exact_hidden(self) -> int | None:
        return self.num_hidden if self.config.exact else None

    def _torch(self, keys):
        cfg = self.config
        b, (h, w) = keys.shape[0], self.grid
        dev = keys.device
        mask = torch.zeros(b, h, w, dtype=torch.bool, device=dev)
        count = torch.zeros(b, dtype=torch.int64, device=dev)
        active = torch.ones(b, dtype=torch.bool, device=dev)
        a = cfg.max_attempts
        lo, hi = (math.log(x) for x in cfg.aspect_range)
        yy = torch.arange(h, device=dev).view(1, h, 1)
        xx = torch.arange(w, device=dev).view(1, 1, w)
        rounds = 0
        while rounds < cfg.num_masked:  # each accepted block hides >= 1 new token
            budget = torch.clamp(cfg.num_masked - count, max=cfg.block_area_max).double()  # [B]
            u = uniform(keys, 4 * a, stream=rounds).double().view(b, 4, a)
            area = cfg.min_num_patches + u[:, 0] * (budget[:, None] - cfg.min_num_patches)  # [B, A]
            aspect = torch.exp(lo + u[:, 1] * (hi - lo))
            bh = torch.round(torch.sqrt(area * aspect)).long()
            bw = torch.round(torch.sqrt(area / aspect)).long()
            ok = (bh >= 1) & (bw >= 1) & (bh < h) & (bw < w)
            top = torch.minimum((u[:, 2] * (h - bh + 1).clamp_min(1)).long(), (h - bh).clamp_min(0))
            left = torch.minimum((u[:, 3] * (w - bw + 1).clamp_min(1)).long(), (w - bw).clamp_min(0))
            # hidden tokens already under each candidate, from the summed-area table of the mask
            sat = torch.nn.functional.pad(mask.long().cumsum(1).cumsum(2), (1, 0, 1, 0))  # [B, H+1, W+1]
            flat = sat.view(b, (h + 1) * (w + 1))
            ys, xs = (top + bh, top + bh, top, top), (left + bw, left, left + bw, left)
            corners = [flat.gather(1, y.clamp(0, h) * (w + 1) + x.clamp(0, w)) for y, x in zip(ys, xs, strict=True)]
            covered = corners[0] - corners[1] - corners[2] + corners[3]  # [B, A]
            fresh = bh * bw - covered
            good = ok & (fresh > 0) & (fresh <= budget[:, None].long()) & active[:, None]
            first = torch.argmax(good.int(), dim=1)  # the first good try, as tries are sequential
            took = good.any(dim=1)
            t0, l0, h0, w0 = (t.gather(1, first[:, None]).view(b, 1, 1) for t in (top, left, bh, bw))
            rect = (yy >= t0) & (yy < t0 + h0) & (xx >= l0) & (xx < l0 + w0) & took.view(b, 1, 1)
            mask |= rect
            count += torch.where(took, fresh.gather(1, first[:, None]).squeeze(1), 0)
            active &= took & (count < cfg.num_masked)
            rounds += 1
            if rounds % 4 == 0 and not bool(active.any()):  # a host sync every few rounds
                break
        return self._top_up(keys, mask, count)

    def _triton(self, keys):
        from fastmim.masking.triton_block import block_mask_blocks

        return self._top_up(keys, *block_mask_blocks(keys, self.config))

    def _top_up(self, keys, mask, count):
        """The exact count: samples whose blocks got stuck grow them, one random free token next to a hidden one per
        round (any free token where none is) until ``num_masked``; ``exact=False`` stops short as BEiT does."""
        if not self.config.exact:
            return Masks(mask)
        b, (h, w) = keys.shape[0], self.grid
        short = self.config.num_masked - count  # [B]
        rounds = int(short.max()) if short.numel() else 0  # one host sync per batch
        for r in range(rounds):
            grown = torch.zeros_like(mask)
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            grown[:, :, 1:] |= mask[:, :, :-1]
            grown[:, :, :-1] |= mask[:, :, 1:]
            frontier = (grown & ~mask).view(b, h * w)
            free = ~mask.view(b, h * w)
            frontier = torch.where(frontier.any(dim=1, keepdim=True), frontier, free)
            noise = uniform(keys, h * w, stream=(1 << 20) + r).masked_fill(~frontier, 2.0)
            pick = torch.zeros_like(free).scatter_(1, noise.argmin(dim=1, keepdim=True), True)
            mask = mask | (pick & (short > r).view(b, 1)).view(b, h, w)
        return Masks(mask)

    def _ref(self, rng):
        from fastmim.masking.block import block_mask_ref

        return Masks(torch.from_numpy(block_mask_ref(self.config, rng)))

    def _cpp(self, keys):
        from fastmim import _ext

        c = self.config
        lo, hi = c.aspect_range
        out = _ext.require().block_mask_keys(
            keys.numpy().astype("uint64"), c.height, c.width, c.num_masked, float(c.min_num_patches),
            float(c.block_area_max), lo, hi, c.max_attempts, exact=c.exact,
        )  # fmt: skip
        return Masks(torch.from_numpy(out))


class InverseBlockMask(MaskStrategy):
    """data2vec 2.0's inverse block mask (fairseq ``compute_block_mask_2d`` with ``inverse_mask=True``): the *visible*
    tokens are ``block`` x ``block`` squares around ``int(N * (1 - ratio + adjust) / block^2)`` centres drawn uniformly
    (with replacement; squares clamped at the border), then trimmed or topped up at random to exactly
    ``int(N * (1 - ratio))`` visible tokens; everything else is hidden. ViT-B/16 (14 x 14, ratio 0.8, adjust 0.07,
    block 3): 5 centres, 39 visible, 157 hidden. Args: grid, ratio (hidden fraction), block, adjust."""

    name = "inverse_block"

    def __init__(self, grid, ratio: float = 0.8, block: int = 3, adjust: float = 0.07, **kw):
        super().__init__(grid, **kw)
        self.ratio = check_ratio("ratio", ratio)
        if as_int(block) is None or block < 2:
            raise ValueError(f"block must be an int >= 2 (data2vec 2.0: 3), got {block!r}")
        block = as_int(block)
        if isinstance(adjust, bool) or not isinstance(adjust, numbers.Real) or not 0 <= adjust < 1:  # (numpy's too)
            raise ValueError(f"adjust must be a number in [0, 1), got {adjust!r}")
        self.block, self.adjust = block, float(adjust)
        self.num_visible = num_visible(self.num_tokens, self.ratio)
        self.num_centres = max(1, int(self.num_tokens * ((1 - self.ratio) + self.adjust) / block**2))

    @property
    def exact_hidden(self) -> int | None:
        return self.num_tokens - self.num_visible

    def _offsets(self, device) -> torch.Tensor:
        return torch.arange(self.block, device=device) - self.block // 2

    def _torch(self, keys):
        b, (h, w) = keys.shape[0], self.grid
        centres = randint(keys, 0, self.num_tokens - 1, self.num_centres, stream=0)  # [B, K]
        d = self._offsets(keys.device)
        rows = ((centres // w)[:, :, None, None] + d[:, None]).clamp_(0, h - 1)  # [B, K, block, 1]
        cols = ((centres % w)[:, :, None, None] + d[None, :]).clamp_(0, w - 1)  # [B, K, 1, block]
        kept = _scatter_true((b, self.num_tokens), (rows * w + cols).flatten(1))
        # exactly num_visible: the squares' tokens first (a random subset where they overflow), then random others
        score = uniform(keys, self.num_tokens, stream=1) + 2.0 * kept
        keep = torch.topk(score, self.num_visible, dim=1, sorted=False).indices
        return Masks(~_scatter_true((b, self.num_tokens), keep).view(b, h, w))

    def _ref(self, rng):
        h, w = self.grid
        kept = set()
        for _ in range(self.num_centres):
            c = rng.randrange(self.num_tokens)
            for di in self._offsets("cpu").tolist():
                for dj in self._offsets("cpu").tolist():
                    kept.add(min(max(c // w + di, 0), h - 1) * w + min(max(c % w + dj, 0), w - 1))
        kept = sorted(kept)
        if len(kept) > self.num_visible:
            kept = rng.sample(kept, self.num_visible)
        elif len(kept) < self.num_visible:
            kept += rng.sample(sorted(set(range(self.num_tokens)) - set(kept)), self.num_visible - len(kept))
        mask = torch.ones(self.num_tokens, dtype=torch.bool)
        mask[kept] = False
        return Masks(mask.view(h, w))


class SimMIMMask(MaskStrategy):
    """SimMIM: ``ceil(ratio * M)`` of the M cells of a coarse grid of ``mask_patch_size`` px hidden (at most M - 1),
    each cell then covering (mask_patch_size / patch_size)^2 tokens. Args: grid (tokens), ratio, mask_patch_size,
    patch_size."""

    name = "simmim"

    def __init__(self, grid, ratio: float = 0.6, mask_patch_size: int = 32, patch_size: int = 16, **kw):
        super().__init__(grid, **kw)
        self.ratio = check_ratio("ratio", ratio)
        sizes = (as_int(mask_patch_size), as_int(patch_size))
        if not all(v is not None and v > 0 for v in sizes) or sizes[0] % sizes[1]:
            raise ValueError(f"mask_patch_size ({mask_patch_size}) must be a positive multiple of patch_size "
                             f"({patch_size})")  # fmt: skip
        self.scale = sizes[0] // sizes[1]
        if self.grid[0] % self.scale or self.grid[1] % self.scale:
            raise ValueError(f"the {self.grid[0]}x{self.grid[1]} token grid does not divide into {self.scale}x"
                             f"{self.scale}-token mask patches ({mask_patch_size} over {patch_size} px)")  # fmt: skip
        self.coarse = (self.grid[0] // self.scale, self.grid[1] // self.scale)
        m = self.coarse[0] * self.coarse[1]
        if m < 2:
            raise ValueError(f"the {self.grid[0]}x{self.grid[1]} token grid is one {self.scale}x{self.scale}-token "
                             "mask patch: SimMIM masks need at least two (a larger image or a smaller "
                             "mask_patch_size)")  # fmt: skip
        # SimMIM's ceil(ratio * M), and at least one cell visible (as every family keeps a visible token)
        self.num_hidden_cells = min(m - 1, int(math.ceil(m * self.ratio)))

    def _up(self, coarse: torch.Tensor) -> torch.Tensor:
        return coarse.repeat_interleave(self.scale, -2).repeat_interleave(self.scale, -1)

    @property
    def exact_hidden(self) -> int | None:
        return self.num_hidden_cells * self.scale**2

    def _torch(self, keys):
        m = self.coarse[0] * self.coarse[1]
        ids = torch.argsort(uniform(keys, m), dim=1, stable=True)[:, : self.num_hidden_cells]
        return Masks(self._up(_scatter_true((keys.shape[0], m), ids).view(keys.shape[0], *self.coarse)))

    def _ref(self, rng):
        m = self.coarse[0] * self.coarse[1]
        coarse = torch.zeros(m, dtype=torch.bool)
        coarse[rng.sample(range(m), self.num_hidden_cells)] = True
        return Masks(self._up(coarse.view(self.coarse)))


class UniformMask(MaskStrategy):
    """UM-MAE's uniform sampling: in every 2x2 cell of the grid one token (uniformly chosen) stays visible, so 75% are
    hidden; then ``visible - int(visible * (1 - secondary_ratio))`` of the visible tokens (UM-MAE's count) are marked
    ``secondary`` (the encoder sees them as mask tokens: ``vis_mask_ratio`` on the MAE models). Args: grid (even
    sides), secondary_ratio in [0, 1)."""

    name = "uniform"
    has_cpp = True

    def __init__(self, grid, secondary_ratio: float = 0.25, **kw):
        super().__init__(grid, **kw)
        if self.grid[0] % 2 or self.grid[1] % 2:
            raise ValueError(f"uniform masking needs an even token grid (2x2 cells), got {self.grid[0]}x{self.grid[1]}")
        self.secondary_ratio = check_ratio("secondary_ratio", secondary_ratio, low_open=False)
        self.cells = (self.grid[0] // 2, self.grid[1] // 2)
        nc = self.cells[0] * self.cells[1]
        self.num_secondary = nc - int(nc * (1 - self.secondary_ratio))

    def _from_choice(self, choice: torch.Tensor, sec_cells: torch.Tensor) -> Masks:
        """choice [B, h, w] in 0..3 (the visible token of each cell, (dy, dx) = divmod(choice, 2)); sec_cells
        [B, h, w] bool -> Masks."""
        h, w = self.grid
        b = choice.shape[0]
        up = lambda t: t[:, :, None, :, None].expand(b, h // 2, 2, w // 2, 2).reshape(b, h, w)  # noqa: E731
        offset = (torch.arange(h, device=choice.device) % 2 * 2)[:, None] + torch.arange(w, device=choice.device) % 2
        visible = up(choice.to(torch.uint8)) == offset.to(torch.uint8)  # each token's offset in its cell
        return Masks(~visible, secondary=visible & up(sec_cells))

    @property
    def exact_hidden(self) -> int | None:
        return 3 * self.num_tokens // 4

    def _torch(self, keys):
        nc = self.cells[0] * self.cells[1]
        choice = (uniform(keys, nc) * 4).long().clamp_max(3).view(keys.shape[0], *self.cells)
        ids = torch.argsort(uniform(keys, nc, stream=1), dim=1, stable=True)[:, : self.num_secondary]
        return self._from_choice(choice, _scatter_true((keys.shape[0], nc), ids).view(keys.shape[0], *self.cells))

    def _ref(self, rng):
        nc = self.cells[0] * self.cells[1]
        choice = torch.tensor([rng.randrange(4) for _ in range(nc)]).view(1, *self.cells)
        sec = torch.zeros(nc, dtype=torch.bool)
        sec[rng.sample(range(nc), self.num_secondary)] = True
        out = self._from_choice(choice, sec.view(1, *self.cells))
        return Masks(out.mask[0], secondary=out.secondary[0])

    def _cpp(self, keys):
        from fastmim import _ext

        choice, sec = _ext.require().uniform_mask_keys(keys.numpy().astype("uint64"), *self.cells, self.num_secondary)
        return self._from_choice(torch.from_numpy(choice), torch.from_numpy(sec))


def _block_hw(scale: torch.Tensor, aspect: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's block size: area scale * H * W, aspect ratio h / w; h = round(sqrt(area * aspect)),
    w = round(sqrt(area / aspect)), each clipped to [1, side]."""
    area = scale * (h * w)
    bh = torch.round(torch.sqrt(area * aspect)).long().clamp(1, h)
    bw = torch.round(torch.sqrt(area / aspect)).long().clamp(1, w)
    return bh, bw


class MultiBlockMask(MaskStrategy):
    """I-JEPA's multi-block masking: ``num_targets`` target blocks (scale ``target_scale`` of the grid, aspect ratio in
    ``aspect_range``) and one context block (scale ``context_scale``, aspect 1) from which every target token is
    removed. ``mask`` hides everything but the context; ``targets`` [B, K, H, W] are the blocks to predict. A context
    keeping ``min_keep`` tokens or fewer is redrawn (it keeps more than ``min_keep``, as I-JEPA's: at least one;
    default: I-JEPA's 10, at most 1/8 of a smaller grid, as the I-JEPA models take it);
    after ``max_tries`` draws it excludes one target block fewer (the last), as I-JEPA's collator gives up a
    constraint (small grids: a target may then overlap the context).

    Per sample (default): each sample draws its own block sizes (a log-uniform aspect), so that a mask depends on its
    sample alone. ``batch_shared=True`` is I-JEPA's collator instead (``src/masks/multiblock.py``): one target size and
    one context size per call, each from one random number setting both the scale and the aspect (linear), ``max_keep
    = int(H W s)``, ``h = round(sqrt(max_keep * a))``, ``w = round(sqrt(max_keep / a))``, each shrunk while it reaches
    the grid's side; positions per sample; a context must keep more than ``min_keep`` tokens, and after
    ``max_tries`` failures it stops excluding one more target block; then every sample's context is truncated to the
    batch's smallest (its first tokens in raster order, as the collator truncates its index lists), so that
    ``num_hidden`` is one count for the call. The sizes come from the batch's keys together, so such masks are a
    pure function of (seed, epoch, the batch's indices); one implementation on Python ints serves every ``impl``
    but "ref", which draws the same masks with tensors.
    ``truncate=True`` truncates per-sample masks the same way (I-JEPA's truncation without its shared sizes; a mask
    then depends on the other samples of its call).
    """

    name = "multiblock"
    has_cpp = True

    def __init__(self, grid, num_targets: int = 4, target_scale=(0.15, 0.2), aspect_range=(0.75, 1.5),
                 context_scale=(0.85, 1.0), min_keep: int | None = None, max_tries: int = 20,
                 batch_shared: bool = False, truncate: bool = False, **kw):  # fmt: skip
        super().__init__(grid, **kw)
        self.batch_shared = check_bool("multiblock", "batch_shared", batch_shared)  # ("false" from a YAML: refused)
        self.truncate = check_bool("multiblock", "truncate", truncate) and not self.batch_shared  # (batch-shared
        # masks are truncated already)
        if as_int(num_targets) is None or num_targets < 1:
            raise ValueError(f"num_targets must be a positive int, got {num_targets!r}")
        self.num_targets = as_int(num_targets)
        self.target_scale = check_range("target_scale", target_scale)
        self.aspect_range = check_range("aspect_range", aspect_range)
        self.context_scale = check_range("context_scale", context_scale)
        if self.target_scale[1] > 1 or self.context_scale[1] > 1:
            raise ValueError("target_scale and context_scale are fractions of the grid: at most 1")
        if as_int(max_tries) is None or max_tries < 1:
            raise ValueError(f"max_tries must be a positive int, got {max_tries!r}")
        self.max_tries = as_int(max_tries)
        # the largest context must be able to keep more than min_keep tokens (the collator's blocks stay smaller
        # than the grid)
        if self.batch_shared:
            hmax, wmax = self._shared_size_at(1.0, self.context_scale, (1.0, 1.0))
        else:
            hmax, wmax = (int(v) for v in _block_hw(torch.tensor(self.context_scale[1]), torch.tensor(1.0), *self.grid))
        if min_keep is None:  # I-JEPA's 10, at most 1/8 of the grid as the I-JEPA models take it (10 on a 4 x 4 grid
            # left no context once the targets were cut out: they were let overlap it), below the largest context
            min_keep = min(10, self.num_tokens // 8, max(hmax * wmax - 1, 0))
        if as_int(min_keep) is None or not 0 <= min_keep < self.num_tokens:  # (a context keeps more than min_keep)
            raise ValueError(f"min_keep must be an int in [0, {self.num_tokens - 1}], got {min_keep!r}")
        self.min_keep = min_keep = as_int(min_keep)
        if hmax * wmax <= min_keep:
            raise ValueError(f"a context block of scale {self.context_scale[1]} on a {self.grid[0]}x{self.grid[1]} "
                             f"grid has at most {hmax * wmax} tokens, too few to keep more than min_keep={min_keep}: "
                             "lower min_keep (the I-JEPA models use at most 1/8 of the grid)")  # fmt: skip

    def _blocks(self, keys, stream, n, scale_range, aspect_range):
        """[B, n] block sizes and positions -> [B, n, H, W] bool."""
        h, w = self.grid
        u = uniform(keys, 2 * n, stream).view(keys.shape[0], 2, n)
        scale = scale_range[0] + u[:, 0] * (scale_range[1] - scale_range[0])
        la, ha = math.log(aspect_range[0]), math.log(aspect_range[1])
        aspect = torch.exp(la + u[:, 1] * (ha - la))
        bh, bw = _block_hw(scale, aspect, h, w)
        top = randint(keys, 0, h - bh, n, stream + 1)
        left = randint(keys, 0, w - bw, n, stream + 2)
        yy = torch.arange(h, device=keys.device).view(1, 1, h, 1)
        xx = torch.arange(w, device=keys.device).view(1, 1, 1, w)
        t, lft, bh, bw = (v[..., None, None] for v in (top, left, bh, bw))
        return (yy >= t) & (yy < t + bh) & (xx >= lft) & (xx < lft + bw)

    def _shared_size(self, rng: random.Random, scale_range, aspect_range) -> tuple[int, int]:
        """I-JEPA's ``_sample_block_size``: one random number for the scale and the aspect."""
        return self._shared_size_at(rng.random(), scale_range, aspect_range)

    def _shared_size_at(self, u: float, scale_range, aspect_range) -> tuple[int, int]:
        h, w = self.grid
        max_keep = int(h * w * (scale_range[0] + u * (scale_range[1] - scale_range[0])))
        aspect = aspect_range[0] + u * (aspect_range[1] - aspect_range[0])
        bh, bw = int(round(math.sqrt(max_keep * aspect))), int(round(math.sqrt(max_keep / aspect)))
        while bh >= h and bh > 1:
            bh -= 1
        while bw >= w and bw > 1:
            bw -= 1
        return max(bh, 1), max(bw, 1)

    def _shared_sizes(self, keys: torch.Tensor) -> tuple[int, int, int, int]:
        """The batch's (target h, w, context h, w), from one generator seeded by its keys together."""
        batch = random.Random(int(keys.sum()) & 0xFFFFFFFF)
        ph, pw = self._shared_size(batch, self.target_scale, self.aspect_range)
        eh, ew = self._shared_size(batch, self.context_scale, (1.0, 1.0))
        if eh * ew <= self.min_keep:
            raise ValueError(f"multi-block masking: a {eh}x{ew} context block cannot keep more than min_keep="
                             f"{self.min_keep} tokens: lower min_keep or raise context_scale")  # fmt: skip
        return ph, pw, eh, ew

    def _shared(self, keys: torch.Tensor) -> Masks:
        """I-JEPA's collator for one batch (see the class docstring), each block a Python int of H*W bits (row-major):
        the same draws and masks as ``_shared_ref``, 2.7x faster (1.9 ms for 128 masks on 16x16 on this CPU, 5.1 with
        tensors; most of the rest is seeding a generator per sample). It runs on the training process's thread where
        the loader does not draw masks (DALI's)."""
        h, w = self.grid
        dev, keys = keys.device, keys.cpu()
        ph, pw, eh, ew = self._shared_sizes(keys)

        def block(rng, bh, bw) -> int:
            top, left = rng.randrange(max(h - bh, 1)), rng.randrange(max(w - bw, 1))
            row = ((1 << min(bw, w - left)) - 1) << left  # (a block past the edge is cut there, as a slice is)
            return sum(row << (r * w) for r in range(top, min(top + bh, h)))

        targets, contexts = [], []
        for key in keys.tolist():
            rng = random.Random(key)
            tgt = [block(rng, ph, pw) for _ in range(self.num_targets)]
            excluded, tries = self.num_targets, 0
            while True:
                union = 0
                for t in tgt[:excluded]:
                    union |= t
                ctx = block(rng, eh, ew) & ~union
                if ctx.bit_count() > self.min_keep:
                    break
                tries += 1
                if tries >= self.max_tries:  # the collator's timeout: one constraint fewer
                    excluded, tries = excluded - 1, 0
            targets.extend(tgt)
            contexts.append(ctx)
        n = h * w
        nbytes = (n + 7) // 8

        def bits(masks: list[int]) -> torch.Tensor:  # ints -> [len, H*W] bool (bit i: token i)
            raw = np.frombuffer(b"".join(m.to_bytes(nbytes, "little") for m in masks), dtype=np.uint8)
            return torch.from_numpy(np.unpackbits(raw.reshape(len(masks), nbytes), axis=1, bitorder="little")[:, :n]
                                    .astype(bool))  # fmt: skip

        b = len(contexts)
        ctx, keep = _truncated(bits(contexts) if b else torch.zeros(0, n, dtype=torch.bool))
        tgt = bits(targets).view(b, self.num_targets, h, w) if b else torch.zeros(0, self.num_targets, h, w,
                                                                                  dtype=torch.bool)  # fmt: skip
        return Masks((~ctx).view(-1, h, w), targets=tgt, num_hidden=n - keep).to(dev)  # (counted on the CPU)

    def _shared_ref(self, keys: torch.Tensor) -> Masks:
        """``_shared`` with a [H, W] bool tensor per block (the reference ``impl="ref"`` runs)."""
        h, w = self.grid
        dev, keys = keys.device, keys.cpu()
        ph, pw, eh, ew = self._shared_sizes(keys)

        def block(rng, bh, bw):
            m = torch.zeros(h, w, dtype=torch.bool)
            top, left = rng.randrange(max(h - bh, 1)), rng.randrange(max(w - bw, 1))
            m[top : top + bh, left : left + bw] = True
            return m

        targets, contexts = [], []
        for key in keys.tolist():
            rng = random.Random(key)
            tgt = torch.stack([block(rng, ph, pw) for _ in range(self.num_targets)])
            excluded, tries = self.num_targets, 0
            while True:
                ctx = block(rng, eh, ew) & ~tgt[:excluded].any(0)
                if int(ctx.sum()) > self.min_keep:
                    break
                tries += 1
                if tries >= self.max_tries:  # the collator's timeout: one constraint fewer
                    excluded, tries = excluded - 1, 0
            targets.append(tgt)
            contexts.append(ctx.flatten())
        ctx, keep = _truncated(torch.stack(contexts))  # [B, N]
        tgt = torch.stack(targets) if targets else torch.zeros(0, self.num_targets, h, w, dtype=torch.bool)
        return Masks((~ctx).view(-1, h, w), targets=tgt, num_hidden=h * w - keep).to(dev)  # (counted on the CPU)

    def _ref_batch(self, keys: torch.Tensor, **inputs: torch.Tensor) -> Masks:
        return self._shared_ref(keys) if self.batch_shared else super()._ref_batch(keys, **inputs)

    def __call__(self, *args, **kwargs) -> Masks:
        out = super().__call__(*args, **kwargs)
        if not self.truncate:
            return out
        # per-sample blocks, then every context truncated to the call's smallest (its first tokens in raster order,
        # as I-JEPA's collator truncates): one hidden count for the call, so the context can be gathered (one host
        # read of the count where the masks are on a GPU)
        ctx, keep = _truncated(~out.mask.flatten(1))
        return Masks((~ctx).view_as(out.mask), out.targets, num_hidden=ctx.shape[1] - keep,
                     target_tokens=out.target_tokens)  # fmt: skip

    def _torch(self, keys):
        if self.batch_shared:
            return self._shared(keys)
        targets = self._blocks(keys, 0, self.num_targets, self.target_scale, self.aspect_range)  # [B, K, H, W]
        context = torch.zeros_like(targets[:, 0])
        need = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        for t in range(self.max_tries * (self.num_targets + 1)):  # (every max_tries: one target fewer excluded)
            union = targets[:, : self.num_targets - t // self.max_tries].any(dim=1)
            ctx = self._blocks(keys, 16 + 3 * t, 1, self.context_scale, (1.0, 1.0))[:, 0] & ~union
            context = torch.where(need.view(-1, 1, 1), ctx, context)
            need &= context.flatten(1).sum(1) <= self.min_keep
            if not bool(need.any()):
                break
        else:
            raise RuntimeError(f"multi-block masking: no context block kept more than min_keep={self.min_keep} tokens, "
                               "even without excluding the targets; lower min_keep or raise context_scale")  # fmt: skip
        return Masks(~context, targets=targets)

    def _ref(self, rng):
        h, w = self.grid

        def block(scale_range, aspect_range):
            scale = rng.uniform(*scale_range)
            aspect = math.exp(rng.uniform(math.log(aspect_range[0]), math.log(aspect_range[1])))
            bh, bw = (int(v) for v in _block_hw(torch.tensor(scale), torch.tensor(aspect), h, w))
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            m = torch.zeros(h, w, dtype=torch.bool)
            m[top : top + bh, left : left + bw] = True
            return m

        targets = torch.stack([block(self.target_scale, self.aspect_range) for _ in range(self.num_targets)])
        for t in range(self.max_tries * (self.num_targets + 1)):  # (every max_tries: one target fewer excluded)
            union = targets[: self.num_targets - t // self.max_tries].any(0)
            context = block(self.context_scale, (1.0, 1.0)) & ~union
            if int(context.sum()) > self.min_keep:
                return Masks(~context, targets=targets)
        raise RuntimeError(f"multi-block masking: no context block kept more than min_keep={self.min_keep} tokens, "
                           "even without excluding the targets; lower min_keep or raise context_scale")  # fmt: skip

    def _cpp(self, keys):
        if self.batch_shared:
            return self._shared(keys)
        from fastmim import _ext

        h, w = self.grid
        ctx, tgt = _ext.require().multiblock_mask_keys(
            keys.numpy().astype("uint64"), h, w, self.num_targets, *self.target_scale, *self.aspect_range,
            *self.context_scale, self.min_keep, self.max_tries,
        )  # fmt: skip
        return Masks(~torch.from_numpy(ctx), targets=torch.from_numpy(tgt))


def _truncated(ctx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """I-JEPA's truncation of contexts [B, N] (bool, modified in place) to the batch's smallest: each sample keeps its
    first ``keep`` context tokens in raster order, as the collator cuts its index lists. Returns (ctx, keep)."""
    keep = int(ctx.sum(1).min()) if ctx.shape[0] else 0
    ctx &= torch.cumsum(ctx, dim=1) <= keep
    return ctx, keep


class TubeMask(MaskStrategy):
    """VideoMAE's tube masking: one random spatial mask (exact count) repeated over ``frames`` temporal tokens:
    ``mask`` is [B, T, H, W]. Args: grid (spatial tokens), frames, ratio."""

    name = "tube"

    def __init__(self, grid, frames: int = 8, ratio: float = 0.9, **kw):
        super().__init__(grid, **kw)
        if as_int(frames) is None or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        self.frames = as_int(frames)
        self.ratio = check_ratio("ratio", ratio)
        self._spatial = RandomMask(self.grid, ratio, seed=self.seed, impl="torch")

    def _expand(self, m: torch.Tensor) -> Masks:
        return Masks(m.unsqueeze(-3).expand(*m.shape[:-2], self.frames, *self.grid).contiguous())

    @property
    def exact_hidden(self) -> int | None:
        return self._spatial.num_hidden * self.frames

    def _torch(self, keys):
        return self._expand(self._spatial._torch(keys).mask)

    def _ref(self, rng):
        return self._expand(self._spatial._ref(rng).mask)


class _GuidedMask(MaskStrategy):
    """Shared by the strategies driven by a per-token input: ``num_hidden`` tokens hidden, ``num_random`` of them
    uniformly among those the input did not pick."""

    def __init__(self, grid, ratio: float = 0.75, random_share: float = 0.0, **kw):
        super().__init__(grid, **kw)
        self.ratio = check_ratio("ratio", ratio)
        self.random_share = check_ratio("random_share", random_share, low_open=False, high_open=False)
        self.num_hidden = exact_hidden(self.num_tokens, self.ratio)
        self.num_random = int(round(self.random_share * self.num_hidden))

    @property
    def exact_hidden(self) -> int | None:
        return self.num_hidden

    def _with_random(self, keys: torch.Tensor, picked: torch.Tensor, stream: int) -> Masks:
        """picked [B, N] bool (num_hidden - num_random per sample) plus num_random uniform others -> Masks."""
        noise = uniform(keys, picked.shape[1], stream).masked_fill(picked, 2.0)
        return Masks((picked | (_rank(noise) < self.num_random)).view(picked.shape[0], *self.grid))


class AttentionMask(_GuidedMask):
    """AttMask / MILAN attention-guided masking: of the ``N - int(N * (1 - ratio))`` hidden tokens,
    ``round(random_share * hidden)`` are drawn uniformly and the rest are the highest ``scores`` among the others
    (ties by position). Per-batch input: ``scores`` [B, H*W] or [B, H, W] (e.g. a teacher's class-token attention)."""

    name = "attention"
    inputs = ("scores",)

    def _torch(self, keys, scores):
        b, n = scores.shape
        top = self.num_hidden - self.num_random
        order = torch.argsort(-scores, dim=1, stable=True)[:, :top]
        return self._with_random(keys, _scatter_true((b, n), order), stream=0)

    def _ref(self, rng, scores):
        n = self.num_tokens
        ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        hidden = set(ranked[: self.num_hidden - self.num_random])
        hidden |= set(rng.sample([i for i in range(n) if i not in hidden], self.num_random))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(hidden)] = True
        return Masks(mask.view(self.grid))


class HardPatchMask(_GuidedMask):
    """HPM's hard-patch mining: the hidden tokens are drawn without replacement with probability proportional to
    ``losses`` (a predicted reconstruction loss per token, >= 0; Gumbel top-k), except ``round(random_share *
    hidden)`` drawn uniformly (HPM's easy-to-hard schedule raises the loss-driven share over training). Tokens of zero
    loss are drawn only once the positive ones are exhausted. Per-batch input: ``losses`` [B, H*W] or [B, H, W]."""

    name = "hardpatch"
    inputs = ("losses",)

    def _check_input(self, name, value, batch):
        value = super()._check_input(name, value, batch)
        if bool((value < 0).any()):
            raise ValueError(f"mask strategy {self.name!r}: losses must be >= 0")
        return value

    def _torch(self, keys, losses):
        b, n = losses.shape
        u = uniform(keys, n).double().clamp_min(2**-25)
        gumbel = -torch.log(-torch.log(u))
        # zero-loss tokens after every positive one, in random order among themselves
        key = torch.where(losses > 0, torch.log(losses.double()) + gumbel, gumbel - 1e6)
        picked = _scatter_true((b, n), torch.argsort(-key, dim=1)[:, : self.num_hidden - self.num_random])
        return self._with_random(keys, picked, stream=1)

    def _ref(self, rng, losses):
        n = self.num_tokens
        weights = [float(x) for x in losses]
        hidden: list[int] = []
        free = list(range(n))
        for _ in range(self.num_hidden - self.num_random):  # sequential draws proportional to the loss
            total = sum(weights[i] for i in free)
            if total > 0:
                r, acc = rng.uniform(0, total), 0.0
                pick = free[-1]
                for i in free:
                    acc += weights[i]
                    if weights[i] > 0 and acc >= r:
                        pick = i
                        break
            else:
                pick = rng.choice(free)
            hidden.append(pick)
            free.remove(pick)
        hidden += rng.sample(free, self.num_random)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[hidden] = True
        return Masks(mask.view(self.grid))


STRATEGIES: dict[str, type[MaskStrategy]] = {
    cls.name: cls
    for cls in (
        RandomMask,
        BlockMask,
        SimMIMMask,
        UniformMask,
        MultiBlockMask,
        TubeMask,
        AttentionMask,
        HardPatchMask,
        InverseBlockMask,
    )
}


def build_mask(name: str, grid: int | tuple[int, int], **params) -> MaskStrategy:
    """The strategy ``name`` (one of ``STRATEGIES``) for a token grid; ``params`` go to its constructor."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    as_grid(grid)
    cls = STRATEGIES[name]
    takes = strategy_params(cls)
    unknown = sorted(set(params) - takes)
    if unknown:
        why = " (it hides 75% by construction: one visible token per 2x2 cell)" if name == "uniform" else ""
        raise ValueError(f"mask strategy {name!r} takes no {', '.join(unknown)}{why}; it takes "
                         f"{', '.join(sorted(takes))}")  # fmt: skip
    return cls(grid, **params)


def strategy_params(cls: type) -> set[str]:
    """The keyword parameters of a strategy's constructor (and of the bases it passes ``**kwargs`` on to)."""
    from fastmim.models.registry import accepted_keywords

    return accepted_keywords(cls) - {"grid"}
