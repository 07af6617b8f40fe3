"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def cast_for_store(v, ptr):
    """fp32 ``v`` -> the element type of ``ptr``, rounding to nearest even.

    On a GPU ``.to(tl.bfloat16)`` already rounds to nearest even; Triton's interpreter truncates instead, so bf16 is
    rounded here by hand (NaN kept) and both give PyTorch's result bit for bit.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        v = v.to(tl.float32)
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v == v, r.to(tl.float32, bitcast=True), v)
    return v.to(ptr.dtype.element_ty)


@functools.cache
def _cuda_programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def split_blocks(n: int, block: int, wanted: int) -> tuple[int, int]:
    """(parts, size): ``n`` rows (or channels) split into about ``wanted`` parts, at least one and at most one per
    block, each a whole number of ``block``-sized blocks and all full but the last; parts = cdiv(n, size), 0 when n
    is 0. How a reduction's rows are dealt out to programs that each write one row of partial sums."""
    blocks = triton.cdiv(n, block)
    parts = max(1, min(wanted, blocks))
    size = max(1, triton.cdiv(blocks, parts)) * block
    return triton.cdiv(n, size), size


def target_programs(device: torch.device) -> int:
    """How many programs a launch that splits a reduction should aim for: about 4 per SM on a GPU; few in the
    (sequential) interpreter."""
    if device.type == "cuda":
        return _cuda_programs(device.index if device.index is not None else torch.cuda.current_device())
    return 2
