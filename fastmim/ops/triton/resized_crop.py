"""Triton kernels of ``resized_crop``: a batch of decoded images of different sizes, each cropped to its own box and
resized to S x S (antialiased bicubic or bilinear, PIL's convention), mirrored and normalised, in two launches for
the batch (torch: a crop, a resize, a flip and a copy per image, several hundred launches for a batch of 256).

The images are packed into one uint8 buffer (``torch.cat`` of the flattened images: one copy kernel). Pass 1 resizes
each crop's rows to S columns into a packed fp32 buffer ``[C, h_n, S]`` per image, clamped to [0, 255]; pass 2
resizes its columns to S rows, clamps to [0, 255], mirrors and normalises into ``[N, C, S, S]``. Filter weights are
computed in the kernel (``center = (o + 0.5) * scale``, taps ``floor(center - support + 0.5) .. floor(center +
support + 0.5)`` clipped to the crop, ``support = radius * max(scale, 1)`` with the filter's radius (bicubic 2,
bilinear 1), weights normalised by their sum): PIL's ``precompute_coeffs``, which
``torch.nn.functional.interpolate(mode="bicubic" or "bilinear", antialias=True)`` follows too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._launch import jit_kernel

# columns of the per-image int64 metadata: offset into the packed source, its H and W, the crop's top, left, height,
# width, the offset of its pass-1 rows in the packed intermediate, whether to mirror it, and its tap counts along x
# (pass 1) and y (pass 2): each image loops over its own taps, not the batch's largest
META_COLS = tl.constexpr(11)


@triton.jit
def _filter(t, LINEAR: tl.constexpr):
    """The bicubic kernel with a = -0.5 (PIL's, and torch's antialiased one), or with ``LINEAR`` the triangle."""
    x = tl.abs(t)
    if LINEAR:
        return tl.maximum(1.0 - x, 0.0)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _window(o, in_size, S, LINEAR: tl.constexpr):
    """For output positions ``o`` (int32 vector) of a length-``in_size`` axis resized to ``S``: (first tap, end tap,
    centre, 1 / filter scale)."""
    scale = in_size.to(tl.float32) / S
    fscale = tl.maximum(scale, 1.0)
    if LINEAR:
        support = fscale
    else:
        support = 2.0 * fscale
    center = (o.to(tl.float32) + 0.5) * scale
    lo = tl.maximum(tl.floor(center - support + 0.5), 0.0).to(tl.int32)
    hi = tl.minimum(tl.floor(center + support + 0.5).to(tl.int32), in_size)
    return lo, hi, center, 1.0 / fscale


@jit_kernel
def _resize_rows_kernel(
    src_ptr,  # [sum C*H_n*W_n] uint8 (or fp32): the packed images, each [C, H_n, W_n]
    meta_ptr,  # [N, META_COLS] int64
    tmp_ptr,  # [sum C*h_n*S] fp32: each crop's rows resized to S columns, [C, h_n, S]
    S,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
    LINEAR: tl.constexpr,
):
    n = tl.program_id(0)
    meta = meta_ptr + n * META_COLS
    h = tl.load(meta + 5).to(tl.int32)
    if tl.program_id(1) * BLOCK_R >= C * h:
        return  # the grid covers the batch's tallest crop: nothing of this one's here
    src_off = tl.load(meta)
    H = tl.load(meta + 1).to(tl.int32)
    W = tl.load(meta + 2).to(tl.int32)
    top = tl.load(meta + 3).to(tl.int32)
    left = tl.load(meta + 4).to(tl.int32)
    w = tl.load(meta + 6).to(tl.int32)
    tmp_off = tl.load(meta + 7)
    taps = tl.load(meta + 9).to(tl.int32)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # over C * h: (channel, crop row), past it masked
    row_ok = rows < C * h
    c = rows // h
    r = rows % h
    xs = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = xs < S
    lo, hi, center, inv = _window(xs, w, S, LINEAR)
    # [BLOCK_R] offsets of each row's first crop pixel
    row_base = src_off + (c.to(tl.int64) * H + top + r) * W + left
    acc = tl.zeros((BLOCK_R, BLOCK_X), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_X,), dtype=tl.float32)
    for k in range(0, taps):
        xi = lo + k
        tap_ok = (xi < hi) & x_ok
        wk = tl.where(tap_ok, _filter((xi.to(tl.float32) - center + 0.5) * inv, LINEAR), 0.0)
        ptrs = src_ptr + row_base[:, None] + xi[None, :]
        v = tl.load(ptrs, mask=row_ok[:, None] & tap_ok[None, :], other=0).to(tl.float32)
        acc += v * wk[None, :]
        wsum += wk
    out = acc / tl.where(wsum == 0.0, 1.0, wsum)[None, :]
    out = tl.minimum(tl.maximum(out, 0.0), 255.0)  # as PIL's 8-bit intermediate is
    dst = tmp_ptr + tmp_off + rows.to(tl.int64)[:, None] * S + xs[None, :]
    tl.store(dst, out, mask=row_ok[:, None] & x_ok[None, :])


@jit_kernel
def _resize_cols_kernel(
    tmp_ptr,  # [sum C*h_n*S] fp32, from _resize_rows_kernel
    meta_ptr,  # [N, META_COLS] int64
    scale_ptr,  # [C] fp32: 1 / (255 * std_c)
    shift_ptr,  # [C] fp32: mean_c / std_c
    out_ptr,  # [N, C, S, S] fp32 (or bf16 / fp16)
    S,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
    LINEAR: tl.constexpr,
):
    n = tl.program_id(0)
    meta = meta_ptr + n * META_COLS
    h = tl.load(meta + 5).to(tl.int32)
    tmp_off = tl.load(meta + 7)
    flip = tl.load(meta + 8)
    taps = tl.load(meta + 10).to(tl.int32)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # over C * S: (channel, output row)
    row_ok = rows < C * S
    c = rows // S
    y = rows % S
    xs = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = xs < S
    lo, hi, center, inv = _window(y, h, S, LINEAR)
    acc = tl.zeros((BLOCK_R, BLOCK_X), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, taps):
        yi = lo + k
        tap_ok = (yi < hi) & row_ok
        wk = tl.where(tap_ok, _filter((yi.to(tl.float32) - center + 0.5) * inv, LINEAR), 0.0)
        src_row = tmp_off + (c.to(tl.int64) * h + yi) * S
        v = tl.load(tmp_ptr + src_row[:, None] + xs[None, :], mask=tap_ok[:, None] & x_ok[None, :], other=0.0)
        acc += v * wk[:, None]
        wsum += wk
    v = acc / tl.where(wsum == 0.0, 1.0, wsum)[:, None]
    v = tl.minimum(tl.maximum(v, 0.0), 255.0)
    a = tl.load(scale_ptr + c, mask=row_ok, other=0.0)
    b = tl.load(shift_ptr + c, mask=row_ok, other=0.0)
    v = v * a[:, None] - b[:, None]
    xo = tl.where(flip != 0, S - 1 - xs, xs)
    dst = out_ptr + (n.to(tl.int64) * C * S + rows)[:, None] * S + xo[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & x_ok[None, :])


_BLOCK_R, _BLOCK_X = 16, 64


def resized_crop_fwd(
    src: torch.Tensor,  # [sum C*H_n*W_n] packed images
    meta: torch.Tensor,  # [N, META_COLS] int64, on src's device
    tmp_numel: int,
    max_h: int,
    scale: torch.Tensor,  # [C] fp32
    shift: torch.Tensor,  # [C] fp32
    out: torch.Tensor,  # [N, C, S, S]
    linear: bool = False,  # the bilinear filter instead of the bicubic one
) -> torch.Tensor:
    n, c, s, _ = out.shape
    if n == 0:
        return out
    tmp = torch.empty(tmp_numel, dtype=torch.float32, device=src.device)
    grid = (n, triton.cdiv(c * max_h, _BLOCK_R), triton.cdiv(s, _BLOCK_X))
    _resize_rows_kernel[grid](src, meta, tmp, s, c, BLOCK_R=_BLOCK_R, BLOCK_X=_BLOCK_X, LINEAR=linear)
    grid = (n, triton.cdiv(c * s, _BLOCK_R), triton.cdiv(s, _BLOCK_X))
    _resize_cols_kernel[grid](tmp, meta, scale, shift, out, s, c, BLOCK_R=_BLOCK_R, BLOCK_X=_BLOCK_X,
                              LINEAR=linear)  # fmt: skip
    return out
