"""Triton epilogue of ``low_pass_target``: ``out = sqrt(a^2 + b^2) - mean_c / std_c`` from the two real inverse
transforms ``[2, B, C, H, W]`` in one pass (torch: ``hypot`` then an in-place subtraction, two passes)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._launch import jit_kernel


@jit_kernel
def _magnitude_minus_kernel(
    ab_ptr,  # [2, N] fp32 contiguous: a, then b
    off_ptr,  # [C] fp32
    out_ptr,  # [N] fp32
    N,
    HW,
    C,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    a = tl.load(ab_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + N + offs, mask=valid, other=0.0).to(tl.float32)
    o = tl.load(off_ptr + (offs // HW) % C, mask=valid, other=0.0)
    tl.store(out_ptr + offs, tl.sqrt(a * a + b * b) - o, mask=valid)


_BLOCK = 1024


def magnitude_minus(ab: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """ab [2, B, C, H, W] fp32, off [C] fp32 -> [B, C, H, W] fp32."""
    _, b, c, h, w = ab.shape
    ab = ab.contiguous()
    out = torch.empty(ab.shape[1:], device=ab.device, dtype=torch.float32)
    n = b * c * h * w
    _magnitude_minus_kernel[(triton.cdiv(n, _BLOCK),)](ab, off.contiguous(), out, n, h * w, c, BLOCK=_BLOCK)
    return out
