"""Triton kernels of ``add_layer_norm``: the residual add fused with the LayerNorm that follows it, on rows [M, C]
(and of ``layer_norm``: the same without the add).

Forward, one program per row: ``s = x + residual`` (rounded to s's dtype, as the unfused add would store it), fp32
mean and reciprocal standard deviation of s, ``y = (s - mean) * rstd * weight + bias`` stored in y's dtype; s, y,
mean and rstd are written. One read of x and of the residual, one write of s and of y: the unfused add + LayerNorm
(+ the cast to the next matmul's dtype under autocast) reads s back and writes y twice.

Backward, one program per block of rows, taken BLOCK_M rows per step: recomputes the normalised rows from s, mean
and rstd, writes ``ds_total = ds + rstd * (w * dy - mean(w * dy) - xhat * mean(w * dy * xhat))`` in the residual's
dtype (and in x's when it differs), and accumulates ``dy * xhat`` and ``dy`` for the weight and bias gradients in fp32
registers; each program stores its partial sums once and a fixed-order sum over programs finishes them
(deterministic, no atomics).

Rows must be contiguous (row stride C, column stride 1); the wrapper makes them so. Loads are cast to fp32 (the
interpreter has no bf16 arithmetic), stores round once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store, split_blocks, target_programs
from fastmim.ops.triton._launch import jit_kernel


@jit_kernel
def _add_ln_fwd_kernel(
    x_ptr,  # [M, C] branch output
    r_ptr,  # [M, C] residual stream (read if HAS_RES)
    w_ptr,  # [C]
    b_ptr,  # [C]
    s_ptr,  # [M, C] out: x + residual (written if HAS_RES; else s is x)
    y_ptr,  # [M, C] out: LayerNorm(s)
    mean_ptr,  # [M] fp32 out
    rstd_ptr,  # [M] fp32 out
    C,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    off = row * C + cols
    s = tl.load(x_ptr + off, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(r_ptr + off, mask=cmask, other=0.0).to(tl.float32)
        s_store = cast_for_store(s, s_ptr)
        tl.store(s_ptr + off, s_store, mask=cmask)
        s = s_store.to(tl.float32)  # the statistics of s as stored (as the unfused add leaves it)
    s = tl.where(cmask, s, 0.0)
    mean = tl.sum(s, axis=0) / C
    xc = tl.where(cmask, s - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(y_ptr + off, cast_for_store(y, y_ptr), mask=cmask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@jit_kernel
def _add_ln_bwd_kernel(
    dy_ptr,  # [M, C] gradient of y
    ds_ptr,  # [M, C] gradient of s from its other uses (read if HAS_DS)
    s_ptr,  # [M, C]
    w_ptr,  # [C]
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    dr_ptr,  # [M, C] out: the total gradient of s, in the residual's dtype
    dx_ptr,  # [M, C] out: the same in x's dtype (written if TWO_OUT)
    part_ptr,  # [2, P, C] fp32 out: per program, sum dy * xhat and sum dy
    M,
    C,
    rows_per_program,
    P,
    HAS_DS: tl.constexpr,
    TWO_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)  # summed over the tile's rows once, at the end
    db = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row0 = pid.to(tl.int64) * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, M)
    for r0 in range(row0, row1, BLOCK_M):  # BLOCK_M rows per step: their loads are all in flight together
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < row1
        m2 = rmask[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        s = tl.load(s_ptr + off, mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=m2, other=0.0).to(tl.float32)
        xhat = tl.where(m2, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(wdy * xhat, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        d = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            d += tl.load(ds_ptr + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(dr_ptr + off, cast_for_store(d, dr_ptr), mask=m2)
        if TWO_OUT:
            tl.store(dx_ptr + off, cast_for_store(d, dx_ptr), mask=m2)
        dw += dy * xhat
        db += dy
    tl.store(part_ptr + pid * C + cols, tl.sum(dw, axis=0), mask=cmask)
    tl.store(part_ptr + (P + pid) * C + cols, tl.sum(db, axis=0), mask=cmask)


def _warps(block_c: int) -> int:
    return 4 if block_c <= 1024 else 8 if block_c <= 4096 else 16


def _bwd_tile(block_c: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of the backward: a [BLOCK_M, BLOCK_C] tile of about 4096 values per loop step (4 rows of
    ViT-B's 768 channels, 8 of the decoder's 512), so that a program keeps several rows' loads in flight; one row
    per step left each program one row's latency at a time."""
    block_m = max(1, min(16, 4096 // block_c))
    return block_m, max(_warps(block_c), 8 if block_m * block_c >= 4096 else 4)


def add_layer_norm_fwd(x, residual, weight, bias, eps: float, s_dtype: torch.dtype, out_dtype: torch.dtype):
    """x, residual [M, C] contiguous -> (y [M, C] out_dtype, s [M, C] s_dtype, mean [M], rstd [M] fp32). Residual
    None: the LayerNorm of x alone, and s is x."""
    m, c = x.shape
    has_res = residual is not None
    s = torch.empty((m, c), device=x.device, dtype=s_dtype) if has_res else x
    y = torch.empty((m, c), device=x.device, dtype=out_dtype)
    mean = torch.empty((m,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m:
        block = triton.next_power_of_2(c)
        _add_ln_fwd_kernel[(m,)](x, residual if has_res else x, weight, bias, s, y, mean, rstd, c, eps,
                                 HAS_RES=has_res, BLOCK_C=block, num_warps=_warps(block))  # fmt: skip
    return y, s, mean, rstd


def add_layer_norm_bwd(
    dy, ds, s, weight, mean, rstd, x_dtype: torch.dtype, r_dtype: torch.dtype, need_w: bool, need_b: bool
):
    """-> (d_residual [M, C] in r_dtype, d_x in x_dtype (the same tensor when the dtypes agree), d_weight [C] fp32
    or None, d_bias [C] fp32 or None). ``ds`` None: s has no other use."""
    m, c = s.shape
    dr = torch.empty((m, c), device=s.device, dtype=r_dtype)
    two = x_dtype != r_dtype
    dx = torch.empty((m, c), device=s.device, dtype=x_dtype) if two else dr
    block = triton.next_power_of_2(c)
    block_m, warps = _bwd_tile(block)
    programs, rows = split_blocks(m, block_m, target_programs(s.device))
    programs = max(programs, 1)  # no rows: one row of zero partial sums
    # every program writes its two rows whole: zeros (a fill launch) only when no program runs
    part = (torch.empty if m else torch.zeros)((2, programs, c), device=s.device, dtype=torch.float32)
    if m:
        _add_ln_bwd_kernel[(programs,)](
            dy, ds if ds is not None else dy, s, weight, mean, rstd, dr, dx, part, m, c, rows, programs,
            HAS_DS=ds is not None, TWO_OUT=two, BLOCK_M=block_m, BLOCK_C=block, num_warps=warps,
        )  # fmt: skip
    if need_w and need_b:
        dw, db = part.sum(1)  # [2, C]: both reductions in one launch
    else:
        dw = part[0].sum(0) if need_w else None
        db = part[1].sum(0) if need_b else None
    return dr, dx, dw, db
