"""Head module: what turns the encoder's tokens into the target's shape.

- ``PixelShuffleHead``: SimMIM's and A2MIM's 1x1 convolution to ``p * p * C`` channels + PixelShuffle(p): patch tokens
  on their grid -> an image [B, C, H, W].
- ``LinearHead``: one linear layer per token (MaskFeat: D -> 108 HOG values), truncated-normal init, zero bias.
- ``ConvDecoder2d``: data2vec 2.0's decoder: [grouped KxK convolution -> LayerNorm without affine -> GELU] layers with
  residuals on the token grid, then a linear projection back to the encoder's width.
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


class ConvDecoder2d(nn.Module):
    """data2vec 2.0's ``Decoder2d`` (fairseq ``modalities/modules.py``): tokens [B, N, D] on their ``grid`` ->
    ``layers`` x [Conv2d(kernel, groups, same padding) -> LayerNorm over channels (no affine) -> GELU], each layer's
    output plus its input where the widths match, then Linear(decoder_dim -> D) per token -> [B, N, D].

    Args:
        embed_dim: the encoder's width D (input and output).
        grid: the token grid (gh, gw).
        decoder_dim, layers, kernel, groups: data2vec 2.0's ViT-B image decoder: 768, 6, 3, 16.
    """

    def __init__(self, embed_dim: int, grid: tuple[int, int], decoder_dim: int = 768, layers: int = 6,
                 kernel: int = 3, groups: int = 16):  # fmt: skip
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"ConvDecoder2d: kernel must be odd (same padding), got {kernel}")
        for name, dim in (("embed_dim", embed_dim), ("decoder_dim", decoder_dim)):
            if dim % groups:
                raise ValueError(f"ConvDecoder2d: {name} {dim} is not divisible by groups {groups}")
        self.grid = tuple(grid)
        self.convs = nn.ModuleList(
            nn.Conv2d(embed_dim if i == 0 else decoder_dim, decoder_dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers)
        )
        self.proj = nn.Linear(decoder_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, *self.grid)
        for conv in self.convs:
            y = conv(x)
            y = nn.functional.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2]).permute(0, 3, 1, 2)
            y = nn.functional.gelu(y)
            x = y + x if y.shape[1] == x.shape[1] else y
        return self.proj(x.flatten(2).transpose(1, 2))


__all__ = ["ConvDecoder2d", "LinearHead", "PixelShuffleHead"]
