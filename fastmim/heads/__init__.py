"""Head module: what turns the encoder's tokens into the target's shape.

- ``PixelShuffleHead``: SimMIM's and A2MIM's 1x1 convolution to ``p * p * C`` channels + PixelShuffle(p): patch tokens
  on their grid -> an image [B, C, H, W].
- ``LinearHead``: one linear layer per token (MaskFeat: D -> 108 HOG values), truncated-normal init, zero bias.
- MAE's transformer decoder stays in ``fastmim.methods.mae`` (its parameters keep MAE's and timm's names).
Each keeps the parameter names its recipe's checkpoints use (``decoder.0.weight``, ``decoder.weight``).
"""

from __future__ import annotations

import torch
from torch import nn


class PixelShuffleHead(nn.Sequential):
    """[B, D, gh, gw] patch tokens on their grid -> [B, C, gh * p, gw * p]."""

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int = 3):
        super().__init__(nn.Conv2d(embed_dim, patch_size**2 * in_chans, 1), nn.PixelShuffle(patch_size))

    def forward_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, N, D] tokens in raster order -> the image [B, C, H, W]."""
        return self(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid))


class LinearHead(nn.Linear):
    """[B, N, D] -> [B, N, out_dim], weights truncated-normal (std 0.02), bias zero (MaskFeat's LinearNeck)."""

    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__(embed_dim, out_dim)
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)


__all__ = ["LinearHead", "PixelShuffleHead"]
