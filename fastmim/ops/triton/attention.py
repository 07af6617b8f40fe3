"""Triton kernels of ``attention``: softmax(q k^T * scale) v per (sample, head), read straight from the packed qkv
[B, N, 3, H, hd] a ViT's qkv projection produces and written straight in the [B, N, H, hd] layout its output
projection reads (no permute copies either way; the backward writes the packed gradient [B, N, 3, H, hd] the same
way). Sized for MAE's short sequences (N up to a few hundred tokens, head dims 32 and 64), non-causal, no mask.

Forward, one program per (block of BLOCK_M queries, sample and head): the flash-attention loop over key blocks with
an online softmax in fp32 (exp2, the scale folded into log2 units); stores the output and the row's log-sum-exp
(log2 units) for the backward.

Backward, two launches of one kernel and no atomics (deterministic): one program per key block accumulates dK and
dV over all query blocks, then one per query block accumulates dQ over all key blocks; both recompute the
probabilities from the saved log-sum-exp. ``delta = rowsum(dO * O)`` comes from a small kernel first.

Matmuls take the inputs' dtype with fp32 accumulation on a GPU (fp32 inputs in IEEE precision, not TF32); under
``TRITON_INTERPRET=1`` (no bf16 arithmetic there) every load is cast to fp32 first (``UPCAST``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store
from fastmim.ops.triton._launch import jit_kernel

_LOG2E = 1.4426950408889634


@triton.jit
def _tile(ptr, rows, row_stride, cols, col_stride, mask, UPCAST: tl.constexpr):
    """The [rows, cols] tile at ``ptr + rows * row_stride + cols * col_stride`` (0 where masked); fp32 under the
    interpreter (UPCAST), the stored dtype on a GPU (the matmuls take it)."""
    x = tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@jit_kernel
def _attn_fwd_kernel(
    qkv_ptr,  # [B, N, 3, H, hd]
    o_ptr,  # [B, N, H, hd] out
    lse_ptr,  # [B * H, N] fp32 out: log2-sum-exp2 of the scaled scores (log2 units)
    N,
    H,
    D,
    s_b,
    s_n,
    s_t,
    s_h,
    s_d,
    o_b,
    o_n,
    o_h,
    o_d,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)  # axis 0: up to 2^31 - 1 programs (axis 1 stops at 65535)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base = qkv_ptr + b * s_b + h * s_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < N
    dmask = offs_d < D
    q = _tile(base, offs_m, s_n, offs_d, s_d, mmask[:, None] & dmask[None, :], UPCAST)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = _tile(base + s_t, offs_d, s_d, offs_n, s_n, dmask[:, None] & nmask[None, :], UPCAST)  # [BLOCK_D, BLOCK_N]
        v = _tile(base + 2 * s_t, offs_n, s_n, offs_d, s_d, nmask[:, None] & dmask[None, :], UPCAST)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * o_b + h * o_h + offs_m[:, None] * o_n + offs_d[None, :] * o_d
    tl.store(o_ptrs, cast_for_store(out, o_ptr), mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=mmask)


@jit_kernel
def _attn_bwd_kernel(
    qkv_ptr,  # [B, N, 3, H, hd]
    do_ptr,  # [B, N, H, hd]
    lse_ptr,  # [B * H, N] fp32 (log2 units)
    delta_ptr,  # [B * H, N] fp32: rowsum(dO * O)
    dqkv_ptr,  # [B, N, 3, H, hd] out: the q part (DQ) or the k and v parts
    N,
    H,
    D,
    s_b,
    s_n,
    s_t,
    s_h,
    s_d,
    g_b,
    g_n,
    g_h,
    g_d,
    d_b,
    d_n,
    d_t,
    d_h,
    d_d,
    scale,
    qk_scale,
    DQ: tl.constexpr,  # True: one program per query block, dQ over all key blocks; False: per key block, dK and dV
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base = qkv_ptr + b * s_b + h * s_h
    gbase = do_ptr + b * g_b + h * g_h
    row = lse_ptr + bh.to(tl.int64) * N
    drow = delta_ptr + bh.to(tl.int64) * N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    dbase = dqkv_ptr + b * d_b + h * d_h
    if DQ:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q_mask = mmask[:, None] & dmask[None, :]
        q = _tile(base, offs_m, s_n, offs_d, s_d, q_mask, UPCAST)
        do = _tile(gbase, offs_m, g_n, offs_d, g_d, q_mask, UPCAST)
        lse = tl.load(row + offs_m, mask=mmask, other=0.0)
        delta = tl.load(drow + offs_m, mask=mmask, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            kv_mask = nmask[:, None] & dmask[None, :]
            k = _tile(base + s_t, offs_n, s_n, offs_d, s_d, kv_mask, UPCAST)
            v = _tile(base + 2 * s_t, offs_n, s_n, offs_d, s_d, kv_mask, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(mmask[:, None] & nmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dst = dbase + offs_m[:, None] * d_n + offs_d[None, :] * d_d
        tl.store(dst, cast_for_store(dq * scale, dqkv_ptr), mask=q_mask)
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kv_mask = nmask[:, None] & dmask[None, :]
        k = _tile(base + s_t, offs_n, s_n, offs_d, s_d, kv_mask, UPCAST)
        v = _tile(base + 2 * s_t, offs_n, s_n, offs_d, s_d, kv_mask, UPCAST)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start in range(0, N, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mmask = offs_m < N
            q_mask = mmask[:, None] & dmask[None, :]
            q = _tile(base, offs_m, s_n, offs_d, s_d, q_mask, UPCAST)
            do = _tile(gbase, offs_m, g_n, offs_d, g_d, q_mask, UPCAST)
            lse = tl.load(row + offs_m, mask=mmask, other=0.0)
            delta = tl.load(drow + offs_m, mask=mmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            p = tl.where(mmask[:, None] & nmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dst = dbase + offs_n[:, None] * d_n + offs_d[None, :] * d_d
        tl.store(dst + d_t, cast_for_store(dk * scale, dqkv_ptr), mask=kv_mask)
        tl.store(dst + 2 * d_t, cast_for_store(dv, dqkv_ptr), mask=kv_mask)


@jit_kernel
def _attn_delta_kernel(
    o_ptr,  # [B, N, H, hd]
    do_ptr,  # [B, N, H, hd]
    delta_ptr,  # [B * H, N] fp32 out: rowsum(dO * O)
    N,
    H,
    D,
    o_b,
    o_n,
    o_h,
    o_d,
    g_b,
    g_n,
    g_h,
    g_d,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b * o_b + h * o_h + offs_m[:, None] * o_n + offs_d[None, :] * o_d, mask=msk, other=0.0)
    g = tl.load(do_ptr + b * g_b + h * g_h + offs_m[:, None] * g_n + offs_d[None, :] * g_d, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


def _config(n: int, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): 64 x 64 tiles (16 x 16 for sequences that short; 32 x 32 for fp32,
    whose IEEE matmuls take no tensor cores and spill at 64 x 64), head dim padded to a power of two of at least 16
    (tl.dot's minimum)."""
    block_d = max(16, triton.next_power_of_2(d))
    block = 16 if n <= 16 else 32 if n <= 32 or dtype == torch.float32 else 64
    warps = 4 if block_d <= 64 else 8
    return block, block, block_d, warps


