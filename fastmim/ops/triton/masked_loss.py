"""Triton kernels for the masked reconstruction loss (MAE norm-pix MSE, SimMIM L1), patchify fused.

A program takes BLOCK_P patches. The target of patch (b, l), element e, is read straight from the images (or from
patchified targets) through a generic stride formula, so no patchified copy is ever made:

    offset = b*s_b + (l // gw)*s_row + (l % gw)*s_col + (e // (P*C))*s_pi + ((e // C) % P)*s_qi + (e % C)*s_c

Patches with weight 0 are never read. The forward writes per-program partial sums (deterministic, no atomics); the
backward recomputes the normalised target instead of storing it, which reads less than saving a gradient would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store
from fastmim.ops.triton._launch import jit_kernel


@triton.jit
def _patch_tiles(
    pred_ptr,  # [B, L, D]
    tgt_ptr,  # images [B, C, H, W] or patches [B, L, D], addressed through the geometry strides
    mask_ptr,  # [B, L] weights
    pid,
    B,
    L,
    D,
    sp_b,
    sp_l,
    sp_d,
    sm_b,
    sm_l,
    gw,
    s_b,
    s_row,
    s_col,
    s_pi,
    s_qi,
    s_c,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    WIDE: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Loads BLOCK_P patches: (patch index, weight, active rows, diff = pred - target [BLOCK_P, BLOCK_D] fp32).
    P and C are compile-time constants: the per-element index arithmetic is multiplies and shifts (run-time int64
    divisions, ~100 instructions each, made the kernel compute-bound); offsets within a sample are int32 unless
    ``WIDE`` (a sample past 2^31 elements)."""
    q = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] flat patch index b * L + l
    qmask = q < B * L
    b = q // L
    n = q % L  # patch index in the sample
    w = tl.load(mask_ptr + b * sm_b + n * sm_l, mask=qmask, other=0).to(tl.float32)  # [BLOCK_P]
    active = qmask & (w != 0)
    e = tl.arange(0, BLOCK_D)
    emask = e < D
    e64 = e.to(tl.int64)  # int32 index times a stride could wrap past 2^31
    ei = e64 if WIDE else e
    elem_off = ((ei // (P * C)) * s_pi + ((ei // C) % P) * s_qi + (ei % C) * s_c).to(tl.int64)  # [BLOCK_D]
    patch_off = b * s_b + (n // gw) * s_row + (n % gw) * s_col  # [BLOCK_P]
    lmask = active[:, None] & emask[None, :]
    t = tl.load(tgt_ptr + patch_off[:, None] + elem_off[None, :], mask=lmask, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / D  # [BLOCK_P]
        cent = tl.where(lmask, t - mean[:, None], 0.0)
        var = tl.sum(cent * cent, axis=1) / (D - 1)  # unbiased, as torch.var
        t = cent / tl.sqrt(tl.where(active, var + eps, 1.0))[:, None]  # inactive rows: no 0/0 with eps=0
    x = tl.load(pred_ptr + b[:, None] * sp_b + n[:, None] * sp_l + e64[None, :] * sp_d, mask=lmask, other=0.0)
    diff = tl.where(lmask, x.to(tl.float32) - t, 0.0)
    return q, w, qmask, active, diff


@jit_kernel
def _masked_loss_fwd_kernel(
    pred_ptr, tgt_ptr, mask_ptr,
    part_ptr,  # [2, num_programs] fp32: sum of w * patch loss, sum of w
    B, L, D, sp_b, sp_l, sp_d, sm_b, sm_l, gw, s_b, s_row, s_col, s_pi, s_qi, s_c, eps,
    P: tl.constexpr, C: tl.constexpr, WIDE: tl.constexpr, NORM_PIX: tl.constexpr, P_NORM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    q, w, qmask, active, diff = _patch_tiles(
        pred_ptr, tgt_ptr, mask_ptr, pid, B, L, D, sp_b, sp_l, sp_d, sm_b, sm_l,
        gw, s_b, s_row, s_col, s_pi, s_qi, s_c, eps, P, C, WIDE, NORM_PIX, BLOCK_P, BLOCK_D,
    )  # fmt: skip
    if P_NORM == 1:
        err = tl.abs(diff)
    else:
        err = diff * diff
    patch_loss = tl.sum(err, axis=1) / D  # [BLOCK_P]
    tl.store(part_ptr + pid, tl.sum(tl.where(active, w * patch_loss, 0.0), axis=0))
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(w, axis=0))


@jit_kernel
def _masked_loss_bwd_kernel(
    pred_ptr, tgt_ptr, mask_ptr,
    gl_ptr,  # [] upstream gradient of the loss
    denom_ptr,  # [] fp32 mask weight sum
    grad_ptr,  # [B, L, D] contiguous, pred's dtype
    B, L, D, sp_b, sp_l, sp_d, sm_b, sm_l, gw, s_b, s_row, s_col, s_pi, s_qi, s_c, eps,
    P: tl.constexpr, C: tl.constexpr, WIDE: tl.constexpr, NORM_PIX: tl.constexpr, P_NORM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    q, w, qmask, active, diff = _patch_tiles(
        pred_ptr, tgt_ptr, mask_ptr, pid, B, L, D, sp_b, sp_l, sp_d, sm_b, sm_l,
        gw, s_b, s_row, s_col, s_pi, s_qi, s_c, eps, P, C, WIDE, NORM_PIX, BLOCK_P, BLOCK_D,
    )  # fmt: skip
    scale = tl.load(gl_ptr).to(tl.float32) / tl.load(denom_ptr)
    coef = w * scale / D  # [BLOCK_P]
    if P_NORM == 1:
        g = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        g = 2.0 * diff
    g = tl.where(active[:, None], g * coef[:, None], 0.0)
    e = tl.arange(0, BLOCK_D)
    dst = grad_ptr + q[:, None] * D + e[None, :]
    tl.store(dst, cast_for_store(g, grad_ptr), mask=qmask[:, None] & (e < D)[None, :])


INT32_OFFSETS = 2**31  # offsets within a sample from here on are int64 (WIDE); tests lower it to run that path


def blocks(d: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps) for patches of d values (BLOCK_D is d rounded up to a power of two)."""
    block_d = triton.next_power_of_2(d)
    return max(1, min(16, 4096 // block_d)), 4 if block_d <= 1024 else 8


def _launch(
    pred: torch.Tensor, mask: torch.Tensor, geometry: tuple[int, ...], config: tuple[int, int] | None = None
) -> tuple[tuple, dict, int]:
    b, n, d = pred.shape
    block_p, warps = config or blocks(d)
    grid = triton.cdiv(b * n, block_p)
    gw, s_b, s_row, s_col, p, c, s_pi, s_qi, s_c = geometry
    wide = (p - 1) * abs(s_pi) + (p - 1) * abs(s_qi) + (c - 1) * abs(s_c) >= INT32_OFFSETS
    args = (b, n, d, *pred.stride(), *mask.stride(), gw, s_b, s_row, s_col, s_pi, s_qi, s_c)
    meta = {"P": p, "C": c, "WIDE": wide, "BLOCK_P": block_p, "BLOCK_D": triton.next_power_of_2(d), "num_warps": warps}
    return args, meta, grid


def masked_loss_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    geometry: tuple[int, ...],
    norm_pix: bool,
    eps: float,
    p: int,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask weight sum) as 0-d fp32 tensors; geometry = (gw, s_b, s_row, s_col, P, C, s_pi, s_qi, s_c);
    ``config`` (BLOCK_P, num_warps) for the block-size sweep, None for ``blocks``."""
    args, meta, grid = _launch(pred, mask, geometry, config)
    part = torch.empty((2, max(grid, 1)), dtype=torch.float32, device=pred.device)
    if grid == 0:
        part.zero_()
    else:
        _masked_loss_fwd_kernel[(grid,)](pred, target, mask, part, *args, eps, NORM_PIX=norm_pix, P_NORM=p, **meta)
    denom = part[1].sum()
    return part[0].sum() / denom, denom


def masked_loss_backward(
    grad_loss: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    denom: torch.Tensor,
    geometry: tuple[int, ...],
    norm_pix: bool,
    eps: float,
    p: int,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. pred, [B, L, D] in pred's dtype."""
    args, meta, grid = _launch(pred, mask, geometry, config)
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if grid:
        _masked_loss_bwd_kernel[(grid,)](
            pred, target, mask, grad_loss, denom, grad, *args, eps, NORM_PIX=norm_pix, P_NORM=p, **meta
        )
    return grad
