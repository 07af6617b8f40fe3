"""The interface every mask strategy shares.

A strategy is built once for a token grid and its parameters, then called per batch::

    masks = strategy(indices=sample_ids, epoch=epoch, device="cuda")   # or strategy(batch) for a running counter
    masks.mask        # [B, H, W] bool (tube: [B, T, H, W]), True = hidden from the encoder
    masks.info()      # ids_keep / ids_restore / float mask for MAE-style encoders (same count in every sample)
    masks.info(ids=False)  # the float mask alone, for encoders that keep every token (any count)

Masks are a pure function of (seed, epoch, sample index): the same whatever the number of data workers, ranks or
restarts (``fastmim.masking.rng``). Implementations (``impl``): "torch" (batched, no per-sample Python loop: runs on
the GPU), "triton" (block: the whole per-sample loop in one GPU launch, the same masks as "torch"), "cpp"
(``fastmim._C``, multi-threaded, for CPU data workers; the loop-heavy strategies), "ref" (a readable per-sample
Python loop, the semantics); "auto" picks cpp on CPU where it exists and is built, triton on CUDA where it exists,
else torch. torch, cpp and ref draw from different random streams: they agree in distribution, not bit for bit.
"""

from __future__ import annotations

import abc
import math
import numbers
import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastmim import _ext
from fastmim._args import as_int
from fastmim.masking.random import MaskInfo, mask_only, masking_from_bool
from fastmim.masking.rng import sample_keys, stream_keys
from fastmim.ops._dispatch import triton_available, triton_problem

IMPLS = ("auto", "torch", "triton", "cpp", "ref")
# the key streams of masks 1 .. M-1 of a sample (num_masks): far from the strategies' own streams (0, 1, 2, ...)
CLONE_STREAM = 0x4D00


@dataclass
class Masks:
    """One batch of masks.

    mask:      [B, H, W] (tube: [B, T, H, W]) bool, True = hidden from the (context) encoder.
    targets:   multi-block only: [B, K, H, W] bool, the K target blocks to predict.
    secondary: uniform only: [B, H, W] bool, visible tokens the encoder sees as mask tokens (UM-MAE's secondary
               masking); always a subset of ~mask.
    num_hidden: the hidden count of every sample, where the strategy makes it exact (None: it varies).
    target_tokens: multi-block only: the smallest target block's token count, where it is known on the host (the
               targets drawn on the CPU, or block sizes shared by the batch); None: counted from ``targets``, a host
               sync where they are on a GPU.
    """

    mask: torch.Tensor
    targets: torch.Tensor | None = None
    secondary: torch.Tensor | None = None
    num_hidden: int | None = None
    target_tokens: int | None = None

    def __post_init__(self) -> None:
        # bool, or 0/1 of another dtype (a strategy of one's own from numpy: made bool here, as a plain tensor given
        # to a model is); other values are refused: Masks(torch.full(..., 0.5)) was taken as it was, and hid
        # arbitrary tokens or weighted a loss by 0.5 (the check reads the values: a sync on a GPU, for non-bool only)
        for name in ("mask", "targets", "secondary"):
            t = getattr(self, name)
            if t is None or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
                continue
            if not isinstance(t, torch.Tensor) or t.is_complex():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"Masks.{name} must be a bool tensor (True = hidden), got {got}")
            setattr(self, name, as_bool(t, f"Masks.{name} holds True/1 for hidden tokens and False/0 for visible "
                                           f"ones; this {t.dtype} one has other values"))  # fmt: skip

    def info(self, ids: bool = True) -> MaskInfo:
        """MAE's index form of ``mask`` flattened per sample: needs the same hidden count in every sample (with an
        exact count known, no host sync). ``ids=False``: the float mask alone (``mask_only``), for encoders that keep
        every token; any count per sample."""
        return masking_from_bool(self.mask.flatten(1), self.num_hidden) if ids else mask_only(self.mask.flatten(1))

    def to(self, device) -> Masks:
        """On ``device``; to a GPU asynchronously: CPU tensors are pinned first (a copy from pageable memory may wait
        for the stream). The host counts (``num_hidden``, ``target_tokens``; the smallest target block
        counted here from CPU targets) come along."""
        device = torch.device(device)
        tokens = self.target_tokens
        if tokens is None and self.targets is not None and self.targets.device.type == "cpu":
            tokens = smallest_block(self.targets)

        def move(t):
            if t is None or t.device == device:
                return t
            if device.type != "cuda":  # (to the host: a blocking copy, so that the values are there when read)
                return t.to(device)
            if t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Masks(move(self.mask), move(self.targets), move(self.secondary), self.num_hidden, tokens)


