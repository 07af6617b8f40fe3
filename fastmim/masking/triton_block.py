"""Block-wise (BEiT) masks in one Triton launch: one program per sample runs the whole sequential block loop in
registers, all tries of a round at once.

It consumes the same counter-based random numbers (``fastmim.masking.rng``) in the same order and the same float64
arithmetic as ``BlockMask``'s batched PyTorch loop, so the two give the same masks (up to a last-ulp difference of
``exp`` between libraries that would move a block's rounded side, never seen in the tests). The PyTorch loop costs
about a hundred small kernel launches per round and ~16 rounds for a 14x14 grid; this is one launch plus the
top-up of samples whose blocks got stuck (done by the caller, as in the PyTorch loop).

Imported lazily: only for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastmim.masking.rng import _GOLDEN, _MUL, _scalar_key
from fastmim.ops.triton._launch import jit_kernel

MAX_TOKENS = 4096  # one program holds the sample's mask and all tries of a round: [ATTEMPTS, BLOCK] in registers


@triton.jit
def _hash32(x, MUL: tl.constexpr):
    """rng.hash32 on uint32: the int64 version's ``* MUL & 0xFFFFFFFF`` is uint32's wrap-around product."""
    mul = tl.full([], MUL, tl.uint32)
    x = ((x >> 16) ^ x) * mul
    x = ((x >> 16) ^ x) * mul
    return (x >> 16) ^ x


@triton.jit
def _uniform(k, pos, MUL: tl.constexpr, GOLDEN: tl.constexpr):
    """rng.uniform's value at positions ``pos`` (int32) for the stream key ``k`` (uint32), as float64."""
    p = pos.to(tl.uint32) * tl.full([], GOLDEN, tl.uint32)
    bits = _hash32(_hash32(k ^ p, MUL) ^ k, MUL)
    return (bits >> 8).to(tl.float64) * (1.0 / 16777216.0)


@triton.jit
def _round_half_even(x):
    """torch.round (ties to even) of float64 ``x`` >= 0, as int32."""
    f = tl.floor(x)
    d = x - f
    fi = f.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((fi % 2) == 1))
    return fi + up.to(tl.int32)


