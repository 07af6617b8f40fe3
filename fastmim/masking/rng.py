"""Counter-based random numbers for masks: every draw is a pure function of (seed, epoch, sample index, stream,
position), computed with integer tensor ops, so a mask is the same on any device, in any worker, rank or restart
(for the PyTorch and Triton implementations; the C++ generators have their own streams, also per sample).

``sample_keys(seed, epoch, indices)`` hashes the three into one 32-bit key per sample; ``uniform(keys, n, stream)``
turns a key into n floats in [0, 1) with 24 random bits each. The hash is the well-known xor-shift-multiply integer
mixer (constant 0x45d9f3b): all products stay below 2^60, so int64 tensor arithmetic never overflows and CPU and CUDA
give the same bits. Good for masks (uniform per position, independent streams); not for cryptography.

The readable references (``random.Random(key)``) and the C++ generators (xoshiro seeded from the key) consume the same
keys with their own streams: the three agree in distribution, each is deterministic.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B
_GOLDEN = 0x9E3779B1  # odd, below 2^32: position * _GOLDEN < 2^63 for positions below 2^31


def hash32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of values in [0, 2^32) -> mixed values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MUL & M32
    x = ((x >> 16) ^ x) * _MUL & M32
    return (x >> 16) ^ x


def hash32_int(x: int) -> int:
    """The same mixer on a Python int (taken modulo 2^32)."""
    x &= M32
    x = ((x >> 16) ^ x) * _MUL & M32
    x = ((x >> 16) ^ x) * _MUL & M32
    return (x >> 16) ^ x


def _scalar_key(*parts: int) -> int:
    k = 0x6A09E667
    for p in parts:
        p = int(p)
        k = hash32_int(k ^ hash32_int(p & M32) ^ hash32_int((p >> 32) & M32) * 3)
    return k


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's draws in one epoch (its augmentation's generator), a hash of the three: no
    sample of one epoch shares another epoch's seeds, however large the data set (an affine mix of them did past
    its multiplier)."""
    # (two chains over the parts in other orders: the second is no function of the first, so 63 bits are random)
    return ((_scalar_key(seed, epoch, index) << 31) ^ _scalar_key(0xA06, index, epoch, seed)) & (2**63 - 1)


def sample_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """[B] int64 keys in [0, 2^32), one per sample: a hash of (seed, epoch, index)."""
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sample indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"sample indices must be [B], got shape {tuple(indices.shape)}")
    idx = indices.long()
    if idx.device.type == "cpu" and idx.numel() and bool((idx < 0).any()):  # on CPU: no host sync
        raise ValueError("sample indices must be >= 0")
    k = _scalar_key(seed, epoch)
    return hash32(hash32((idx & M32) ^ k) ^ ((idx >> 32) & M32))


def stream_keys(keys: torch.Tensor, stream: int | list[int]) -> torch.Tensor:
    """Keys of an independent stream (a second draw for the same samples); a list of S streams: [B, S], column s
    ``stream_keys(keys, stream[s])``."""
    if not isinstance(stream, list):
        return hash32(keys ^ _scalar_key(stream, 0x5EED))
    consts = torch.tensor([_scalar_key(s, 0x5EED) for s in stream], dtype=torch.int64)  # (host keys: the sampler's)
    return hash32(keys[:, None] ^ consts.to(keys.device, non_blocking=True))


def uniform(keys: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """[B, n] float32 in [0, 1): n independent uniforms per sample key, for stream ``stream``."""
    k = stream_keys(keys, stream)[:, None]  # [B, 1]
    pos = torch.arange(n, device=keys.device, dtype=torch.int64)[None, :] * _GOLDEN & M32  # [1, n]
    bits = hash32(hash32(k ^ pos) ^ k)  # [B, n]
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def randint(keys: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int, n: int, stream: int = 0):
    """[B, n] int64 uniform on [low, high] (inclusive; ``low``/``high`` broadcast against [B, n])."""
    u = uniform(keys, n, stream).double()
    if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
        # host ints stay on the host: a tensor made from them on a GPU is a blocking copy (a sync) per call
        span = int(high) - int(low) + 1
        return low + (u * span).long().clamp_max(span - 1)
    span = high - low + 1  # (a tensor: the bounds' own, on the keys' device)
    return low + torch.minimum((u * span).long(), span - 1)
