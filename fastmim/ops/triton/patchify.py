"""Triton kernels for patchify / unpatchify: one strided permute-copy between [B, C, H, W] and [B, L, p*p*C], in two
forms (``blocks``: the default; benchmarks/tune_triton_ops.py times both)."""

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
                pat = pat_base + (pi * P * C).to(tl.int64) * sp_d  # a strided patch side passes 2^31
                if TO_PATCHES:
                    tl.store(pat, tl.load(img, mask=m), mask=m)
                else:
                    tl.store(img, tl.load(pat, mask=m), mask=m)


@jit_kernel
def _patch_flat_kernel(
    img_ptr,  # [B, C, H, W], strides si_*
    pat_ptr,  # [B, L, D], strides sp_*, D = P * P * C in (pi, qi, c) order
    gw,
    si_b,
    si_c,
    si_h,
    si_w,
    sp_b,
    sp_l,
    sp_d,
    P: tl.constexpr,
    C: tl.constexpr,
    TO_PATCHES: tl.constexpr,
    WIDE: tl.constexpr,  # int64 offsets within a sample (a sample past 2^31 elements)
    BLOCK: tl.constexpr,
):
    """One program per (sample, row of patches, BLOCK of that row's gw * D patch values), indexed in the patch
    tensor's order: the patch side is read or written as one contiguous run (16-byte vectors), the image side in runs
    of P pixels per channel and row (whole 32-byte sectors). P and C are compile-time constants, so the index
    arithmetic is multiplies and shifts (the strip kernel above divides by run-time values)."""
    b = tl.program_id(0).to(tl.int64)
    gy = tl.program_id(1)
    k = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] index into the row's patch values
    if WIDE:
        k = k.to(tl.int64)
    m = k < gw * (P * P * C)
    gx = k // (P * P * C)
    r = k % (P * P * C)  # within the patch: (pi, qi, c)
    pi = r // (P * C)
    qi = (r // C) % P
    c = r % C
    img = img_ptr + b * si_b + c * si_c + (gy * P + pi) * si_h + (gx * P + qi) * si_w
    pat = pat_ptr + b * sp_b + (gy * gw + gx) * sp_l + r * sp_d
    if TO_PATCHES:
        tl.store(pat, tl.load(img, mask=m), mask=m)
    else:
        tl.store(img, tl.load(pat, mask=m), mask=m)


# (form, a, b, num_warps): ("flat", BLOCK, 0, warps) for _patch_flat_kernel, ("strip", BLOCK_C, BLOCK_W, warps) for
# _patch_copy_kernel. The flat form is the default: it indexes like inductor's own permute-copy (95% of the copy
# bandwidth forward on an H200, 7365249) where the strip form reached 70%; benchmarks/tune_triton_ops.py times both.
FLAT_BLOCK = 1024
INT32_OFFSETS = 2**31  # offsets within a sample from here on are int64 (WIDE); tests lower it to run that path


def blocks(c: int, width: int) -> tuple[str, int, int, int]:
    """The default config (form, a, b, num_warps) for C channels and image rows of ``width`` pixels."""
    return ("flat", FLAT_BLOCK, 0, 4)


def strip_blocks(c: int, width: int) -> tuple[str, int, int, int]:
    """The strip kernel's tiles: (BLOCK_C, BLOCK_W) about 2048 values along the image rows."""
    block_w = min(triton.next_power_of_2(width), 1024)
    block_c = min(triton.next_power_of_2(c), max(1, 2048 // block_w))
    return ("strip", block_c, block_w, 4)


def _extent(t: torch.Tensor, dims: tuple[int, ...]) -> int:
    """The largest element offset within one sample of ``t`` (dims 1.. of its shape)."""
    return sum((n - 1) * abs(st) for n, st in zip(dims, t.stride()[1:], strict=True))


def _run(img: torch.Tensor, pat: torch.Tensor, p: int, to_patches: bool, config: tuple | None = None) -> torch.Tensor:
    """Copies between ``img`` [B, C, H, W] and ``pat`` [B, L, P*P*C] (into ``pat`` when ``to_patches``); returns the
    tensor written. ``config``: see ``blocks``."""
    b, c, h, w = img.shape
    out = pat if to_patches else img
    if img.numel() == 0:
        return out
    gh, gw = h // p, w // p
    form, block_a, block_b, num_warps = config or blocks(c, gw * p)
    if form == "flat":
        if triton.cdiv(gw * p * p * c, block_a) > 65535:  # grid axis 2's limit
            raise ValueError(f"patchify: a row of {gw} patches of {p * p * c} values is too long for BLOCK={block_a}")
        wide = max(_extent(img, (c, gh * p, gw * p)), _extent(pat, tuple(pat.shape[1:]))) >= INT32_OFFSETS - 2 * block_a
        _patch_flat_kernel[(b, gh, triton.cdiv(gw * p * p * c, block_a))](
            img, pat, gw, *img.stride(), *pat.stride(),
            P=p, C=c, TO_PATCHES=to_patches, WIDE=wide, BLOCK=block_a, num_warps=num_warps,
        )  # fmt: skip
    else:
        _patch_copy_kernel[(b, gh)](
            img, pat, gh, gw, p, c, gw * p, *img.stride(), *pat.stride(),
            TO_PATCHES=to_patches, BLOCK_C=block_a, BLOCK_W=block_b, num_warps=num_warps,
        )  # fmt: skip
    return out


def patchify(imgs: torch.Tensor, p: int, config: tuple | None = None) -> torch.Tensor:
    b, c, h, w = imgs.shape
    out = torch.empty((b, (h // p) * (w // p), p * p * c), dtype=imgs.dtype, device=imgs.device)
    return _run(imgs, out, p, True, config)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int, config: tuple | None = None):
    gh, gw = grid
    out = torch.empty((x.shape[0], channels, gh * p, gw * p), dtype=x.dtype, device=x.device)
    return _run(out, x, p, False, config)
