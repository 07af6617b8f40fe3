"""PixMIM (Liu et al. 2023): MAE whose target is the low-frequency part of the image.

Mask: MAE's random masking (75%). Encoder: ViT on the visible tokens. Head: MAE's transformer decoder. Target:
MAE's ``target="lowpass"`` (``fastmim.targets.choice``: ideal circular low-pass filter, r = 40 at 224 px, then
norm-pix MSE on the masked patches). The encoder exports to timm like MAE's.
"""

from __future__ import annotations

import torch

from fastmim.methods.mae import MaskedAutoencoderViT, register_vit_family


class PixMIMViT(MaskedAutoencoderViT):
    """MaskedAutoencoderViT with PixMIM's low-pass target.

    Args:
        low_pass_radius: radius of the circular filter in the shifted spectrum; None: 40 x img_size / 224.
        image_mean, image_std (in ``kwargs``): the normalisation the images carry, undone before the filter (None:
            ImageNet's, what fastmim's loaders give).
        **kwargs: MaskedAutoencoderViT's.
    """

    def __init__(self, *, low_pass_radius: float | None = None, **kwargs):
        if kwargs.pop("target", "lowpass") != "lowpass":
            raise ValueError(
                "PixMIM's target is the low-pass image; for another target use MAE (mae_*) with target=..."
            )
        super().__init__(target="lowpass", low_pass_radius=low_pass_radius, **kwargs)

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """mmselfsup's PixMIM (its MAE config's custom keys) exempts norms, biases and names holding cls_token,
        mask_token or pos_embed: unlike MAE's own code, the class and mask tokens do not decay (layer scales would:
        they are not norms there)."""
        return ((p.ndim <= 1 and not name.endswith(".gamma")) or name.endswith(".bias")
                or any(k in name for k in ("cls_token", "mask_token", "pos_embed")))  # fmt: skip


register_vit_family("pixmim", PixMIMViT)