def smallest_block(targets: torch.Tensor) -> int:
    """The token count of the smallest of the target blocks [B, K, H, W] (or [B, K, N]); 0 when there are none (a
    host read: on a GPU, a sync)."""
    flat = targets.flatten(2)
    return int(flat.sum(-1).min()) if flat.numel() else 0


def as_mask_info(mask, ids: bool, num_tokens: int | None = None, who: str = "the model",
                 grid: tuple[int, int] | None = None, batch: int | None = None) -> MaskInfo:  # fmt: skip
    """A mask given to a model's forward, in the form it needs: a ``MaskInfo`` as it is; a ``Masks`` (a strategy's
    output) or a tensor [B, N] or [B, H, W] (bool, or 0/1; True / 1 = hidden) turned into MAE's index form (``ids``:
    the same hidden count in every sample) or the float mask alone. ``num_tokens``, ``grid``, ``batch``: the patches
    per image, their grid and the batch's size, which the mask must fit (checked where given)."""
    if isinstance(mask, MaskInfo):
        _check_layout(mask.mask, "the MaskInfo's mask", num_tokens, grid, batch, who)
        return mask
    if isinstance(mask, Masks):
        _check_layout(mask.mask, "the Masks' mask", num_tokens, grid, batch, who)
        return mask.info(ids)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{who}: mask must be a MaskInfo (build_mask(...)(batch).info()), a Masks or a [B, N] tensor "
                        f"(True = hidden), got {type(mask).__name__}")  # fmt: skip
    _check_layout(mask, "a mask tensor", num_tokens, grid, batch, who)
    flat = as_bool(mask.flatten(1), f"{who}: a mask tensor holds True/1 for hidden patches and False/0 for visible "
                                    "ones; this one has other values")  # fmt: skip
    return masking_from_bool(flat) if ids else mask_only(flat)


def as_bool(t: torch.Tensor, refusal: str) -> torch.Tensor:
    """A mask given as bool, or as 0/1 of another dtype, as bool; other values are refused with ``refusal``."""
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(refusal)
    return t != 0


def _check_layout(mask: torch.Tensor, what: str, num_tokens: int | None, grid: tuple[int, int] | None,
                  batch: int | None, who: str) -> None:  # fmt: skip
    """A mask [B, N] or [B, H, W] for ``batch`` images of ``num_tokens`` patches on ``grid``: else one line saying
    which of them does not fit (a mask of another grid with as many tokens, such as 9x7 for 7x9, included)."""
    shape = tuple(mask.shape)
    want = f"[B, {num_tokens}]" if num_tokens is not None else "[B, N]"
    if grid is not None:
        want += f" or [B, {grid[0]}, {grid[1]}]"
    if mask.dim() not in (2, 3) or (num_tokens is not None and math.prod(shape[1:]) != num_tokens):
        raise ValueError(f"{who}: {what} must be {want} (True = hidden, one row per image), got shape {shape}")
    if mask.dim() == 3 and grid is not None and shape[1:] != tuple(grid):
        raise ValueError(f"{who}: {what} is a {shape[1]}x{shape[2]} grid; this model's patch grid is "
                         f"{grid[0]}x{grid[1]} (height x width)")  # fmt: skip
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{who}: {what} holds masks for {shape[0]} images; the batch has {batch}")


def _check_num_masks(num_masks) -> int:
    if as_int(num_masks) is None or num_masks < 1:
        raise ValueError(f"num_masks must be a positive int, got {num_masks!r}")
    return as_int(num_masks)


def as_grid(grid: int | tuple[int, int], what: str = "grid") -> tuple[int, int]:
    single = as_int(grid)
    try:
        g = (single, single) if single is not None else tuple(as_int(v) for v in grid)
    except TypeError:  # a float or another non-iterable
        g = ()
    if len(g) != 2 or not all(v is not None and v >= 1 for v in g):
        raise ValueError(f"{what} must be a positive int or (height, width) of positive ints, got {grid!r}")
    return g  # type: ignore[return-value]


