"""PixMIM (Liu et al. 2023): MAE whose target is the low-frequency part of the image.

Mask: MAE's random masking (75%). Encoder: ViT on the visible tokens. Head: MAE's transformer decoder. Target:
``fastmim.targets.LowPassTarget`` (ideal circular low-pass filter, r = 40 at 224 px, then norm-pix MSE on the masked
patches). The encoder exports to timm like MAE's.
"""

from __future__ import annotations

from fastmim.methods.mae import MaskedAutoencoderViT, register_vit_family
from fastmim.targets.low_pass import LowPassTarget, default_radius


class PixMIMViT(LowPassTarget, MaskedAutoencoderViT):
    """MaskedAutoencoderViT with PixMIM's low-pass target.

    Args:
        low_pass_radius: radius of the circular filter in the shifted spectrum; None: 40 x img_size / 224.
        **kwargs: MaskedAutoencoderViT's.
    """

    def __init__(self, *, low_pass_radius: float | None = None, **kwargs):
        if kwargs.get("target", "pixels") != "pixels":
            raise ValueError(f"PixMIM's target is the low-pass image; target={kwargs['target']!r} is MAE's option")
        super().__init__(**kwargs)
        side = min(self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        self.low_pass_radius = default_radius(side) if low_pass_radius is None else float(low_pass_radius)
        if not self.low_pass_radius > 0:
            raise ValueError(f"low_pass_radius must be > 0, got {low_pass_radius!r}")


register_vit_family("pixmim", PixMIMViT)
