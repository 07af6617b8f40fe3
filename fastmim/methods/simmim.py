"""SimMIM (Xie et al. 2022; microsoft/SimMIM) on a ViT.

Mask: 32-px mask patches over 16-px tokens (2x2 tokens: 28 px at patch 14), 60% (``fastmim.masking`` "simmim"; any
other strategy with ``mask_type``). Encoder: the ViT on every token, the masked patch embeddings replaced by a learned
mask token right after the patch embedding (before the class token and the position embedding). Head: SimMIM's 1x1
convolution to p*p*3 channels + PixelShuffle(p) on the normed patch tokens. Target: the normalised image, no per-patch
normalisation; L1 on the masked pixels, divided by their count times the channels. The ViT's defaults are MAE's
(a fixed sin-cos position embedding, no drop path, layer scale or relative position bias, MAE's initialisation);
SimMIM's ViT-B (its config file and the recipe's configs/simmim_vit_base_in1k.yaml) is ``drop_path_rate=0.1,
init_values=0.1, abs_pos_embed=False, rel_pos_bias="shared", init="beit"``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastmim.heads import LinearHead, PixelShuffleHead
from fastmim.masking import MaskInfo
from fastmim.masking.base import MaskStrategy, as_mask_info
from fastmim.methods.mae import MASK_TYPES, mask_strategy_for, register_vit_family, require_two_patches
from fastmim.models.vit import VisionTransformer, trunc_normal_02
from fastmim.ops import masked_mse_loss, masked_mse_loss_ref, patchify
from fastmim.ops.reference import patchify_ref
from fastmim.targets.choice import TargetChoice
from fastmim.targets.pixel import PixelTarget


class MaskTokenViT(TargetChoice, VisionTransformer):
    """A ViT encoder that sees every token, the masked patch embeddings replaced by a learned mask token right after
    the patch embedding (before the class token and the position embedding): SimMIM's and MaskFeat's encoder. Its
    encoder keys are the ViT's (exports to timm like MAE's); ``mask_token`` and ``decoder.*`` are the head's."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl, fused_norm,
                 drop_path_rate=0.0, init_values=None, abs_pos_embed=True, rel_pos_bias=None, init="mae"):  # fmt: skip
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl=attn_impl,
                         fused_norm=fused_norm, drop_path_rate=drop_path_rate, init_values=init_values,
                         abs_pos_embed=abs_pos_embed, rel_pos_bias=rel_pos_bias, init=init)  # fmt: skip
        require_two_patches(self, img_size, patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_02(self.mask_token, init)  # (SimMIM's, with BEiT's init: cut at one std)

    # the encoder keeps every token: it needs the masks' float form only, whatever each sample's count
    drops_tokens = False

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def make_mask(self, batch: int, device: torch.device, mask_ratio: float | None = None) -> MaskInfo:
        return self.mask_strategy(ratio=mask_ratio).draw(batch, device).info(ids=False)

    def _set_mask_type(self, mask_type: str | None, own: str) -> None:
        """``mask_type``: None (the recipe's ``own`` masks) or another of MASK_TYPES (random, block, simmim, uniform):
        the encoder keeps every token, so any strategy's masks fit, whatever their count per sample."""
        if mask_type is not None and mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be None (this recipe's own, {own}) or one of {MASK_TYPES}, got "
                             f"{mask_type!r}")  # fmt: skip
        self.mask_type = own if mask_type is None else mask_type

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], mask [B, N] (1 = hidden) -> [B, 1 + N, D]."""
        x = self.patch_embed(imgs)  # [B, N, D]
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return self.encode_tokens(self.with_pos(x))

    def forward_hog(self, imgs: torch.Tensor, mask: MaskInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MaskFeat's head and loss (``target="hog"``): a linear layer (``decoder``) from the final-normed patch
        tokens to each patch's HOG features, MSE on the masked patches. Returns (loss, pred [B, N, dim], mask)."""
        latent = self.forward_encoder(imgs, mask.mask)  # [B, 1 + N, D]
        pred = self.decoder(latent[:, 1:, :])  # [B, N, dim]
        return self.hog_loss(pred, imgs, mask.mask), pred, mask.mask

    def encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The encoder's weights alone (no mask token, no head): loads into timm's VisionTransformer."""
        state = self.state_dict() if state is None else state  # (or a whole state gathered from FSDP shards)
        return {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("decoder.")}


class SimMIMViT(PixelTarget, MaskTokenViT):
    """SimMIM with a ViT encoder; its encoder keys are the ViT's (exports to timm like MAE's).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT.
        mask_ratio: fraction of the mask patches hidden (SimMIM: 0.6).
        mask_type: None (SimMIM's: "simmim", random 2x2-token mask patches, 32 px at patch 16 as the paper, 28 px at
            patch 14) or another ``MaskedAutoencoderViT`` mask type ("random", "block", "uniform").
        target: "pixels" (SimMIM's), "lowpass" (PixMIM's low-frequency image, ``low_pass_radius``, ``image_mean`` /
            ``image_std`` as MAE's; the same L1) or
            "hog" (MaskFeat's HOG features, ``hog_cell``, ``hog_bins``, ``gaussian_window``; a linear head instead of
            the pixel-shuffle one, MSE); see ``fastmim.targets.choice``.
        fused_ops: fastmim.ops for the loss and patchify (False: the plain reference, the same values).
        attn_impl, drop_path_rate, init_values, abs_pos_embed, rel_pos_bias, init: see VisionTransformer (SimMIM's
            ViT-B: drop path 0.1, layer scale 0.1, no absolute position embedding, a shared relative position bias,
            BEiT's initialisation).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.6,
        fused_ops: bool = True,
        attn_impl: str = "auto",
        fused_norm: bool = False,
        mask_type: str | None = None,
        target: str = "pixels",
        hog_cell: int | None = None,
        hog_bins: int | None = None,
        gaussian_window: int | None = None,
        low_pass_radius: float | None = None,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        abs_pos_embed: bool | str = True,
        rel_pos_bias: str | None = None,
        init: str = "mae",
        image_mean: tuple[float, ...] | None = None,  # (last: the positions of the arguments before stay)
        image_std: tuple[float, ...] | None = None,
    ):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl, fused_norm,
                         drop_path_rate, init_values, abs_pos_embed, rel_pos_bias, init)  # fmt: skip
        self._set_mask_type(mask_type, "simmim")
        self.mask_ratio = mask_ratio
        self.fused_ops = fused_ops
        self.norm_pix_loss = False  # SimMIM predicts the normalised image itself
        out_dim = self.set_target(target, hog_cell, hog_bins, gaussian_window, low_pass_radius, image_mean, image_std)
        if target == "hog":
            self.decoder = LinearHead(embed_dim, out_dim)
        else:
            self.decoder = PixelShuffleHead(embed_dim, patch_size, in_chans)
        self.mask_strategy()  # a ratio or an image size its masks cannot take: refused here, not at every forward

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """SimMIM's ViT pretraining exempts 1-D parameters, biases and its ViT's no_weight_decay (the class token and
        position embedding): its mask token and relative position tables decay. (A2MIM's differs.)"""
        return p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")

    # --- Mask ---

    def mask_strategy(self, seed: int = 0, ratio: float | None = None) -> MaskStrategy:
        """This model's masks (SimMIM's unless ``mask_type`` says otherwise) as a ``fastmim.masking`` strategy of
        (seed, epoch, sample index)."""
        ratio = self.mask_ratio if ratio is None else ratio
        return mask_strategy_for(self.mask_type, self.grid_size, self.patch_size, seed, ratio)

    # --- Encoder: MaskTokenViT (every token, the masked ones as the mask token) ---

    # --- Head ---
    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, D] -> the predicted image [B, C, H, W]."""
        return self.decoder.forward_tokens(latent[:, 1:, :], self.grid_size)

    # --- Loss: L1 on the masked pixels ---
    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean absolute error over the masked pixels and channels (SimMIM's sum / (pixels * channels)); ``rec``, the
        predicted image, is for subclasses whose loss needs it whole (A2MIM's frequency term)."""
        loss_fn = masked_mse_loss if self.fused_ops else masked_mse_loss_ref
        return loss_fn(pred, imgs, mask, self.patch_size, norm_pix=False, p=1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: MaskInfo | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [B, N, p*p*C] in MAE's patch order, mask [B, N] with 1 = hidden)."""
        if mask is None:
            mask = self.make_mask(imgs.shape[0], imgs.device, mask_ratio)
        else:
            mask = as_mask_info(
                mask, False, self.num_patches, type(self).__name__, grid=self.grid_size, batch=imgs.shape[0]
            )
        if self.target == "hog":
            return self.forward_hog(imgs, mask)
        rec = self.forward_decoder(self.forward_encoder(imgs, mask.mask))  # [B, C, H, W]
        pred = (patchify if self.fused_ops else patchify_ref)(rec, self.patch_size)
        return self.forward_loss(self.checked_target_images(imgs), pred, mask.mask, rec), pred, mask.mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return super().reconstruct(self.checked_target_images(imgs), pred)


register_vit_family("simmim", SimMIMViT, light_decoder=False)
