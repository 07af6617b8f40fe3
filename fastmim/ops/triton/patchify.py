"""Triton kernel for patchify / unpatchify: one strided permute-copy between [B, C, H, W] and [B, L, p*p*C]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _patch_copy_kernel(
    img_ptr,  # [B, C, H, W], strides si_*
    pat_ptr,  # [B, L, D], strides sp_*, D = P * P * C in (pi, qi, c) order
    B,
    L,
    D,
    gw,
    P,
    C,
    si_b,
    si_c,
    si_h,
    si_w,
    sp_b,
    sp_l,
    sp_d,
    TO_PATCHES: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] flat patch index
    qmask = q < B * L
    b = q // L
    n = q % L  # patch index in the sample
    for d0 in range(0, D, BLOCK_D):
        e = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # int32 index times a stride could wrap past 2^31
        emask = e < D
        m = qmask[:, None] & emask[None, :]
        img_off = (
            b[:, None] * si_b
            + ((n // gw) * P * si_h + (n % gw) * P * si_w)[:, None]
            + ((e // (P * C)) * si_h + ((e // C) % P) * si_w + (e % C) * si_c)[None, :]
        )
        pat_off = b[:, None] * sp_b + n[:, None] * sp_l + e[None, :] * sp_d
        if TO_PATCHES:
            v = tl.load(img_ptr + img_off, mask=m)
            tl.store(pat_ptr + pat_off, v, mask=m)
        else:
            v = tl.load(pat_ptr + pat_off, mask=m)
            tl.store(img_ptr + img_off, v, mask=m)


def _run(img: torch.Tensor, pat: torch.Tensor, p: int, to_patches: bool) -> None:
    b, c, h, w = img.shape
    n, d = pat.shape[1], pat.shape[2]
    if img.numel() == 0:
        return
    block_d = min(triton.next_power_of_2(d), 1024)
    block_p = max(1, 4096 // block_d)
    grid = (triton.cdiv(b * n, block_p),)
    _patch_copy_kernel[grid](
        img, pat, b, n, d, w // p, p, c, *img.stride(), *pat.stride(),
        TO_PATCHES=to_patches, BLOCK_P=block_p, BLOCK_D=block_d,
    )  # fmt: skip


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = imgs.shape
    out = torch.empty((b, (h // p) * (w // p), p * p * c), dtype=imgs.dtype, device=imgs.device)
    _run(imgs, out, p, True)
    return out


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    gh, gw = grid
    out = torch.empty((x.shape[0], channels, gh * p, gw * p), dtype=x.dtype, device=x.device)
    _run(out, x, p, False)
    return out
