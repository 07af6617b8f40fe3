"""Triton kernel for patchify / unpatchify: one strided permute-copy between [B, C, H, W] and [B, L, p*p*C]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._launch import jit_kernel


@jit_kernel
def _patch_copy_kernel(
    img_ptr,  # [B, C, H, W], strides si_*
    pat_ptr,  # [B, L, D], strides sp_*, D = P * P * C in (pi, qi, c) order
    gh,
    gw,
    P,
    C,
    W,
    si_b,
    si_c,
    si_h,
    si_w,
    sp_b,
    sp_l,
    sp_d,
    TO_PATCHES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One program per (sample, row of patches): for each of the P pixel rows, [C, W] tiles whose image side is
    read (or written) along W, contiguous in NCHW; on the patch side a patch's (qi, c) run is contiguous too."""
    b = tl.program_id(0).to(tl.int64)  # samples on axis 0 (limit 2^31 - 1), patch rows on axis 1
    gy = tl.program_id(1)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)  # [BLOCK_C]
        for w0 in range(0, W, BLOCK_W):
            w = (w0 + tl.arange(0, BLOCK_W)).to(tl.int64)  # [BLOCK_W] pixel column
            m = (c < C)[:, None] & (w < W)[None, :]
            gx = w // P
            qi = w % P
            img_base = img_ptr + b * si_b + c[:, None] * si_c + w[None, :] * si_w
            pat_base = pat_ptr + b * sp_b + (gy * gw + gx)[None, :] * sp_l + (qi[None, :] * C + c[:, None]) * sp_d
            for pi in range(0, P):
                y = (gy * P + pi).to(tl.int64)
                img = img_base + y * si_h
                pat = pat_base + (pi * P * C) * sp_d
                if TO_PATCHES:
                    tl.store(pat, tl.load(img, mask=m), mask=m)
                else:
                    tl.store(img, tl.load(pat, mask=m), mask=m)


def blocks(c: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_W, num_warps) for C channels and image rows of ``width`` pixels (the defaults
    benchmarks/tune_triton_ops.py compares against)."""
    block_w = min(triton.next_power_of_2(width), 1024)
    block_c = min(triton.next_power_of_2(c), max(1, 2048 // block_w))
    return block_c, block_w, 4


def _run(img: torch.Tensor, pat: torch.Tensor, p: int, to_patches: bool, config: tuple[int, int, int] | None = None):
    b, c, h, w = img.shape
    if img.numel() == 0:
        return
    gh, gw = h // p, w // p
    block_c, block_w, num_warps = config or blocks(c, gw * p)
    _patch_copy_kernel[(b, gh)](
        img, pat, gh, gw, p, c, gw * p, *img.stride(), *pat.stride(),
        TO_PATCHES=to_patches, BLOCK_C=block_c, BLOCK_W=block_w, num_warps=num_warps,
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
