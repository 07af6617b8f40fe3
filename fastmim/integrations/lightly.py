"""lightly's MAE on fastmim's ops: drop-in equivalents of the helpers lightly's MAE is written with
(``lightly.models.utils``), for the same ``idx_keep`` / ``idx_mask`` (``random_token_mask``: the class token at 0,
patch ``j`` at token ``j + 1``).

    from fastmim.integrations import lightly as fl

    x_pred = fl.get_at_index(x_decoded, idx_mask)                   # was utils.get_at_index
    x_dec = fl.decode_masked(decoder, decoder.embed(x_encoded), idx_keep, idx_mask)
                                            # was repeat_token + set_at_index + decoder.decode
    loss = fl.mae_loss(x_pred, images, idx_mask, patch_size)        # was MSELoss(x_pred, get_at_index(patchify(...)))

``patch_lightly()`` makes lightly's own modules gather with fastmim's op (``lightly.models.utils.get_at_index``, which
its masked encoders and decoders call); ``unpatch_lightly()`` restores it. ``examples/lightly_mae.py`` trains
lightly's MAE (``MaskedVisionTransformerTIMM`` and ``MAEDecoderTIMM``) with all of them. Indices must be distinct
within a row, as lightly's masks are.
"""

from __future__ import annotations

import torch

from fastmim.integrations._versions import require
from fastmim.ops import gather_visible, masked_mse_loss, scatter_masked
from fastmim.ops._dispatch import check_id_values

TESTED = ("1.6.",)  # lightly versions these equivalents were checked against


def _utils():
    """lightly.models.utils (lightly imported, its version checked)."""
    import importlib

    require("lightly", TESTED, extra="lightly")
    return importlib.import_module("lightly.models.utils")


def _check_index(fn: str, name: str, index: torch.Tensor, rows: int) -> None:
    """An index argument of ``fn``: [rows, K] of int64 or int32 (named as the caller knows it)."""
    if index.dim() != 2 or index.shape[0] != rows or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: {name} must be [B={rows}, K] int64 (lightly's random_token_mask), got "
                         f"{index.dtype} of shape {tuple(index.shape)}")  # fmt: skip


