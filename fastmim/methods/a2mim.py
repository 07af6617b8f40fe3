"""A2MIM (Li et al. 2023; Westlake-AI/openmixup ``A2MIM``, ``A2MIMHead``) on a ViT.

SimMIM's mask (32-px mask patches at 60%), head (1x1 convolution + PixelShuffle) and L1 on the masked pixels, with
A2MIM's two changes: the input's masked pixels are filled with each image's per-channel mean before the patch
embedding, and the mask token is added to the masked patch embeddings (``x + mask_token * m``) instead of replacing
them; and a frequency term, ``0.1 x fft_loss``: the focal frequency loss of the reconstruction (its visible pixels
replaced by ``0.5 * rec.detach() + 0.5 * target``) against the image (``fastmim.ops.fft_loss``: one FFT per batch).
The head's convolution is drawn as openmixup's ``NonLinearMIMNeck`` draws it (truncated normal 0.02, zero bias). The
ViT's defaults are MAE's; A2MIM's ViT-B (configs/a2mim_vit_base_in1k.yaml) adds drop path 0.1, layer scale 0.1, a
relative position bias in each block (``rel_pos_bias="block"``, openmixup's ``use_window``), a learned absolute
position embedding and openmixup's truncated-normal initialisation (``init="trunc"``).
"""

from __future__ import annotations

import torch

from fastmim._args import check_number
from fastmim.methods.mae import register_vit_family
from fastmim.methods.simmim import SimMIMViT
from fastmim.targets.frequency import FrequencyLoss

A2MIM_FFT_WEIGHT = 0.1


class A2MIMViT(SimMIMViT):
    """A2MIM with a ViT encoder; arguments as ``SimMIMViT`` plus ``fft_weight`` (A2MIM: 0.1). With
    ``target="lowpass"`` both terms compare with the low-frequency image."""

    def __init__(self, *args, fft_weight: float = A2MIM_FFT_WEIGHT, **kwargs):
        if kwargs.get("target") == "hog":
            raise ValueError("A2MIM's frequency loss compares reconstructed images: target='hog' does not apply "
                             "(SimMIM with target='hog', or MaskFeat, predict HOG features)")  # fmt: skip
        super().__init__(*args, **kwargs)
        self.fft_weight = check_number("A2MIMViT", "fft_weight", fft_weight, lo=0.0)  # (-1 maximised the FFT loss)
        conv = self.decoder[0]  # openmixup's NonLinearMIMNeck.init_weights: trunc_normal_init(std=0.02, bias=0)
        torch.nn.init.trunc_normal_(conv.weight, std=0.02)
        torch.nn.init.zeros_(conv.bias)
        self.freq_loss = FrequencyLoss("batch", self.patch_size, fused=self.fused_ops)

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """openmixup's A2MIM config exempts norms, biases, layer scales, the class and mask tokens and the position
        embedding, and (its regular expression "bias" matches them) the relative position tables."""
        return (p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "mask_token", "pos_embed")
                or "relative_position_bias_table" in name)  # fmt: skip

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked pixels filled with each image's channel means, then the patch embedding plus the mask token at the
        masked tokens: [B, C, H, W], mask [B, N] (1 = hidden) -> [B, 1 + N, D]."""
        self.patch_embed.check(imgs)  # (before the reshapes below, whose errors would not say it)
        b, _, h, w = imgs.shape
        p = self.patch_size
        m = mask.view(b, 1, h // p, 1, w // p, 1).to(imgs.dtype)
        x = imgs.reshape(b, -1, h // p, p, w // p, p)
        x = x * (1 - m) + imgs.mean(dim=(2, 3)).view(b, -1, 1, 1, 1, 1) * m  # no [B, 1, H, W] mask materialised
        x = self.patch_embed(x.reshape(imgs.shape))
        x = x + self.mask_token.to(x.dtype) * mask.unsqueeze(-1).to(x.dtype)
        return self.encode_tokens(self.with_pos(x))

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SimMIM's L1 on the masked pixels + fft_weight x A2MIM's focal frequency loss of ``rec``."""
        loss = super().forward_loss(imgs, pred, mask)
        if self.fft_weight and rec is not None:
            loss = loss + self.fft_weight * self.freq_loss(rec, imgs, mask)
        return loss


register_vit_family("a2mim", A2MIMViT, light_decoder=False)
