"""Fixed 2-D sine-cosine position embeddings (MAE's construction)."""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: sin of pos*omega in the first half, cos in the second."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for sin-cos embeddings, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = pos.reshape(-1).double()[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """[(1 +) gh*gw, embed_dim] embeddings in raster order; the class-token row is zeros.

    As in MAE, the first half of the channels encodes the column (w) and the second half the row (h).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos embeddings, got {embed_dim}")
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw)  # [gh, gw]
    cols = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw)  # [gh, gw]
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)  # [gh*gw, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
