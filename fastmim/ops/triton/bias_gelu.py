"""Triton kernels of ``bias_gelu``: ``y = gelu(x + b)`` (erf form) forward; backward ``dx = dy * gelu'(x + b)`` with
the bias gradient's per-program partial sums in the same pass (one read of dy and x, one write of dx)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store, split_blocks, target_programs
from fastmim.ops.triton._launch import jit_kernel


@jit_kernel
def _bias_gelu_fwd_kernel(
    x_ptr,  # [M, N] contiguous
    b_ptr,  # [N]
    y_ptr,  # [M, N] contiguous, x's dtype
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    m = (rows < M)[:, None] & cmask[None, :]
    off = rows[:, None] * N + cols[None, :]
    u = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    u += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))  # u * Phi(u), Phi(u) = (1 + erf(u / sqrt 2)) / 2
    tl.store(y_ptr + off, cast_for_store(y, y_ptr), mask=m)


@jit_kernel
def _bias_gelu_bwd_kernel(
    dy_ptr,  # [M, N] contiguous
    x_ptr,  # [M, N] contiguous
    b_ptr,  # [N]
    dx_ptr,  # [M, N] contiguous, x's dtype
    part_ptr,  # [P, N] fp32: per row program, the sum of its rows of dx (the bias gradient's partials)
    M,
    N,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over its rows once, at the end
    row0 = pid.to(tl.int64) * rows_per_program
    row1 = tl.minimum(row0 + rows_per_program, M)
    for r0 in range(row0, row1, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        m = (rows < row1)[:, None] & cmask[None, :]
        off = rows[:, None] * N + cols[None, :]
        u = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327  # phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
        g = tl.where(m, dy * (cdf + u * pdf), 0.0)
        tl.store(dx_ptr + off, cast_for_store(g, dx_ptr), mask=m)
        acc += g
    tl.store(part_ptr + pid * N + cols, tl.sum(acc, axis=0), mask=cmask)


def col_block(n: int, cap: int) -> int:
    """BLOCK_N for rows of n values: at most ``cap``, and a divisor of n where a power of two of at least cap / 8
    divides it, so no column tile is part empty (n = 1536 with cap 1024: 512, where 1024 would leave a quarter of the
    lanes idle); else n rounded up to a power of two, capped."""
    block = min(triton.next_power_of_2(n), cap)
    if n % block == 0:
        return block
    div = n & -n  # the largest power of two dividing n
    return min(div, cap) if div >= cap // 8 else block


def fwd_blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): tiles of about 4096 values."""
    block_n = col_block(n, 1024)
    return max(1, 4096 // block_n), block_n, 8


def bwd_blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): [BLOCK_M, BLOCK_N] fp32 partial sums kept in registers, about 2048 values."""
    block_n = col_block(n, 256)
    return max(1, 2048 // block_n), block_n, 8


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, N] contiguous, bias [N] -> gelu(x + bias) [M, N] in x's dtype."""
    m, n = x.shape
    y = torch.empty_like(x)
    if x.numel():
        block_m, block_n, warps = config or fwd_blocks(n)
        _bias_gelu_fwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            x, bias, y, m, n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
        )
    return y


def bias_gelu_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, need_b: bool, config: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx [M, N] in x's dtype, dbias [N] fp32 or None) for contiguous dy, x [M, N]."""
    m, n = x.shape
    dx = torch.empty_like(x)
    if not x.numel():
        return dx, x.new_zeros(n, dtype=torch.float32) if need_b else None
    block_m, block_n, warps = config or bwd_blocks(n)
    col_blocks = triton.cdiv(n, block_n)
    programs, rows = split_blocks(m, block_m, triton.cdiv(target_programs(x.device), col_blocks))
    part = torch.empty((programs, n), dtype=torch.float32, device=x.device)  # every program writes its row
    _bias_gelu_bwd_kernel[(programs, col_blocks)](
        dy, x, bias, dx, part, m, n, rows, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
    )
    return dx, part.sum(0) if need_b else None