def _common(qkv: torch.Tensor):
    b, n, three, h, d = qkv.shape
    interpreted = qkv.device.type == "cpu"
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"  # only fp32 inputs read it
    return b, n, h, d, interpreted, precision


def attention_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, N, 3, H, hd] (any strides) -> (out [B, N, H, hd] contiguous in qkv's dtype, lse [B * H, N] fp32)."""
    b, n, h, d, interpreted, precision = _common(qkv)
    out = torch.empty((b, n, h, d), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((b * h, n), device=qkv.device, dtype=torch.float32)
    if b * h * n == 0:
        return out, lse
    bm, bn, bd, warps = _config(n, d, qkv.dtype)
    _attn_fwd_kernel[(b * h, triton.cdiv(n, bm))](
        qkv, out, lse, n, h, d, *qkv.stride(), *out.stride(), scale * _LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=interpreted, PRECISION=precision, num_warps=warps,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """-> dqkv [B, N, 3, H, hd] contiguous in qkv's dtype."""
    b, n, h, d, interpreted, precision = _common(qkv)
    dqkv = torch.empty((b, n, 3, h, d), device=qkv.device, dtype=qkv.dtype)
    if b * h * n == 0:
        return dqkv.zero_()
    grad = grad.to(qkv.dtype)  # the kernels' matmuls take one dtype (autograd already gives the output's)
    lse = lse.contiguous()  # read as [B * H, N] rows (a raw call may pass an expanded one)
    bm, bn, bd, warps = _config(n, d, qkv.dtype)
    delta = torch.empty((b * h, n), device=qkv.device, dtype=torch.float32)
    _attn_delta_kernel[(b * h, triton.cdiv(n, 64))](out, grad, delta, n, h, d, *out.stride(), *grad.stride(),
                                                    BLOCK_M=64, BLOCK_D=bd)  # fmt: skip
    args = (qkv, grad, lse, delta, dqkv, n, h, d, *qkv.stride(), *grad.stride(), *dqkv.stride(), scale,
            scale * _LOG2E)  # fmt: skip
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=interpreted, PRECISION=precision, num_warps=warps)
    _attn_bwd_kernel[(b * h, triton.cdiv(n, bn))](*args, DQ=False, **meta)
    _attn_bwd_kernel[(b * h, triton.cdiv(n, bm))](*args, DQ=True, **meta)
    return dqkv
