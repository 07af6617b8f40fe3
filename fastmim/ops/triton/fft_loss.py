"""Triton kernels around ``fft_loss``'s FFTs: the batch reduction of A2MIM's mixed difference before the forward FFT,
and the broadcast of the [C, H, W] gradient back to the batch after the inverse FFT, each one pass over the images.

Forward: ``e[c, y, x] = mean_b((pred - target)[b, c, y, x] * w_b(y, x))`` with ``w = (1 + m) / 2`` from the token
mask read per pixel (no pixel mask is materialised), one program per block of [C, H, W] positions looping over the
batch in order (deterministic). Backward: ``dpred = g * m`` (``g`` without a mask) and ``dtarget = -g * w``, written
straight in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmim.ops.triton._common import cast_for_store
from fastmim.ops.triton._launch import jit_kernel


@triton.jit
def _pixel_mask(mask_ptr, b, offs, HW, W, GW, P, L, valid):
    """The token mask value (0 or 1, fp32) of each flat [C, H, W] position ``offs`` of sample ``b``."""
    yx = offs % HW
    tok = (yx // W) // P * GW + (yx % W) // P
    return tl.load(mask_ptr + b * L + tok, mask=valid, other=0.0).to(tl.float32)


@jit_kernel
def _fft_mix_mean_kernel(
    pred_ptr,  # [B, C, H, W] contiguous
    target_ptr,  # [B, C, H, W] contiguous
    mask_ptr,  # [B, L] fp32 (read if HAS_MASK)
    e_ptr,  # [C, H, W] fp32 out
    B,
    CHW,
    HW,
    W,
    GW,
    P,
    L,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < CHW
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p_ptrs = pred_ptr + offs  # advanced by one image per step (64-bit pointer arithmetic)
    t_ptrs = target_ptr + offs
    for b in range(B):
        d = tl.load(p_ptrs, mask=valid, other=0.0).to(tl.float32) - tl.load(t_ptrs, mask=valid, other=0.0).to(
            tl.float32
        )
        if HAS_MASK:
            d *= 0.5 * (1.0 + _pixel_mask(mask_ptr, b, offs, HW, W, GW, P, L, valid))
        acc += d
        p_ptrs += CHW
        t_ptrs += CHW
    tl.store(e_ptr + offs, acc / B, mask=valid)


@jit_kernel
def _fft_grad_kernel(
    g_ptr,  # [C, H, W] fp32: d loss / d x_hat, the same for every image
    mask_ptr,  # [B, L] fp32 (read if HAS_MASK)
    dpred_ptr,  # [B, C, H, W] out (written if NEED_PRED)
    dtarget_ptr,  # [B, C, H, W] out (written if NEED_TARGET)
    CHW,
    HW,
    W,
    GW,
    P,
    L,
    HAS_MASK: tl.constexpr,
    NEED_PRED: tl.constexpr,
    NEED_TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < CHW
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    dp = g
    dt = -g
    if HAS_MASK:
        m = _pixel_mask(mask_ptr, b, offs, HW, W, GW, P, L, valid)
        dp = g * m
        dt = -g * (0.5 * (1.0 + m))
    out = b.to(tl.int64) * CHW + offs
    if NEED_PRED:
        tl.store(dpred_ptr + out, cast_for_store(dp, dpred_ptr), mask=valid)
    if NEED_TARGET:
        tl.store(dtarget_ptr + out, cast_for_store(dt, dtarget_ptr), mask=valid)


_BLOCK = 1024


def mix_mean(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """-> e [C, H, W] fp32."""
    b, c, h, w = pred.shape
    pred, target = pred.contiguous(), target.contiguous()
    e = torch.empty((c, h, w), device=pred.device, dtype=torch.float32)
    m = mask.contiguous() if mask is not None else e
    chw = c * h * w
    _fft_mix_mean_kernel[(triton.cdiv(chw, _BLOCK),)](
        pred, target, m, e, b, chw, h * w, w, w // patch_size, patch_size, m.shape[-1] if mask is not None else 1,
        HAS_MASK=mask is not None, BLOCK=_BLOCK,
    )  # fmt: skip
    return e


def spread_grad(g: torch.Tensor, mask, shape, patch_size: int, pred_dtype, target_dtype, need_pred: bool,
                need_target: bool):  # fmt: skip
    """g [C, H, W] fp32 -> (dpred or None, dtarget or None), [B, C, H, W] each in its input's dtype."""
    b, c, h, w = shape
    chw = c * h * w
    dpred = torch.empty(shape, device=g.device, dtype=pred_dtype) if need_pred else None
    dtarget = torch.empty(shape, device=g.device, dtype=target_dtype) if need_target else None
    m = mask.contiguous() if mask is not None else g
    _fft_grad_kernel[(triton.cdiv(chw, _BLOCK), b)](
        g.contiguous(), m, dpred if need_pred else g, dtarget if need_target else g, chw, h * w, w, w // patch_size,
        patch_size, m.shape[-1] if mask is not None else 1, HAS_MASK=mask is not None, NEED_PRED=need_pred,
        NEED_TARGET=need_target, BLOCK=_BLOCK,
    )  # fmt: skip
    return dpred, dtarget
