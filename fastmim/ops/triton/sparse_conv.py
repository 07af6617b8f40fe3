"""Triton kernels for the submanifold sparse depthwise convolution (FCMAE's sparse ConvNeXt), forward and backward.

Rows are the active pixels of a feature map, [M, C]; a neighbor table [K*K, M] gives the row each tap reads (-1: a
masked or outside pixel, read as zero). The forward kernel also computes grad_x (the same convolution of grad_out
with the kernel flipped, through the same symmetric table); a second kernel sums the weight and bias gradients over
rows into fp32 partial sums per program. Loads are cast to fp32 (the interpreter has no bf16 arithmetic), stores
round once. Ids are never trusted: an id outside [-1, M) gives a NaN output row (forward, grad_x) or is skipped
(weight gradient), never an out-of-bounds access.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store, split_blocks, target_programs
from fastmim.ops.triton._launch import jit_kernel


@jit_kernel
def _sparse_dwconv_kernel(
    x_ptr,  # [M, C] input rows
    nbr_ptr,  # [KK, M] int32, input row of each tap, -1 for none
    w_ptr,  # [C, KK] taps per channel
    b_ptr,  # [C] bias (if HAS_BIAS)
    out_ptr,  # [M, C] contiguous
    M,
    C,
    sx_m,
    sx_c,
    sn_t,
    sn_m,
    sw_c,
    sw_t,
    sb_c,
    K: tl.constexpr,  # kernel size, KK = K * K taps
    FLIP: tl.constexpr,  # tap t uses weight tap KK - 1 - t (grad_x)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] output rows
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    rmask = r < M
    cmask = c < C
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    nbad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    nbr_row = nbr_ptr + r * sn_m  # [BLOCK_M] ids of tap 0, advanced one tap at a time (64-bit pointer arithmetic)
    # kernel rows in a loop, the K taps of a row unrolled: K independent gathers in flight, and a 7x7 kernel
    # compiles in seconds (all 49 taps unrolled take over a minute for sm_90)
    for ky in range(K):
        for kx in tl.static_range(K):
            t = ky * K + kx
            ids = tl.load(nbr_row, mask=rmask, other=-1).to(tl.int64)  # [BLOCK_M]
            nbr_row += sn_t
            hit = (ids >= 0) & (ids < M)
            nbad += ((ids < -1) | (ids >= M)).to(tl.int32)
            if FLIP:
                wt = K * K - 1 - t
            else:
                wt = t
            w = tl.load(w_ptr + c * sw_c + wt * sw_t, mask=cmask, other=0.0).to(tl.float32)  # [BLOCK_C]
            src = x_ptr + tl.where(hit, ids, 0)[:, None] * sx_m + c[None, :] * sx_c
            v = tl.load(src, mask=hit[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C]
            acc += v * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c * sb_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.where((nbad > 0)[:, None], float("nan"), acc)
    dst = out_ptr + r[:, None] * C + c[None, :]
    tl.store(dst, cast_for_store(acc, out_ptr), mask=rmask[:, None] & cmask[None, :])


@jit_kernel
def _sparse_dwconv_wgrad_kernel(
    g_ptr,  # [M, C] gradient of the output
    x_ptr,  # [M, C] input rows
    nbr_ptr,  # [KK, M] int32
    part_ptr,  # [S, KK + 1, C] fp32 partial sums: split s, tap t (t = KK: the bias), channel c
    M,
    C,
    rows_per_split,  # a multiple of BLOCK_M
    sg_m,
    sg_c,
    sx_m,
    sx_c,
    sn_t,
    sn_m,
    K: tl.constexpr,  # kernel size
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (split, tap, channel block): the tap's column sum over the split's rows, accumulated elementwise in a
    # [BLOCK_M, BLOCK_C] tile and reduced across rows once at the end (a reduction per tap and row block, 49 of them
    # per block, would cost more than the loads)
    split = tl.program_id(0)
    t = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = c < C
    row0 = split.to(tl.int64) * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, M)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if t < K * K:
        for r0 in range(row0, row1, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M).to(tl.int64)  # [BLOCK_M]
            rmask = r < row1
            g = tl.load(g_ptr + r[:, None] * sg_m + c[None, :] * sg_c, mask=rmask[:, None] & cmask[None, :], other=0.0)
            ids = tl.load(nbr_ptr + t * sn_t + r * sn_m, mask=rmask, other=-1).to(tl.int64)  # [BLOCK_M]
            hit = (ids >= 0) & (ids < M)
            src = x_ptr + tl.where(hit, ids, 0)[:, None] * sx_m + c[None, :] * sx_c
            v = tl.load(src, mask=hit[:, None] & cmask[None, :], other=0.0)
            acc += g.to(tl.float32) * v.to(tl.float32)
    else:
        for r0 in range(row0, row1, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rmask = r < row1
            g = tl.load(g_ptr + r[:, None] * sg_m + c[None, :] * sg_c, mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += g.to(tl.float32)
    dst = part_ptr + (split.to(tl.int64) * (K * K + 1) + t) * C + c
    tl.store(dst, tl.sum(acc, axis=0), mask=cmask)


def _fwd_blocks(c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) of the forward kernel: up to 64 channels a program, a tile of about 2048 fp32
    accumulators, 4 warps. On an H100 (benchmarks/tune_sparse_dwconv.py, ConvNeXtV2-Base at ratio 0.6, 7390a94) this
    was the fastest or within 10% of it at every stage, and 1.6x faster over the network than 32 x 128 tiles."""
    block_c = min(max(triton.next_power_of_2(max(c, 1)), 16), 64)
    return max(16, min(128, 2048 // block_c)), block_c, 4


def _wgrad_blocks(c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) of the weight-gradient kernel: 128 x 64 tiles, 8 warps (the H100 sweep's best at
    the 14x14 and 7x7 stages, within 25% elsewhere; 1.3x faster over the network than 32 x 128 with 4 warps)."""
    block_c = min(max(triton.next_power_of_2(max(c, 1)), 16), 64)
    return max(16, min(128, 8192 // block_c)), block_c, 8


def sparse_dwconv(
    x: torch.Tensor,
    nbr: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    flip: bool = False,
    out_dtype: torch.dtype | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """[M, C] -> [M, C]: ``out[r] = bias + sum_t w[t] * x[nbr[t, r]]``; with ``flip`` tap t uses weight tap KK-1-t.

    Args:
        x: [M, C] rows (any strides).
        nbr: [KK, M] int32.
        weight: [C, 1, K, K].
        bias: [C] or None.
        flip: the flipped kernel (grad_x of the submanifold convolution).
        out_dtype: dtype of the result, x's by default.
        blocks: (BLOCK_M, BLOCK_C, num_warps), to tune; by default ``_fwd_blocks(C)``.
    """
    m, c = x.shape
    kk = nbr.shape[0]
    out = torch.empty((m, c), dtype=out_dtype or x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    w = weight.reshape(c, kk)  # [C, KK]
    b = bias if bias is not None else w  # a dummy pointer when there is no bias
    block_m, block_c, warps = blocks or _fwd_blocks(c)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    _sparse_dwconv_kernel[grid](
        x, nbr, w, b, out, m, c, *x.stride(), *nbr.stride(), *w.stride(), b.stride(0),
        K=math.isqrt(kk), FLIP=flip, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return out


def sparse_dwconv_wgrad(
    grad: torch.Tensor,
    x: torch.Tensor,
    nbr: torch.Tensor,
    programs: int | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients: ``gw[c, t] = sum_r grad[r, c] * x[nbr[t, r], c]``, ``gb = grad.sum(0)``.

    Args:
        grad: [M, C] gradient of the output.
        x: [M, C] the forward input.
        nbr: [KK, M] int32.
        programs: splits of the rows (default: enough for about 4 programs per SM in all, over the KK + 1 taps and
            the channel blocks).
        blocks: (BLOCK_M, BLOCK_C, num_warps), to tune; by default ``_wgrad_blocks(C)``.
    Returns: gw [C, KK] fp32, gb [C] fp32.
    """
    m, c = x.shape
    kk = nbr.shape[0]
    if m == 0 or c == 0:
        return torch.zeros((c, kk), dtype=torch.float32, device=x.device), x.new_zeros(c, dtype=torch.float32)
    block_m, block_c, warps = blocks or _wgrad_blocks(c)
    n_c = triton.cdiv(c, block_c)
    if programs is None:
        programs = triton.cdiv(target_programs(x.device), (kk + 1) * n_c)
    splits, rows_per_split = split_blocks(m, block_m, programs)
    part = torch.empty((splits, kk + 1, c), dtype=torch.float32, device=x.device)  # [S, KK + 1, C]
    _sparse_dwconv_wgrad_kernel[(splits, kk + 1, n_c)](
        grad, x, nbr, part, m, c, rows_per_split, *grad.stride(), *x.stride(), *nbr.stride(),
        K=math.isqrt(kk), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    total = part.sum(0) if splits > 1 else part[0]  # [KK + 1, C]
    return total[:kk].t().contiguous(), total[kk].clone()  # [C, KK], [C]: fresh tensors, no views
