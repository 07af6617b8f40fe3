"""MAE's per-sample random masking: uniform noise, argsort, keep the first ``int(N * (1 - ratio))`` ids."""

from __future__ import annotations

from typing import NamedTuple

import torch


class MaskInfo(NamedTuple):
    """What the encoder and the loss need to know about one batch of masks.

    ids_keep:    [B, K] indices of the visible tokens, in shuffled order
    ids_restore: [B, N] inverse permutation: position of each token in (visible ++ masked) order
    mask:        [B, N] 1.0 for removed (masked) tokens, 0.0 for visible ones, in the original token order

    ``ids_keep`` and ``ids_restore`` are None where only ``mask`` is made (``mask_only``): for encoders that keep
    every token and replace the masked ones (SimMIM, MaskFeat, A2MIM), whose masks may hide a different number of
    tokens per sample.
    """

    ids_keep: torch.Tensor | None
    ids_restore: torch.Tensor | None
    mask: torch.Tensor


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Number of kept tokens, as MAE computes it (truncating); at least one token stays visible and, with two or more
    tokens, at least one is masked (a ratio within rounding of 0 or 1 would otherwise leave nothing to learn)."""
    check_mask_ratio(mask_ratio)
    return max(1, min(num_tokens - 1, int(num_tokens * (1 - mask_ratio))))


def check_mask_ratio(mask_ratio: float) -> None:
    if not isinstance(mask_ratio, int | float) or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be a number in the open interval (0, 1), got {mask_ratio!r}")


def random_masking(
    batch: int, num_tokens: int, mask_ratio: float, device=None, generator: torch.Generator | None = None
) -> MaskInfo:
    """Draws an independent random mask per sample with exactly ``num_tokens - num_visible`` masked tokens.

    Args:
        batch: number of samples B.
        num_tokens: tokens per sample N (patches, no class token).
        mask_ratio: fraction of tokens to remove, in (0, 1).
        device: where the masks live.
        generator: optional torch.Generator for reproducible masks; it may live on another device than ``device``
            (a CPU generator gives the same masks on every device: the noise is drawn where the generator is).
    """
    len_keep = num_visible(num_tokens, mask_ratio)
    if generator is not None and torch.device(device or "cpu").type != generator.device.type:
        noise = torch.rand(batch, num_tokens, device=generator.device, generator=generator).to(device)  # [B, N]
    else:
        noise = torch.rand(batch, num_tokens, device=device, generator=generator)  # [B, N]
    return masking_from_noise(noise, len_keep)


def masking_from_noise(noise: torch.Tensor, len_keep: int) -> MaskInfo:
    """Keeps the ``len_keep`` tokens with the smallest noise (MAE's argsort construction)."""
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, K]
    mask = torch.ones_like(noise)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # [B, N] back to token order
    return MaskInfo(ids_keep, ids_restore, mask)


def mask_only(mask: torch.Tensor) -> MaskInfo:
    """``MaskInfo`` with the float mask alone (no indices): any count per sample, no sort and no host sync.

    Args:
        mask: [B, N] bool (or 0/1), True = masked.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, N], got shape {tuple(mask.shape)}")
    return MaskInfo(None, None, mask.float())


def masking_from_bool(mask: torch.Tensor, num_hidden: int | None = None) -> MaskInfo:
    """Turns a given boolean mask [B, N] (True = masked, the same count in every row) into MAE's index form.

    Visible tokens keep their raster order, which is what the encoder sees either way since position embeddings
    are added before the gather. ``num_hidden``: the count when the caller knows it (a mask strategy's exact count):
    no check and no host sync.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, N], got shape {tuple(mask.shape)}")
    n = mask.shape[1]
    if num_hidden is None:
        counts = mask.sum(dim=1)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise ValueError("every sample's mask must hide the same number of tokens for an encoder that drops them "
                             "(build_mask('block', ..., exact=True) and build_mask('multiblock', ..., truncate=True) "
                             "make equal counts)")  # fmt: skip
        num_hidden = int(counts[0]) if counts.numel() else 0
    if mask.shape[0] and num_hidden >= n:  # (as mask_ratio=1 is refused: the encoder would see only its class token)
        raise ValueError(f"the mask hides all {n} tokens: an encoder that drops the hidden ones would see none")
    # visible tokens first, each group in raster order: a stable sort of the 0/1 mask
    noise = mask.float() * n + torch.arange(n, device=mask.device, dtype=torch.float32)
    return masking_from_noise(noise, n - num_hidden)