def check_ratio(name: str, value: float, low_open: bool = True, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (numpy's numbers too)
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok_low = v > 0.0 if low_open else v >= 0.0
    ok_high = v < 1.0 if high_open else v <= 1.0
    if not (ok_low and ok_high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")
    return v


def check_range(name: str, pair, positive: bool = True) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (min, max) pair of numbers, got {pair!r}") from None
    if not (lo <= hi) or (positive and lo <= 0.0):
        raise ValueError(f"{name} must be (min, max) with {'0 < ' if positive else ''}min <= max, got {pair!r}")
    return lo, hi


class MaskStrategy(abc.ABC):
    """Base class. Subclasses set ``name``, implement ``_torch`` and ``_ref`` (and ``_cpp`` where listed in
    ``cpp``), and validate their parameters in ``__init__`` (after calling ``super().__init__``).

    Args:
        grid: token grid (H, W) or one int for a square grid.
        seed: the run's seed; masks depend on (seed, epoch, sample index) only.
        impl: "auto", "torch", "triton", "cpp" or "ref".
        num_masks: masks per sample of every call that does not say otherwise (data2vec 2.0: 16).
    """

    name: ClassVar[str]
    has_cpp: ClassVar[bool] = False
    has_triton: ClassVar[bool] = False  # a Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)
    inputs: ClassVar[tuple[str, ...]] = ()  # per-batch tensors the strategy needs (scores, losses)

    def __init__(self, grid: int | tuple[int, int], *, seed: int = 0, impl: str = "auto", num_masks: int = 1):
        self.grid = as_grid(grid)
        self.num_masks = _check_num_masks(num_masks)
        self.seed = as_int(seed)
        if self.seed is None:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "cpp":
            if not self.has_cpp:
                raise ValueError(f"mask strategy {self.name!r} has no C++ implementation (use 'torch' or 'ref')")
            _ext.require()
        if impl == "triton" and not self.has_triton:
            raise ValueError(f"mask strategy {self.name!r} has no Triton implementation (use 'torch' or 'ref')")
        self.impl = impl
        self._drawn = 0

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def resolve_impl(self, device: torch.device) -> str:
        if self.impl != "auto":
            return self.impl
        if self.has_cpp and device.type == "cpu" and _ext.available():
            return "cpp"
        if self.has_triton and device.type == "cuda" and triton_available() is None:
            return "triton"
        return "torch"

    def __call__(
        self,
        batch: int | None = None,
        *,
        indices: torch.Tensor | None = None,
        epoch: int = 0,
        device: torch.device | str | None = None,
        seed: int | None = None,
        num_masks: int | None = None,
        **inputs: torch.Tensor,
    ) -> Masks:
        """Masks for the samples ``indices`` ([B] int, dataset indices) at ``epoch``; without indices, ``batch``
        consecutive indices continuing from the previous call (a reproducible stream for a fixed call sequence).
        ``seed`` overrides the strategy's seed for this call. ``num_masks`` M > 1 (default: the strategy's): M masks per
        sample (data2vec 2.0's multi-mask training), [B * M, ...] sample-major (``repeat_interleave`` order), mask j
        of a sample a pure function of (seed, epoch, index, j); mask 0 is the single-mask draw."""
        num_masks = self.num_masks if num_masks is None else _check_num_masks(num_masks)
        if indices is None:
            batch = as_int(batch) if batch is not None else None
            if batch is None or batch < 0:
                raise ValueError(f"batch must be a non-negative int when no indices are given, got {batch!r}")
            indices = torch.arange(self._drawn, self._drawn + batch, dtype=torch.int64)
            self._drawn += batch
        else:
            indices = torch.as_tensor(indices)
            if batch is not None and batch != indices.shape[0]:
                raise ValueError(f"batch={batch} but {indices.shape[0]} indices were given")
        if as_int(epoch) is None or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        epoch = as_int(epoch)
        missing = [k for k in self.inputs if k not in inputs]
        extra = [k for k in inputs if k not in self.inputs]
        if missing or extra:
            need = ", ".join(self.inputs) or "none"
            raise TypeError(f"mask strategy {self.name!r} takes per-batch inputs: {need}; "
                            f"missing {missing}, unexpected {extra}")  # fmt: skip
        dev = torch.device(device) if device is not None else None
        if dev is None:
            dev = next((t.device for t in inputs.values()), torch.device("cpu"))
        inputs = {k: self._check_input(k, torch.as_tensor(v).to(dev), indices.shape[0]) for k, v in inputs.items()}
        if seed is not None:
            given, seed = seed, as_int(seed)
            if seed is None:
                raise TypeError(f"seed must be an int, got {type(given).__name__}")
        # keys from the indices where they are (the loader's: CPU, where the check costs no host sync), then moved
        keys = sample_keys(self.seed if seed is None else seed, epoch, indices)
        if num_masks > 1:  # (where the indices are, the loader's CPU: not ~300 small launches on a GPU)
            clones = stream_keys(keys, [CLONE_STREAM + j for j in range(1, num_masks)])  # [B, M - 1]
            keys = torch.cat([keys[:, None], clones], 1).flatten()
            inputs = {k: v.repeat_interleave(num_masks, 0) for k, v in inputs.items()}
        if dev.type == "cuda" and keys.device.type == "cpu":  # pinned: an asynchronous copy (a pageable one may wait)
            keys = keys.pin_memory()
        keys = keys.to(dev, non_blocking=True)
        impl = self.resolve_impl(dev)
        if impl == "torch":
            out = self._torch(keys, **inputs)
        elif impl == "triton":
            why = triton_problem(dev)
            if why:
                raise RuntimeError(f"mask strategy {self.name!r}: impl='triton' cannot run here: {why}")
            out = self._triton(keys, **inputs)
        else:
            keys_cpu = keys.cpu()
            inputs_cpu = {k: v.cpu() for k, v in inputs.items()}
            out = self._cpp(keys_cpu, **inputs_cpu) if impl == "cpp" else self._ref_batch(keys_cpu, **inputs_cpu)
            out = out.to(dev)
        if out.num_hidden is None:  # a strategy may know a per-call count (I-JEPA's batch-shared masks)
            out.num_hidden = self.exact_hidden
        return out

    def draw(self, batch: int, device: torch.device | str | None = None, **kw) -> Masks:
        """Masks for samples 0 .. batch-1 under a seed drawn from torch's RNG: a model's own draw when it is given no
        masks (seeding and resume cover it). ``kw``: as ``__call__`` (num_masks, per-batch inputs)."""
        seed = int(torch.randint(0, 2**62, (1,)))
        return self(indices=torch.arange(batch), seed=seed, device=device, **kw)

    @property
    def exact_hidden(self) -> int | None:
        """Hidden tokens in every mask (tube: per frame times frames) where the strategy makes the count exact."""
        return None

    def _check_input(self, name: str, value: torch.Tensor, batch: int) -> torch.Tensor:
        h, w = self.grid
        if value.shape not in ((batch, h * w), (batch, h, w)):
            raise ValueError(f"mask strategy {self.name!r}: {name} must be [B, H*W] or [B, H, W] = [{batch}, {h * w}] "
                             f"or [{batch}, {h}, {w}], got {tuple(value.shape)}")  # fmt: skip
        if not value.is_floating_point():
            raise TypeError(f"mask strategy {self.name!r}: {name} must be a float tensor, got {value.dtype}")
        # on CPU only: on CUDA the check would cost a host sync every call (the ops' id checks follow the same rule)
        if value.device.type == "cpu" and not bool(torch.isfinite(value).all()):
            raise ValueError(f"mask strategy {self.name!r}: {name} has non-finite values")
        return value.reshape(batch, h * w).float()

    def _ref_batch(self, keys: torch.Tensor, **inputs: torch.Tensor) -> Masks:
        outs = [self._ref(random.Random(int(k)), **{n: v[i] for n, v in inputs.items()}) for i, k in enumerate(keys)]
        if not outs:
            return self._torch(keys, **inputs)
        stack = lambda f: None if getattr(outs[0], f) is None else torch.stack([getattr(o, f) for o in outs])  # noqa: E731
        return Masks(stack("mask"), stack("targets"), stack("secondary"))

    @abc.abstractmethod
    def _torch(self, keys: torch.Tensor, **inputs: torch.Tensor) -> Masks:
        """Batched: keys [B] int64 on the target device."""

    @abc.abstractmethod
    def _ref(self, rng: random.Random, **inputs: torch.Tensor) -> Masks:
        """One sample (fields without the batch dimension), in plain Python."""

    def _cpp(self, keys: torch.Tensor, **inputs: torch.Tensor) -> Masks:
        raise NotImplementedError

    def _triton(self, keys: torch.Tensor, **inputs: torch.Tensor) -> Masks:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "impl")
        return f"{type(self).__name__}({params})"