def get_at_index(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``lightly.models.utils.get_at_index``: tokens [B, N, D] at index [B, K] -> [B, K, D], without the D-times
    expanded index (``fastmim.ops.gather_visible``; the backward writes each row once)."""
    if tokens.dim() != 3:
        raise ValueError(f"get_at_index: tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    _check_index("get_at_index", "index", index, tokens.shape[0])
    if not tokens.is_floating_point():  # (lightly gathers integer tensors too: its grid masks' patch indices) the
        # plain gather, lightly's own: nothing to differentiate, and repeats allowed
        return torch.gather(tokens, 1, index.long().unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    try:
        return gather_visible(tokens, index)
    except ValueError as e:
        if "repeats" not in str(e):
            raise
        patched = "get_at_index" in _SAVED  # (patch_lightly installed it as lightly's)
        how = "; unpatch_lightly() restores lightly's own, which allows repeats" if patched else ""
        raise ValueError(f"get_at_index (fastmim's gather): {e} (as lightly's masks are){how}") from None


def _restore(first: torch.Tensor, rest: torch.Tensor, check: str | None = None) -> torch.Tensor:
    """ids_restore for ``scatter_masked``: token position -> its row in (``first`` ++ ``rest``) order. ``check``: the
    calling function, which takes (``first`` ++ ``rest``) from its user: checked to be a permutation (argsort would
    hide a repeat)."""
    both = torch.cat([first, rest], dim=1)
    if check is not None:
        check_id_values(check, "cat(idx_keep, idx_mask)", both, both.shape[1], distinct=True)
    return torch.argsort(both, dim=1)


def _decoder_parts(decoder) -> tuple:
    """(mask token, position embedding, blocks, norm) of lightly's ``MAEDecoderTIMM`` or
    ``MaskedVisionTransformerDecoderTIMM``."""
    if hasattr(decoder, "decoder_pos_embed"):
        return decoder.mask_token, decoder.decoder_pos_embed, decoder.decoder_blocks, decoder.decoder_norm
    if hasattr(decoder, "pos_embed") and hasattr(decoder, "blocks"):
        return decoder.mask_token, decoder.pos_embed, decoder.blocks, decoder.norm
    raise TypeError(f"decode_masked: expected lightly's MAEDecoderTIMM or MaskedVisionTransformerDecoderTIMM, got "
                    f"{type(decoder).__name__}")  # fmt: skip


def decode_masked(decoder, x: torch.Tensor, idx_keep: torch.Tensor, idx_mask: torch.Tensor) -> torch.Tensor:
    """lightly's MAE decoding of embedded tokens ``x`` [B, K, D] (the encoder's kept tokens, class token included,
    through ``decoder.embed``): ``decoder.decode(set_at_index(repeat_token(mask_token, (B, N)), idx_keep, x))``, with
    the placement, the mask tokens and the position embedding in one pass (``fastmim.ops.scatter_masked``).
    ``idx_mask``: the other token positions (``random_token_mask``'s second output)."""
    mask_token, pos_embed, blocks, norm = _decoder_parts(decoder)
    if x.dim() != 3:
        raise ValueError(f"decode_masked: x must be [B, K, D] (decoder.embed of the kept tokens), got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    _check_index("decode_masked", "idx_keep", idx_keep, x.shape[0])
    _check_index("decode_masked", "idx_mask", idx_mask, x.shape[0])
    if x.shape[1] != idx_keep.shape[1]:
        raise ValueError(f"decode_masked: x has {x.shape[1]} tokens and idx_keep {idx_keep.shape[1]}: x must be the "
                         "kept tokens, in idx_keep's order (are idx_keep and idx_mask swapped?)")  # fmt: skip
    if idx_keep.shape[1] + idx_mask.shape[1] != pos_embed.shape[1]:
        raise ValueError(f"decode_masked: idx_keep ({idx_keep.shape[1]}) and idx_mask ({idx_mask.shape[1]}) must "
                         f"cover the decoder's {pos_embed.shape[1]} token positions")  # fmt: skip
    return norm(blocks(scatter_masked(x, _restore(idx_keep, idx_mask, "decode_masked"), mask_token, pos_embed)))


def mae_loss(pred: torch.Tensor, images: torch.Tensor, idx_mask: torch.Tensor, patch_size: int,
             norm_pix: bool = False, num_prefix_tokens: int = 1) -> torch.Tensor:  # fmt: skip
    """lightly's MAE loss, ``MSELoss()(pred, get_at_index(patchify(images, p), idx_mask - 1))``, read straight from
    the images (``fastmim.ops.masked_mse_loss``: no patchified copy, no gathered target); ``norm_pix``: MAE's
    per-patch normalised target (lightly's example uses the raw pixels). pred: [B, M, p*p*C] for the tokens
    ``idx_mask``; ``num_prefix_tokens``: tokens before the patches (lightly: the class token)."""
    if images.dim() != 4:
        raise ValueError(f"mae_loss: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    n = (h // patch_size) * (w // patch_size)
    _check_index("mae_loss", "idx_mask", idx_mask, b)
    want = (b, idx_mask.shape[1], patch_size * patch_size * c)
    if tuple(pred.shape) != want:
        raise ValueError(f"mae_loss: pred has shape {tuple(pred.shape)}, expected {want}: [B, one row per token of "
                         f"idx_mask, patch_size**2 * C]")  # fmt: skip
    # the masked tokens must be distinct patches (a repeat would be counted once, an out-of-range one misplaced)
    check_id_values("mae_loss", "idx_mask", idx_mask, n + num_prefix_tokens, distinct=True, lower=num_prefix_tokens)
    patches = idx_mask - num_prefix_tokens
    hidden = torch.zeros(b, n, device=images.device, dtype=pred.dtype)
    hidden.scatter_(1, patches, 1.0)
    others = torch.argsort(hidden, dim=1, stable=True)[:, : n - patches.shape[1]]  # the patches not predicted
    zero = pred.new_zeros(pred.shape[-1])
    full = scatter_masked(pred, _restore(patches, others), zero)  # pred in place, zeros elsewhere (never read)
    return masked_mse_loss(full, images, hidden, patch_size, norm_pix=norm_pix)


_SAVED: dict[str, object] = {}


def patch_lightly() -> None:
    """lightly's masked encoders and decoders gather the kept tokens with ``fastmim.ops.gather_visible``
    (``lightly.models.utils.get_at_index`` replaced, for every caller: the indices must then be distinct within a
    row, as lightly's masks are; a repeat is refused on CPU, unchecked on CUDA). Idempotent."""
    utils = _utils()
    if "get_at_index" not in _SAVED:
        _SAVED["get_at_index"] = utils.get_at_index
    utils.get_at_index = get_at_index


def unpatch_lightly() -> None:
    """Restores lightly's own ``get_at_index``."""
    if "get_at_index" in _SAVED:
        _utils().get_at_index = _SAVED.pop("get_at_index")


def is_patched() -> bool:
    return _utils().get_at_index is get_at_index
