"""Triton kernels of ``patch_fft_loss``: the DFT of each masked p x p patch as a matrix product, weights, reduction and
gradient in registers.

One program per block of ``BLOCK_M`` patches (rows of [B * L]) and one channel. It reads the difference ``e`` of the
predicted patch (MAE's (p, q, c) layout) and the image patch straight from both tensors (patches with mask weight 0
are never read), then walks the half spectrum (frequencies (u, v) with v <= p/2: the other half is its complex
conjugate, counted by ``mult``) in chunks of ``BLOCK_K``: ``F = e @ (Kr + i Ki)`` (two ``tl.dot``), ``d2 = |F|^2``,
``u = d2^(alpha/2)`` (then ``log(1 + u)``). The per-spectrum weight normalisation factors out of the sum:
``sum(w * d2) = sum(u * d2) / max(u)``, so one pass keeps a running sum and a running maximum. Forward writes each
(patch, channel)'s maximum (for the backward) and its weighted loss; backward (the same kernel, ``BACKWARD``)
recomputes ``F`` chunk by chunk and accumulates ``de = 2 s sum_k mult w (Fr Kr^T + Fi Ki^T)`` in registers, written
once into the [B, L, p*p*C] gradient (zeros for unmasked patches). The matmuls run in IEEE fp32 (see ``_meta``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store
from fastmim.ops.triton._launch import jit_kernel


@triton.jit
def _patch_diff(pred_ptr, img_ptr, mask_ptr, rows, ch, R, L, GW, C, s_pb, s_pl, s_pd, s_ib, s_ic, s_ih, s_iw,
                P: tl.constexpr, P2: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """(e [BLOCK_M, BLOCK_N] fp32: predicted minus image patch of channel ``ch`` (0 for unmasked rows), the rows'
    mask weights, valid rows, valid columns)."""
    rvalid = rows < R
    wt = tl.load(mask_ptr + rows, mask=rvalid, other=0.0)
    active = rvalid & (wt != 0.0)
    bi = (rows // L).to(tl.int64)
    li = rows % L
    n = tl.arange(0, BLOCK_N)
    nvalid = n < P2
    m2 = active[:, None] & nvalid[None, :]
    pp = pred_ptr + bi[:, None] * s_pb + li[:, None] * s_pl + (n[None, :] * C + ch) * s_pd
    ys = (li // GW)[:, None] * P + (n // P)[None, :]
    xs = (li % GW)[:, None] * P + (n % P)[None, :]
    ip = img_ptr + bi[:, None] * s_ib + ch * s_ic + ys * s_ih + xs * s_iw
    e = tl.load(pp, mask=m2, other=0.0).to(tl.float32) - tl.load(ip, mask=m2, other=0.0).to(tl.float32)
    return e, wt, rvalid, nvalid


@triton.jit
def _spectrum_chunk(e, kr_ptr, ki_ptr, mult_ptr, k0, nvalid, alpha, H2: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, ALPHA_ONE: tl.constexpr, LOG: tl.constexpr,
                    PRECISION: tl.constexpr):  # fmt: skip
    """Frequencies k0 .. k0 + BLOCK_K of the half spectrum: (Fr, Fi, d2, u, mult, Kr chunk, Ki chunk)."""
    n = tl.arange(0, BLOCK_N)
    kk = k0 + tl.arange(0, BLOCK_K)
    kvalid = kk < H2
    km = nvalid[:, None] & kvalid[None, :]
    kr = tl.load(kr_ptr + n[:, None] * H2 + kk[None, :], mask=km, other=0.0)
    ki = tl.load(ki_ptr + n[:, None] * H2 + kk[None, :], mask=km, other=0.0)
    mult = tl.load(mult_ptr + kk, mask=kvalid, other=0.0)
    fr = tl.dot(e, kr, input_precision=PRECISION)
    fi = tl.dot(e, ki, input_precision=PRECISION)
    d2 = fr * fr + fi * fi
    if ALPHA_ONE:
        u = tl.sqrt(d2)
    else:
        u = tl.where(d2 > 0.0, tl.exp2(tl.log2(tl.where(d2 > 0.0, d2, 1.0)) * (0.5 * alpha)), 0.0)
    if LOG:
        u = tl.log(u + 1.0)
    return fr, fi, d2, u, mult, kr, ki


@jit_kernel
def _pfft_kernel(
    pred_ptr, img_ptr, mask_ptr, kr_ptr, ki_ptr, mult_ptr, rowmax_ptr,
    rowloss_ptr,  # forward: out [B * L, C] fp32
    scale_ptr, dpred_ptr,  # backward: d loss / d sum(mask * rowloss) [1] fp32, out [B, L, p*p*C]
    R, L, GW, C, s_pb, s_pl, s_pd, s_ib, s_ic, s_ih, s_iw, alpha,
    P: tl.constexpr, P2: tl.constexpr, H2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ALPHA_ONE: tl.constexpr, LOG: tl.constexpr, PRECISION: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ch = tl.program_id(1)
    e, wt, rvalid, nvalid = _patch_diff(pred_ptr, img_ptr, mask_ptr, rows, ch, R, L, GW, C, s_pb, s_pl, s_pd, s_ib,
                                        s_ic, s_ih, s_iw, P, P2, BLOCK_N)  # fmt: skip
    out = rows.to(tl.int64) * C + ch
    if BACKWARD:
        top = tl.load(rowmax_ptr + out, mask=rvalid, other=0.0)
        inv = tl.where(top > 0.0, 1.0 / tl.where(top > 0.0, top, 1.0), 0.0)
        de = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        top = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, H2, BLOCK_K):
        fr, fi, d2, u, mult, kr, ki = _spectrum_chunk(e, kr_ptr, ki_ptr, mult_ptr, k0, nvalid, alpha, H2, BLOCK_N,
                                                      BLOCK_K, ALPHA_ONE, LOG, PRECISION)  # fmt: skip
        if BACKWARD:
            coef = mult[None, :] * u * inv[:, None]
            de += tl.dot(coef * fr, tl.trans(kr), input_precision=PRECISION)
            de += tl.dot(coef * fi, tl.trans(ki), input_precision=PRECISION)
        else:
            acc += tl.sum(mult[None, :] * u * d2, axis=1)
            top = tl.maximum(top, tl.max(u, axis=1))
    if BACKWARD:
        s = 2.0 * tl.load(scale_ptr) * wt  # d loss / d (sum of w d2) of each row: 0 for unmasked patches
        n = tl.arange(0, BLOCK_N)
        dst = dpred_ptr + rows.to(tl.int64)[:, None] * (P2 * C) + n[None, :] * C + ch
        tl.store(dst, cast_for_store(de * s[:, None], dpred_ptr), mask=rvalid[:, None] & nvalid[None, :])
    else:
        tl.store(rowmax_ptr + out, top, mask=rvalid)
        # a zero spectrum counts 0; a NaN one (tl.max drops NaNs from top, but not from the sum) stays NaN
        row = tl.where(acc == 0.0, 0.0, acc / tl.where(top == 0.0, 1.0, top))
        tl.store(rowloss_ptr + out, row * wt, mask=rvalid)


def _meta(pred: torch.Tensor, imgs: torch.Tensor, p: int, h2: int, alpha: float, log_weights: bool) -> dict:
    """16 patches x 16 frequencies per step, 4 warps, IEEE fp32 matmuls: at p = 16 the only configuration of those
    compiled for sm_90 (ptxas, triton 3.8) that spills no registers in either kernel; tf32x3 spilled in every one
    tried, and plain tf32 (10-bit mantissa) would put ~1e-3 relative error into the spectrum."""
    p2 = p * p
    return dict(P=p, P2=p2, H2=h2, BLOCK_M=16, BLOCK_N=max(16, triton.next_power_of_2(p2)), BLOCK_K=16,
                ALPHA_ONE=alpha == 1.0, LOG=log_weights, PRECISION="ieee", num_warps=4)  # fmt: skip


def _args(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int) -> tuple:
    b, c, h, w = imgs.shape
    n = pred.shape[1]
    return (b * n, n, w // p, c, *pred.stride(), *imgs.stride())


def patch_fft_fwd(pred, imgs, mask, kr, ki, mult, p: int, alpha: float, log_weights: bool):
    """-> (rowmax [B, L, C] fp32, rowloss [B, L, C] fp32: each (patch, channel)'s sum(w d2) times its weight)."""
    b, n, _ = pred.shape
    c = imgs.shape[1]
    rowmax = torch.empty((b, n, c), device=pred.device, dtype=torch.float32)
    rowloss = torch.empty_like(rowmax)
    meta = _meta(pred, imgs, p, kr.shape[1], alpha, log_weights)
    grid = (triton.cdiv(b * n, meta["BLOCK_M"]), c)
    _pfft_kernel[grid](pred, imgs, mask, kr, ki, mult, rowmax, rowloss, rowmax, rowmax, *_args(pred, imgs, mask, p),
                       alpha, BACKWARD=False, **meta)  # fmt: skip
    return rowmax, rowloss


def patch_fft_bwd(scale, pred, imgs, mask, rowmax, kr, ki, mult, p: int, alpha: float, log_weights: bool):
    """scale [1] fp32 (d loss / d sum(mask * rowloss)) -> dpred [B, L, p*p*C] in pred's dtype."""
    b, n, d = pred.shape
    c = imgs.shape[1]
    dpred = torch.empty((b, n, d), device=pred.device, dtype=pred.dtype)
    rowmax = rowmax.contiguous()  # read as [B * L, C] (a raw call may pass an expanded one)
    meta = _meta(pred, imgs, p, kr.shape[1], alpha, log_weights)
    grid = (triton.cdiv(b * n, meta["BLOCK_M"]), c)
    _pfft_kernel[grid](pred, imgs, mask, kr, ki, mult, rowmax, rowmax, scale, dpred, *_args(pred, imgs, mask, p),
                       alpha, BACKWARD=True, **meta)  # fmt: skip
    return dpred
