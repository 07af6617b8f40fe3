"""Triton kernel of ``hog_target``: MaskFeat's HOG features of the masked patches, straight from the image.

One program per (sample, cell): it skips cells whose patch is not masked (no loads), reads the cell's pixels and
their one-pixel rim (reflect padding at the image border) for each channel, forms the Sobel gradients, the
magnitude and the unsigned orientation bin, sums the magnitudes per bin (a [16]-vector of 9 used bins), L2-normalises
and writes the 9 values at their place in the patch's row of the output: [channel, bin, cell row, cell col]. No
full-resolution intermediate.

The bin of ``floor(atan2(gx, gy) / pi * nbins) mod nbins`` is found without atan2: the gradient ``(u, v) = (gy, gx)``
is turned into the upper half plane (the orientation is unsigned), and the bin is the number of boundaries
``k * pi / nbins`` (k = 1 .. nbins - 1) it lies at or beyond, ``v cos(b_k) - u sin(b_k) >= 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._launch import jit_kernel


@jit_kernel
def _hog_cell_kernel(
    img_ptr,  # [B, C, H, W]
    mask_ptr,  # [B, L] uint8/bool as int8 (read if HAS_MASK)
    win_ptr,  # [WINDOW, WINDOW] fp32 (read if WINDOW)
    trig_ptr,  # [2, 16] fp32: cos and sin of the bin boundaries k * pi / NBINS
    out_ptr,  # [B, L, C * NBINS * K * K] fp32
    H,
    W,
    GW,  # patches per row
    L,
    s_b,
    s_c,
    s_h,
    s_w,
    C: tl.constexpr,
    NBINS: tl.constexpr,
    CELL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= CELL
    K: tl.constexpr,  # cells per patch side
    WINDOW: tl.constexpr,  # 0: no Gaussian window
    HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cw = W // CELL
    ch = H // CELL
    b = pid // (ch * cw)
    r = pid % (ch * cw)
    cy = r // cw
    cx = r % cw
    tok = (cy // K) * GW + cx // K
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + b * L + tok) != 0
    i = tl.arange(0, BLOCK)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    valid = (i < CELL) & (j < CELL) & active
    y = cy * CELL + i
    x = cx * CELL + j
    # reflect-padded rows and columns -1, 0, +1 around each pixel
    ym = tl.where(y - 1 < 0, 1 - y, y - 1)
    yp = tl.where(y + 1 >= H, 2 * H - 3 - y, y + 1)
    xm = tl.where(x - 1 < 0, 1 - x, x - 1)
    xp = tl.where(x + 1 >= W, 2 * W - 3 - x, x + 1)
    if WINDOW:
        win = tl.load(win_ptr + (y % WINDOW) * WINDOW + x % WINDOW, mask=valid, other=0.0)
    bins = tl.arange(0, 16)
    cos_b = tl.load(trig_ptr + bins)
    sin_b = tl.load(trig_ptr + 16 + bins)
    for c in tl.static_range(C):
        base = img_ptr + b * s_b + c * s_c
        a_mm = tl.load(base + ym * s_h + xm * s_w, mask=valid, other=0.0).to(tl.float32)
        a_m0 = tl.load(base + ym * s_h + x * s_w, mask=valid, other=0.0).to(tl.float32)
        a_mp = tl.load(base + ym * s_h + xp * s_w, mask=valid, other=0.0).to(tl.float32)
        a_0m = tl.load(base + y * s_h + xm * s_w, mask=valid, other=0.0).to(tl.float32)
        a_0p = tl.load(base + y * s_h + xp * s_w, mask=valid, other=0.0).to(tl.float32)
        a_pm = tl.load(base + yp * s_h + xm * s_w, mask=valid, other=0.0).to(tl.float32)
        a_p0 = tl.load(base + yp * s_h + x * s_w, mask=valid, other=0.0).to(tl.float32)
        a_pp = tl.load(base + yp * s_h + xp * s_w, mask=valid, other=0.0).to(tl.float32)
        # sums of differences of mirrored taps: exactly 0 where reflect padding mirrors them (image borders)
        gx = (a_mm - a_mp) + 2.0 * (a_0m - a_0p) + (a_pm - a_pp)
        gy = (a_mm - a_pm) + 2.0 * (a_m0 - a_p0) + (a_mp - a_pp)
        mag = tl.sqrt(gx * gx + gy * gy)
        if WINDOW:
            mag = mag * win
        mag = tl.where(valid, mag, 0.0)
        flip = (gx < 0) | ((gx == 0) & (gy < 0))
        u = tl.where(flip, -gy, gy)
        v = tl.where(flip, -gx, gx)
        b_idx = tl.zeros((BLOCK, BLOCK), dtype=tl.int32)
        for k in tl.static_range(1, NBINS):
            ck = tl.sum(tl.where(bins == k, cos_b, 0.0), axis=0)
            sk = tl.sum(tl.where(bins == k, sin_b, 0.0), axis=0)
            b_idx += (v * ck - u * sk >= 0).to(tl.int32)
        hist = tl.zeros((16,), dtype=tl.float32)
        for k in tl.static_range(NBINS):
            s_k = tl.sum(tl.sum(tl.where(b_idx == k, mag, 0.0), axis=1), axis=0)
            hist = tl.where(bins == k, s_k, hist)
        norm = tl.sqrt(tl.sum(hist * hist, axis=0))
        hist = hist / tl.where(norm < 1e-12, 1e-12, norm)  # (a NaN norm stays NaN: tl.maximum would drop it)
        col = c * NBINS * K * K + bins * (K * K) + (cy % K) * K + cx % K
        tl.store(out_ptr + (b * L + tok) * (C * NBINS * K * K) + col, hist, mask=(bins < NBINS) & active)


def hog_fwd(imgs, mask, window, patch_size: int, cell_size: int, nbins: int) -> torch.Tensor:
    """imgs [B, C, H, W], mask [B, L] bool or None, window [S, S] fp32 or None -> [B, L, C * nbins * K * K] fp32
    (rows of unmasked patches zero)."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch_size, w // patch_size
    k = patch_size // cell_size
    out = torch.zeros((b, gh * gw, c * nbins * k * k), device=imgs.device, dtype=torch.float32)
    programs = b * (h // cell_size) * (w // cell_size)
    if programs == 0:
        return out
    m = mask.to(torch.int8).contiguous() if mask is not None else out
    win = window.contiguous() if window is not None else out
    from fastmim.ops.hog import boundary_trig

    trig = boundary_trig(nbins, imgs.device)
    _hog_cell_kernel[(programs,)](
        imgs, m, win, trig, out, h, w, gw, gh * gw, *imgs.stride(), C=c, NBINS=nbins, CELL=cell_size,
        BLOCK=max(2, triton.next_power_of_2(cell_size)), K=k, WINDOW=0 if window is None else window.shape[0],
        HAS_MASK=mask is not None, num_warps=1 if cell_size <= 8 else 4,
    )  # fmt: skip
    return out