@jit_kernel
def _block_mask_kernel(
    keys_ptr,  # [B] int64 sample keys in [0, 2^32)
    streams_ptr,  # [N] int64: rng._scalar_key(round, 0x5EED), the stream constant of each round
    mask_ptr,  # [B, H*W] int8 out
    count_ptr,  # [B] int32 out: hidden tokens placed by blocks
    H,
    W,
    N,  # tokens to hide
    params_ptr,  # [3] float64: min_num_patches, log of the aspect range's ends (float64 like the PyTorch loop)
    AREA_MAX,  # largest block area
    ATTEMPTS,  # tries per block
    BLOCK: tl.constexpr,  # >= H*W, a power of two
    ABLOCK: tl.constexpr,  # >= ATTEMPTS, a power of two
    MUL: tl.constexpr,
    GOLDEN: tl.constexpr,
):
    pid = tl.program_id(0)
    MIN_AREA = tl.load(params_ptr)
    LOG_LO = tl.load(params_ptr + 1)
    LOG_HI = tl.load(params_ptr + 2)
    key = tl.load(keys_ptr + pid).to(tl.uint32)
    offs = tl.arange(0, BLOCK)
    yy = (offs // W)[None, :]
    xx = (offs % W)[None, :]
    tries = tl.arange(0, ABLOCK)
    live = tries < ATTEMPTS
    mask = tl.zeros([BLOCK], dtype=tl.int32)
    count = tl.program_id(0) * 0  # int32 scalar
    rnd = count
    going = count == 0
    while going:
        sk = _hash32(key ^ tl.load(streams_ptr + rnd).to(tl.uint32), MUL)  # rng.stream_keys(keys, rnd)
        budget = tl.minimum(N - count, AREA_MAX)
        # uniform(keys, 4 * ATTEMPTS, stream=rnd).view(4, ATTEMPTS): row j, try t at position j * ATTEMPTS + t
        u0 = _uniform(sk, tries, MUL, GOLDEN)
        u1 = _uniform(sk, tries + ATTEMPTS, MUL, GOLDEN)
        u2 = _uniform(sk, tries + 2 * ATTEMPTS, MUL, GOLDEN)
        u3 = _uniform(sk, tries + 3 * ATTEMPTS, MUL, GOLDEN)
        area = MIN_AREA + u0 * (budget.to(tl.float64) - MIN_AREA)
        aspect = tl.exp(LOG_LO + u1 * (LOG_HI - LOG_LO))
        bh = _round_half_even(tl.sqrt(area * aspect))
        bw = _round_half_even(tl.sqrt(area / aspect))
        ok = (bh >= 1) & (bw >= 1) & (bh < H) & (bw < W) & live
        top = tl.minimum((u2 * tl.maximum(H - bh + 1, 1).to(tl.float64)).to(tl.int32), tl.maximum(H - bh, 0))
        left = tl.minimum((u3 * tl.maximum(W - bw + 1, 1).to(tl.float64)).to(tl.int32), tl.maximum(W - bw, 0))
        t2, l2, h2, w2 = top[:, None], left[:, None], bh[:, None], bw[:, None]
        rect = (yy >= t2) & (yy < t2 + h2) & (xx >= l2) & (xx < l2 + w2)  # [ABLOCK, BLOCK]
        covered = tl.sum((rect & (mask[None, :] != 0)).to(tl.int32), axis=1)
        fresh = bh * bw - covered
        good = ok & (fresh > 0) & (fresh <= budget)
        first = tl.min(tl.where(good, tries, ABLOCK), axis=0)  # tries are sequential: the first good one counts
        took = first < ABLOCK
        pick = (tries == first)[:, None]
        mask = tl.where(tl.sum((rect & pick).to(tl.int32), axis=0) > 0, 1, mask)
        count += tl.sum(tl.where(tries == first, fresh, 0), axis=0)
        rnd += 1
        going = took & (count < N) & (rnd < N)
    hw = H * W
    tl.store(mask_ptr + pid.to(tl.int64) * hw + offs, mask.to(tl.int8), mask=offs < hw)
    tl.store(count_ptr + pid, count)


@functools.cache  # (made once: a tensor made on a GPU from host values is a blocking copy, a sync per call)
def _params(min_num_patches: float, aspect_lo: float, aspect_hi: float, device: torch.device) -> torch.Tensor:
    values = [min_num_patches, math.log(aspect_lo), math.log(aspect_hi)]
    return torch.tensor(values, dtype=torch.float64, device=device)


@functools.cache
def _streams(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([_scalar_key(r, 0x5EED) for r in range(max(n, 1))], dtype=torch.int64, device=device)


def block_mask_blocks(keys: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, H, W] bool, count [B] int64): the blocks ``BlockMask``'s PyTorch loop would place for ``keys``
    ([B] int64 on the launch device), before its exact-count top-up. ``cfg``: a ``BlockMaskConfig``."""
    h, w = cfg.height, cfg.width
    if h * w > MAX_TOKENS:
        raise ValueError(f"the Triton block mask takes grids of at most {MAX_TOKENS} tokens, got {h}x{w}")
    b = keys.shape[0]
    mask = torch.empty(b, h * w, dtype=torch.int8, device=keys.device)
    count = torch.empty(b, dtype=torch.int32, device=keys.device)
    if b == 0 or cfg.num_masked == 0:
        return mask.zero_().view(b, h, w).bool(), count.zero_().long()
    params = _params(float(cfg.min_num_patches), *cfg.aspect_range, keys.device)
    block = triton.next_power_of_2(h * w)
    ablock = triton.next_power_of_2(cfg.max_attempts)
    _block_mask_kernel[(b,)](
        keys.contiguous(), _streams(cfg.num_masked, keys.device), mask, count, h, w, cfg.num_masked, params,
        int(cfg.block_area_max), cfg.max_attempts,
        BLOCK=block, ABLOCK=ablock, MUL=_MUL, GOLDEN=_GOLDEN, num_warps=4 if block * ablock <= 4096 else 8,
    )  # fmt: skip
    return mask.view(b, h, w).bool(), count.long()
