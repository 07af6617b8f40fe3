"""Triton kernels for Global Response Norm (ConvNeXt V2) on [B, N, C]: N rows per sample, statistics per sample.

Forward, two launches: ``_grn_stats_kernel`` sums x^2 over each sample's rows into fp32 partial sums per row split
(deterministic: no atomics); ``_grn_fwd_kernel`` turns them into gx = sqrt(sum) and the per-sample mean of gx
(each program loops over all C of its sample: a few KiB from L2) and writes ``out = x * (1 + w * gx / d) + bias``.

Backward, three launches (two for the bias gradient alone): the same stats kernel also sums dout * x and dout;
``_grn_bwd_kernel`` recomputes d and the per-sample ``sum_c(w * P * gx)`` from those sums and writes dx (and d per
sample); ``_grn_param_grad_kernel`` sums ``P * gx / d`` and dout over the samples into the weight and bias gradients.
Nothing is saved between forward and backward but x: the backward's pass over x gets sum x^2 for free.

Loads are cast to fp32 (the interpreter has no bf16 arithmetic), stores round once. Offsets into [B, N, C] are
64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store, split_blocks, target_programs
from fastmim.ops.triton._launch import jit_kernel

# rows of the partial-sum buffer [S, NSTAT, B, C]
_SUMSQ, _P, _Q = 0, 1, 2


@triton.jit
def _split_sum(
    part_ptr,  # [S, NSTAT, B, C] fp32 partial sums
    k,  # which statistic
    b,  # sample (int64)
    c,  # [BLOCK] channels (int64)
    cmask,
    B,
    C,
    S,
    split_stride,  # NSTAT * B * C
):
    """[BLOCK] fp32: sum over the S row splits of statistic k of sample b at channels c."""
    ptr = part_ptr + (k * B + b) * C + c
    acc = tl.load(ptr, mask=cmask, other=0.0)
    for _ in range(1, S):
        ptr += split_stride
        acc += tl.load(ptr, mask=cmask, other=0.0)
    return acc


@jit_kernel
def _grn_stats_kernel(
    x_ptr,  # [B, N, C] input
    g_ptr,  # [B, N, C] gradient of the output (read if GRAD)
    part_ptr,  # [S, NSTAT, B, C] fp32: per row split, sum x^2 (and, if GRAD, sum g * x and sum g)
    B,
    N,
    C,
    rows_per_split,  # a multiple of BLOCK_N
    sx_b,
    sx_n,
    sx_c,
    sg_b,
    sg_n,
    sg_c,
    GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program (sample, split, channel block): column sums over the split's rows, accumulated elementwise in a
    # [BLOCK_N, BLOCK_C] tile and reduced across rows once at the end
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = c < C
    row0 = split * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, N)
    sq = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    gx = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    gs = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for n0 in range(row0, row1, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        m = (n < row1)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + b * sx_b + n[:, None] * sx_n + c[None, :] * sx_c, mask=m, other=0.0).to(tl.float32)
        sq += v * v
        if GRAD:
            g = tl.load(g_ptr + b * sg_b + n[:, None] * sg_n + c[None, :] * sg_c, mask=m, other=0.0).to(tl.float32)
            gx += g * v
            gs += g
    if GRAD:
        dst = part_ptr + (split * 3 * B + b) * C + c  # statistic k at dst + k * B * C
        tl.store(dst, tl.sum(sq, axis=0), mask=cmask)
        tl.store(dst + B * C, tl.sum(gx, axis=0), mask=cmask)
        tl.store(dst + 2 * B * C, tl.sum(gs, axis=0), mask=cmask)
    else:
        tl.store(part_ptr + (split * B + b) * C + c, tl.sum(sq, axis=0), mask=cmask)


@triton.jit
def _grn_denominator_sums(
    part_ptr,  # [S, NSTAT, B, C] fp32 partial sums
    w_ptr,  # [C] weight (read if WITH_P)
    b,
    B,
    C,
    S,
    split_stride,
    sw,
    WITH_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """(sum_c gx[b, c], sum_c w[c] * P[b, c] * gx[b, c]) over all C of sample b, in chunks of BLOCK_R."""
    acc_gx = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_R):
        c = c0 + tl.arange(0, BLOCK_R).to(tl.int64)
        cmask = c < C
        gx = tl.sqrt(_split_sum(part_ptr, 0, b, c, cmask, B, C, S, split_stride))
        acc_gx += gx
        if WITH_P:
            p = _split_sum(part_ptr, 1, b, c, cmask, B, C, S, split_stride)
            w = tl.load(w_ptr + c * sw, mask=cmask, other=0.0).to(tl.float32)
            acc_p += w * p * gx
    return tl.sum(acc_gx, axis=0), tl.sum(acc_p, axis=0)


@jit_kernel
def _grn_fwd_kernel(
    x_ptr,  # [B, N, C] input
    part_ptr,  # [S, 1, B, C] fp32 partial sums of x^2 (``_grn_stats_kernel``)
    w_ptr,  # [C] weight
    bias_ptr,  # [C] bias
    out_ptr,  # [B, N, C] contiguous, x's dtype
    B,
    N,
    C,
    S,
    row_blocks,  # cdiv(N, BLOCK_N)
    c_per_program,  # channels of one program: a multiple of BLOCK_C
    split_stride,  # B * C
    sx_b,
    sx_n,
    sx_c,
    sw,
    sbias,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # program (sample * row block, channel group): the sample's d = mean_c gx + eps from all its C partial sums,
    # then its [BLOCK_N, c_per_program] part of out, BLOCK_C channels at a time
    pid = tl.program_id(0)
    b = (pid // row_blocks).to(tl.int64)
    n = (pid % row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    nmask = n < N
    sum_gx, _ = _grn_denominator_sums(part_ptr, w_ptr, b, B, C, S, split_stride, sw, False, BLOCK_R)
    d = sum_gx / C + eps
    c_lo = tl.program_id(1) * c_per_program
    c_hi = tl.minimum(c_lo + c_per_program, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # [BLOCK_C]
        cmask = c < c_hi
        gx = tl.sqrt(_split_sum(part_ptr, 0, b, c, cmask, B, C, S, split_stride))
        w = tl.load(w_ptr + c * sw, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + c * sbias, mask=cmask, other=0.0).to(tl.float32)
        scale = 1.0 + w * (gx / d)  # [BLOCK_C]
        m = nmask[:, None] & cmask[None, :]
        v = tl.load(x_ptr + b * sx_b + n[:, None] * sx_n + c[None, :] * sx_c, mask=m, other=0.0).to(tl.float32)
        y = v * scale[None, :] + bias[None, :]
        tl.store(out_ptr + (b * N + n[:, None]) * C + c[None, :], cast_for_store(y, out_ptr), mask=m)


@jit_kernel
def _grn_bwd_kernel(
    g_ptr,  # [B, N, C] gradient of the output
    x_ptr,  # [B, N, C] input
    part_ptr,  # [S, 3, B, C] fp32 partial sums of x^2, g * x, g (``_grn_stats_kernel`` with GRAD)
    w_ptr,  # [C] weight
    dx_ptr,  # [B, N, C] contiguous, x's dtype (written if NEED_X)
    d_ptr,  # [B] fp32 out: d = mean_c gx + eps per sample (for ``_grn_param_grad_kernel``)
    B,
    N,
    C,
    S,
    row_blocks,  # cdiv(N, BLOCK_N)
    c_per_program,  # channels of one program: a multiple of BLOCK_C
    split_stride,  # 3 * B * C
    sg_b,
    sg_n,
    sg_c,
    sx_b,
    sx_n,
    sx_c,
    sw,
    eps,
    NEED_X: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # dx = g * (1 + w * nx) + x * dgx / gx (0 where gx = 0), with P = sum_n g * x, dnx = w * P and
    # dgx = dnx / d - sum_c(dnx * gx) / (C * d^2)
    pid = tl.program_id(0)
    rb = pid % row_blocks
    b = (pid // row_blocks).to(tl.int64)
    sum_gx, sum_dnx_gx = _grn_denominator_sums(part_ptr, w_ptr, b, B, C, S, split_stride, sw, NEED_X, BLOCK_R)
    d = sum_gx / C + eps
    if (rb == 0) & (tl.program_id(1) == 0):
        tl.store(d_ptr + b, d)
    if NEED_X:
        k = sum_dnx_gx / (C * d * d)
        n = rb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        nmask = n < N
        c_lo = tl.program_id(1) * c_per_program
        c_hi = tl.minimum(c_lo + c_per_program, C)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # [BLOCK_C]
            cmask = c < c_hi
            gx = tl.sqrt(_split_sum(part_ptr, 0, b, c, cmask, B, C, S, split_stride))
            p = _split_sum(part_ptr, 1, b, c, cmask, B, C, S, split_stride)
            w = tl.load(w_ptr + c * sw, mask=cmask, other=0.0).to(tl.float32)
            scale = 1.0 + w * (gx / d)
            dgx = w * p / d - k
            t = tl.where(gx > 0, dgx / tl.where(gx > 0, gx, 1.0), 0.0)  # vector_norm's zero subgradient at gx = 0
            m = nmask[:, None] & cmask[None, :]
            g = tl.load(g_ptr + b * sg_b + n[:, None] * sg_n + c[None, :] * sg_c, mask=m, other=0.0).to(tl.float32)
            v = tl.load(x_ptr + b * sx_b + n[:, None] * sx_n + c[None, :] * sx_c, mask=m, other=0.0).to(tl.float32)
            dx = g * scale[None, :] + v * t[None, :]
            tl.store(dx_ptr + (b * N + n[:, None]) * C + c[None, :], cast_for_store(dx, dx_ptr), mask=m)


@jit_kernel
def _grn_param_grad_kernel(
    part_ptr,  # [S, 3, B, C] fp32 partial sums of x^2, g * x, g
    d_ptr,  # [B] fp32 d per sample (read if NEED_W)
    dw_ptr,  # [C] fp32 weight gradient: sum_b P * gx / d (written if NEED_W)
    db_ptr,  # [C] fp32 bias gradient: sum_b sum_n g (written if NEED_B)
    B,
    C,
    S,
    split_stride,  # 3 * B * C
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = c < C
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    b = tl.program_id(0).to(tl.int64) * 0  # the sample, int64 (the interpreter's loop variables are Python ints)
    for _ in range(0, B):
        if NEED_W:
            gx = tl.sqrt(_split_sum(part_ptr, 0, b, c, cmask, B, C, S, split_stride))
            p = _split_sum(part_ptr, 1, b, c, cmask, B, C, S, split_stride)
            dw += p * (gx / tl.load(d_ptr + b))
        if NEED_B:
            db += _split_sum(part_ptr, 2, b, c, cmask, B, C, S, split_stride)
        b += 1
    if NEED_W:
        tl.store(dw_ptr + c, dw, mask=cmask)
    if NEED_B:
        tl.store(db_ptr + c, db, mask=cmask)


def _blocks(n: int, c: int, grad: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_R): tiles of up to 128 channels and about 4096 elements (2048 for the backward's
    three accumulators), no more rows than N needs; BLOCK_R channels per step of the loop over all C."""
    block_c = min(max(triton.next_power_of_2(c), 16), 128)
    block_n = min((2048 if grad else 4096) // block_c, max(triton.next_power_of_2(n), 4))
    return block_n, block_c, min(max(triton.next_power_of_2(c), 16), 1024)


def _split_rows(n: int, block_n: int, others: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(S, rows per split) for the stats kernel: enough splits of each sample's rows that S * ``others`` programs
    fill the device, each split a whole number of row blocks."""
    return split_blocks(n, block_n, triton.cdiv(target_programs(device), others) if splits is None else splits)


def _channel_groups(c: int, block_c: int, others: int, device: torch.device, groups: int | None) -> tuple[int, int]:
    """(groups, channels per group) of the elementwise kernels: a program loops over its group's channel blocks;
    groups only as many as needed to fill the device (each program also reads all C of its sample's sums)."""
    return split_blocks(c, block_c, triton.cdiv(target_programs(device), others) if groups is None else groups)


def _stats(x: torch.Tensor, g: torch.Tensor | None, block_n: int, block_c: int, splits: int | None):
    """(partial sums [S, NSTAT, B, C] fp32, S): sum x^2, and with ``g`` also sum g * x and sum g, per row split."""
    bsz, n, c = x.shape
    c_blocks = triton.cdiv(c, block_c)
    s, rows_per_split = _split_rows(n, block_n, bsz * c_blocks, x.device, splits)
    part = torch.empty((s, 1 if g is None else 3, bsz, c), dtype=torch.float32, device=x.device)
    gg = x if g is None else g  # a dummy pointer in the forward
    _grn_stats_kernel[(bsz, s, c_blocks)](
        x, gg, part, bsz, n, c, rows_per_split, *x.stride(), *gg.stride(),
        GRAD=g is not None, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return part, s


def grn_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    splits: int | None = None,
    groups: int | None = None,
) -> torch.Tensor:
    """GRN of each sample's rows: [B, N, C] -> [B, N, C] in x's dtype.

    Args:
        x: [B, N, C] (any strides).
        weight, bias: [C].
        eps: added to the mean norm.
        splits: row splits of the sum of squares (default: enough programs to fill the device).
        groups: channel groups of the elementwise kernel (default: enough programs to fill the device).
    """
    bsz, n, c = x.shape
    out = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_n, block_c, block_r = _blocks(n, c, grad=False)
    part, s = _stats(x, None, block_n, block_c, splits)
    row_blocks = triton.cdiv(n, block_n)
    n_groups, c_per = _channel_groups(c, block_c, bsz * row_blocks, x.device, groups)
    _grn_fwd_kernel[(bsz * row_blocks, n_groups)](
        x, part, weight, bias, out, bsz, n, c, s, row_blocks, c_per, bsz * c, *x.stride(), weight.stride(0),
        bias.stride(0), eps, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return out


def grn_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    splits: int | None = None,
    groups: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``grn_fwd``: (dx [B, N, C] in x's dtype, dweight [C] fp32, dbias [C] fp32), None where not
    asked for.

    Args:
        grad: [B, N, C] gradient of the output (any strides, any float dtype).
        x: [B, N, C] the forward input.
        weight: [C].
        eps: as the forward.
        need_x, need_w, need_b: which gradients to compute.
        splits, groups: as ``grn_fwd``.
    """
    bsz, n, c = x.shape
    dx = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device) if need_x else None
    if x.numel() == 0 or not (need_x or need_w or need_b):  # no rows: dweight = dbias = 0
        dw = torch.zeros(c, dtype=torch.float32, device=x.device) if need_w else None
        db = torch.zeros(c, dtype=torch.float32, device=x.device) if need_b else None
        return dx, dw, db
    # written whole by the parameter kernel: no fill launches (separate buffers: the custom op's outputs may not alias)
    dw = torch.empty(c, dtype=torch.float32, device=x.device) if need_w else None
    db = torch.empty(c, dtype=torch.float32, device=x.device) if need_b else None
    d = torch.empty(bsz, dtype=torch.float32, device=x.device)
    block_n, block_c, block_r = _blocks(n, c, grad=True)
    part, s = _stats(x, grad, block_n, block_c, splits)
    if need_x or need_w:
        row_blocks = triton.cdiv(n, block_n) if need_x else 1
        n_groups, c_per = _channel_groups(c, block_c, bsz * row_blocks, x.device, groups) if need_x else (1, c)
        _grn_bwd_kernel[(bsz * row_blocks, n_groups)](
            grad, x, part, weight, x if dx is None else dx, d, bsz, n, c, s, row_blocks, c_per, 3 * bsz * c,
            *grad.stride(), *x.stride(), weight.stride(0), eps,
            NEED_X=need_x, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip
    if need_w or need_b:
        block_p = min(max(triton.next_power_of_2(c), 16), 64)
        _grn_param_grad_kernel[(triton.cdiv(c, block_p),)](
            part, d, d if dw is None else dw, d if db is None else db, bsz, c, s, 3 * bsz * c,
            NEED_W=need_w, NEED_B=need_b, BLOCK_C=block_p, num_warps=4,
        )  # fmt: skip
    return dx, dw, db
