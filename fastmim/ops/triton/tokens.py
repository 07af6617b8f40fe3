"""Triton kernels for the visible-token gather and the decoder-input scatter (MAE), forward and backward.

Every kernel takes element strides, so non-contiguous inputs need no copy; loads are cast to fp32 (the interpreter
has no bf16 arithmetic) and stores round once to the output dtype. Ids are never trusted: an id outside its range
gives a NaN row (forward) or is skipped (backward), never an out-of-bounds access.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store
from fastmim.ops.triton._launch import jit_kernel


def _blocks(d: int, rows_per_program: int = 4096) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D): a [rows, D] tile of about ``rows_per_program`` elements."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 1024)
    return max(1, min(64, rows_per_program // block_d)), block_d


@functools.cache  # called per launch: host time
def row_config(d: int) -> tuple[int, int, int]:
    """The default (BLOCK_ROWS, BLOCK_D, num_warps) of the gather, its backward and the scatter, for rows of d.
    Callers pass ``int(d)``: traced with a symbolic D (torch.compile's dynamic shapes, the Triton twins), the tiles
    are compile-time constants, so D is specialised rather than hashed as a SymInt."""
    return (*_blocks(d), 4)


# grid axis 1 (the batch here) stops at 65535 programs on CUDA: a larger batch is launched in slices of this many
# samples (I-JEPA gathers B x targets rows)
MAX_GRID_Y = 65535


def _batch_slices(b: int, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """``[tensors]`` (no new views: host time), or past MAX_GRID_Y samples the tensors' batch slices."""
    if b <= MAX_GRID_Y:
        return [tensors]
    return [tuple(t[s : s + MAX_GRID_Y] for t in tensors) for s in range(0, b, MAX_GRID_Y)]


@functools.cache
def scatter_bwd_config(d: int) -> tuple[int, int, int, int]:
    """The default (BLOCK_R, BLOCK_D, B_CHUNK, num_warps) of the scatter's backward, for rows of d."""
    return (*_blocks(d, 2048), 8, 4)


@jit_kernel
def _gather_rows_kernel(
    x_ptr,  # [B, N, D] source rows
    ids_ptr,  # [B, K] int, which source row each output row takes
    out_ptr,  # [B, K, D] contiguous
    N,
    K,
    D,
    sx_b,
    sx_n,
    sx_d,
    si_b,
    si_k,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)  # the batch on axis 1, row blocks on axis 0 (whose limit is 2^31 - 1, not 65535)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    kmask = k < K
    ids = tl.load(ids_ptr + b.to(tl.int64) * si_b + k.to(tl.int64) * si_k, mask=kmask, other=0).to(tl.int64)
    valid = (ids >= 0) & (ids < N)
    ids = tl.where(valid, ids, 0)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # [BLOCK_D]
        dmask = d < D
        src = x_ptr + b.to(tl.int64) * sx_b + ids[:, None] * sx_n + d[None, :] * sx_d
        v = tl.load(src, mask=(kmask & valid)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        v = tl.where(valid[:, None], v, float("nan"))
        dst = out_ptr + (b.to(tl.int64) * K + k[:, None]) * D + d[None, :]
        tl.store(dst, cast_for_store(v, out_ptr), mask=kmask[:, None] & dmask[None, :])


@jit_kernel
def _put_rows_kernel(
    g_ptr,  # [B, K, D] rows to put
    ids_ptr,  # [B, K] int, distinct per row: where each row goes
    out_ptr,  # [B, N, D] contiguous, zero-filled before
    N,
    K,
    D,
    sg_b,
    sg_k,
    sg_d,
    si_b,
    si_k,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    ids = tl.load(ids_ptr + b.to(tl.int64) * si_b + k.to(tl.int64) * si_k, mask=kmask, other=-1).to(tl.int64)
    ok = kmask & (ids >= 0) & (ids < N)  # an out-of-range id is skipped, never written out of bounds
    ids = tl.where(ok, ids, 0)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m = ok[:, None] & (d < D)[None, :]
        v = tl.load(g_ptr + b.to(tl.int64) * sg_b + k[:, None].to(tl.int64) * sg_k + d[None, :] * sg_d, mask=m)
        dst = out_ptr + (b.to(tl.int64) * N + ids[:, None]) * D + d[None, :]
        tl.store(dst, cast_for_store(v.to(tl.float32), out_ptr), mask=m)


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """[B, N, D] -> [B, K, D] with out[b, k] = x[b, ids_keep[b, k]]. ``config``: (BLOCK_K, BLOCK_D, num_warps), for
    benchmarks/tune_triton_ops.py; None takes the defaults."""
    b, n, d = x.shape
    k = ids_keep.shape[1]
    out = torch.empty((b, k, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_k, block_d, warps = config or row_config(int(d))
    for xs, ids, o in _batch_slices(b, x, ids_keep, out):
        _gather_rows_kernel[(triton.cdiv(k, block_k), o.shape[0])](
            xs, ids, o, n, k, d, *xs.stride(), *ids.stride(), BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps
        )
    return out


def gather_visible_backward(
    grad: torch.Tensor, ids_keep: torch.Tensor, n: int, config: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """[B, K, D] -> [B, N, D]: grad rows back at ids_keep, zeros elsewhere. A memset and one kernel that puts each
    row where it came from (the ids are distinct: no atomics), the traffic of the eager zeros + scatter_add_; the
    earlier inverse-index version (every output row written once, 3 launches) measured 2.7x slower on an H100."""
    b, k, d = grad.shape
    out = torch.zeros((b, n, d), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0 or k == 0:
        return out
    block_k, block_d, warps = config or row_config(int(d))
    for g, ids, o in _batch_slices(b, grad, ids_keep, out):
        _put_rows_kernel[(triton.cdiv(k, block_k), o.shape[0])](
            g, ids, o, n, k, d, *g.stride(), *ids.stride(), BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps
        )
    return out


@jit_kernel
def _scatter_masked_kernel(
    x_ptr,  # [B, K, D] visible tokens
    ids_ptr,  # [B, N] int, < K: visible token, in [K, N): mask token
    mt_ptr,  # [D] mask token
    pos_ptr,  # [R, D] position embedding (if HAS_POS)
    cls_ptr,  # [B or 1, D] class token (if HAS_CLS), batch stride scls_b (0 when broadcast)
    out_ptr,  # [B, R, D] contiguous, R = N + HAS_CLS
    N,
    K,
    D,
    sx_b,
    sx_k,
    sx_d,
    si_b,
    si_n,
    smt_d,
    spos_r,
    spos_d,
    scls_b,
    scls_d,
    HAS_POS: tl.constexpr,
    HAS_CLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)
    R = N + HAS_CLS
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] output rows
    rmask = r < R
    n = r - HAS_CLS  # patch index, -1 for the class row
    is_patch = rmask & (n >= 0)
    at = b.to(tl.int64) * si_b + tl.where(is_patch, n, 0).to(tl.int64) * si_n  # (int64: any strides)
    j = tl.load(ids_ptr + at, mask=is_patch, other=0).to(tl.int64)
    vis = is_patch & (j >= 0) & (j < K)
    msk = is_patch & (j >= K) & (j < N)
    bad = is_patch & ~vis & ~msk
    j = tl.where(vis, j, 0)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        dmask = d < D
        src = x_ptr + b.to(tl.int64) * sx_b + j[:, None] * sx_k + d[None, :] * sx_d
        v = tl.load(src, mask=vis[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        mt = tl.load(mt_ptr + d * smt_d, mask=dmask, other=0.0).to(tl.float32)  # [BLOCK_D]
        v = tl.where(msk[:, None], mt[None, :], v)
        if HAS_CLS:
            c = tl.load(cls_ptr + b.to(tl.int64) * scls_b + d * scls_d, mask=dmask, other=0.0).to(tl.float32)
            v = tl.where((r == 0)[:, None], c[None, :], v)
        if HAS_POS:
            pe = tl.load(pos_ptr + r[:, None].to(tl.int64) * spos_r + d[None, :] * spos_d,
                         mask=rmask[:, None] & dmask[None, :])  # fmt: skip
            v += pe.to(tl.float32)
        v = tl.where(bad[:, None], float("nan"), v)
        dst = out_ptr + (b.to(tl.int64) * R + r[:, None]) * D + d[None, :]
        tl.store(dst, cast_for_store(v, out_ptr), mask=rmask[:, None] & dmask[None, :])


@jit_kernel
def _scatter_masked_bwd_kernel(
    g_ptr,  # [B, R, D] gradient of the decoder input
    ids_ptr,  # [B, N] int
    gx_ptr,  # [B, K, D] zero-filled, gets the visible rows
    gmt_ptr,  # [num_programs, D] fp32 partial mask-token gradients
    gpos_ptr,  # [num_b_chunks, R, D] fp32 partial position-embedding gradients (if NEED_POS)
    B,
    N,
    K,
    D,
    sg_b,
    sg_r,
    sg_d,
    si_b,
    si_n,
    HAS_CLS: tl.constexpr,
    NEED_POS: tl.constexpr,
    B_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    R = N + HAS_CLS
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    n = r - HAS_CLS
    is_patch = rmask & (n >= 0)
    prog = pid_b * tl.num_programs(0) + pid_r
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        dmask = d < D
        mt_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        pos_acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for i in range(0, B_CHUNK):
            b = pid_b * B_CHUNK + i
            live = b < B
            at = b.to(tl.int64) * si_b + tl.where(is_patch, n, 0).to(tl.int64) * si_n
            j = tl.load(ids_ptr + at, mask=is_patch & live, other=-1)
            j = j.to(tl.int64)
            vis = is_patch & live & (j >= 0) & (j < K)
            msk = is_patch & live & (j >= K) & (j < N)
            # (r int64 too: a [R, B, D] gradient seen as [B, R, D] has sg_r = B * D, and r * sg_r passed 2^31)
            src = g_ptr + b.to(tl.int64) * sg_b + r[:, None].to(tl.int64) * sg_r + d[None, :] * sg_d
            g = tl.load(src, mask=(rmask & live)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            if NEED_POS:
                pos_acc += g
            mt_acc += tl.sum(tl.where(msk[:, None], g, 0.0), axis=0)
            dst = gx_ptr + (b.to(tl.int64) * K + tl.where(vis, j, 0)[:, None]) * D + d[None, :]
            tl.store(dst, cast_for_store(g, gx_ptr), mask=vis[:, None] & dmask[None, :])
        tl.store(gmt_ptr + prog.to(tl.int64) * D + d, mt_acc, mask=dmask)
        if NEED_POS:
            dst = gpos_ptr + (pid_b.to(tl.int64) * R + r[:, None]) * D + d[None, :]
            tl.store(dst, pos_acc, mask=rmask[:, None] & dmask[None, :])


def scatter_masked(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,  # [D]
    pos_embed: torch.Tensor | None,  # [R, D]
    cls_token: torch.Tensor | None,  # [B or 1, D]
    out_dtype: torch.dtype,
    config: tuple[int, int, int] | None = None,  # (BLOCK_R, BLOCK_D, num_warps)
) -> torch.Tensor:
    b, k, d = x_vis.shape
    n = ids_restore.shape[1]
    has_cls = cls_token is not None
    r = n + int(has_cls)
    out = torch.empty((b, r, d), dtype=out_dtype, device=x_vis.device)
    if out.numel() == 0:
        return out
    block_r, block_d, warps = config or row_config(int(d))
    dummy = mask_token
    pos = pos_embed if pos_embed is not None else dummy.view(1, -1)
    cls = cls_token if has_cls else dummy.view(1, -1)
    scls_b = cls.stride(0) if cls.shape[0] > 1 else 0
    batch = (x_vis, ids_restore, out, cls) if scls_b else (x_vis, ids_restore, out)
    for xs, ids, o, *own in _batch_slices(b, *batch):
        c = own[0] if own else cls
        _scatter_masked_kernel[(triton.cdiv(r, block_r), o.shape[0])](
            xs, ids, mask_token, pos, c, o, n, k, d,
            *xs.stride(), *ids.stride(), mask_token.stride(0), *pos.stride(), scls_b, c.stride(1),
            HAS_POS=pos_embed is not None, HAS_CLS=has_cls, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    return out


def scatter_masked_backward(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    k: int,
    has_cls: bool,
    need_pos: bool,
    x_dtype: torch.dtype,
    config: tuple[int, int, int, int] | None = None,  # (BLOCK_R, BLOCK_D, B_CHUNK, num_warps)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns grad_x_vis [B, K, D] (x_dtype), grad_mask_token [D] fp32, grad_pos [R, D] fp32 or None."""
    b, r, d = grad.shape
    n = ids_restore.shape[1]
    # zero-filled so that rows no valid id points at are zeros, not garbage
    gx = torch.zeros((b, k, d), dtype=x_dtype, device=grad.device)
    block_r, block_d, b_chunk, warps = config or scatter_bwd_config(int(d))
    b_chunk = max(b_chunk, triton.cdiv(b, MAX_GRID_Y))  # (batch chunks on grid axis 1)
    grid = (triton.cdiv(r, block_r), triton.cdiv(b, b_chunk))
    gmt = torch.empty((grid[0] * grid[1], d), dtype=torch.float32, device=grad.device)
    gpos = torch.empty((grid[1], r, d) if need_pos else (1, 1, 1), dtype=torch.float32, device=grad.device)
    if b and r and d:
        _scatter_masked_bwd_kernel[grid](
            grad, ids_restore, gx, gmt, gpos, b, n, k, d, *grad.stride(), *ids_restore.stride(),
            HAS_CLS=has_cls, NEED_POS=need_pos, B_CHUNK=b_chunk, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    else:
        gmt.zero_()
        gpos.zero_()
    return gx, gmt.sum(0), gpos.sum(0) if need_pos else None
