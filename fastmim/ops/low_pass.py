"""PixMIM's low-frequency target with a third of the reference's FFT work and one pass after it.

``low_pass_target(imgs, radius, mean, std)`` equals ``low_pass_target_ref`` (mmselfsup's computation: un-normalise,
full complex ``fft2``, ``fftshift``, an ideal circle of ``radius``, ``ifft2``, ``abs``, normalise again) up to fp32
rounding. Three facts make it cheaper:

- **The circle is small.** Only columns with ``|frequency| <= radius + 1/2`` can pass, so after a real FFT along
  the rows (``rfft``: half the work of a complex one) the column FFT runs on those ``floor(radius + 1/2) + 1``
  columns only (41 of 113 at 224 px, r = 40), and the inverse row transform (``irfft(n=W)``) pads the others with
  zeros itself.
- **The image is real.** Its spectrum ``F`` is Hermitian. The filter ``M`` is centred half a bin off zero on even
  sides, so it is not symmetric: split it into ``Ms = (M(f) + M(-f)) / 2`` and ``Ma = (M(f) - M(-f)) / 2``. Then
  ``ifft2(F M) = a + i b`` with real ``a = irfft2(F Ms)`` and ``b = irfft2(-i F Ma)`` (both spectra Hermitian), so
  the complex inverse becomes two real inverses on the half spectrum, run as one batched call. ``fftshift`` only
  multiplies the result by a unit-modulus factor, which ``abs`` removes: no shift is ever materialised.
- **Normalisation is affine.** Un-normalising adds ``mean / std`` (times ``std``) to the image, that is
  ``(mean / std) * H * W`` to the DC coefficient of the spectrum; the result is then ``sqrt(a^2 + b^2) - mean / std``,
  with no un-normalise or normalise pass over the images.

Backends: "torch" (CPU, and float64 images under any backend): ``torch.hypot`` into the inverse's own buffer, then
one in-place subtraction; "triton" (CUDA): the ``sqrt(a^2 + b^2) - mean / std`` epilogue is one Triton pass
(``fastmim/ops/triton/low_pass.py``). The FFTs themselves run through ``torch.fft`` (pocketfft, cuFFT). A target:
no gradient. Registered as ``torch.library.custom_op`` (fake kernel), safe under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math

import torch

from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_float,
    check_shape,
    choose_backend,
    custom_op,
    is_finite_number,
    no_autocast,
    use_custom_op,
)
from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

_OP = "low_pass_target"


def _triton_low_pass():
    from fastmim.ops.triton import low_pass

    return low_pass


def _frequencies(n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(frequency of each FFT-order index, frequency of its negation's index, the filter centre's offset): for an
    even side ``fftshift`` puts frequency 0 at index n/2 while the circle's centre is (n - 1) / 2, half a bin off."""
    k = torch.arange(n)
    freq = torch.where(k < (n + 1) // 2, k, k - n).double()
    return freq, freq[(-k) % n], n // 2 - (n - 1) / 2


@functools.lru_cache(maxsize=32)
def spectral_filters(h: int, w: int, radius: float, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, int]:
    """([2, H, K] complex: ``Ms`` and ``-i Ma`` on the half spectrum's first K columns, K)."""
    kw = min(int(math.floor(radius + 0.5)) + 1, w // 2 + 1)
    fy, ny, oy = _frequencies(h)
    fx, nx, ox = _frequencies(w)
    fx, nx = fx[:kw], nx[:kw]
    r2 = min(float(radius), float(h + w)) ** 2  # past the corners: the whole spectrum (and no overflow)
    m = ((fy[:, None] + oy) ** 2 + (fx[None, :] + ox) ** 2 <= r2).double()
    m_neg = ((ny[:, None] + oy) ** 2 + (nx[None, :] + ox) ** 2 <= r2).double()
    sym, anti = (m + m_neg) / 2, (m - m_neg) / 2
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    filt = torch.stack([sym.to(cdt), anti.to(cdt) * -1j])
    return filt.to(device), kw


@functools.lru_cache(maxsize=32)
def _offsets(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """mean / std per channel, [C] (computed in float64)."""
    return (torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)).to(device, dtype)


def _fwd(imgs: torch.Tensor, radius: float, mean: list[float], std: list[float]) -> torch.Tensor:
    b, c, h, w = imgs.shape
    dt = torch.promote_types(imgs.dtype, torch.float32)
    if imgs.numel() == 0:
        return imgs.new_empty(imgs.shape, dtype=dt)
    dev = str(imgs.device)
    filt, kw = spectral_filters(h, w, float(radius), dt, dev)
    off = _offsets(tuple(mean), tuple(std), dt, dev)
    with no_autocast(imgs.device):
        spec = torch.fft.rfft(imgs.to(dt), dim=-1)[..., :kw]
        spec = torch.fft.fft(spec, dim=-2)  # [B, C, H, K]: the columns the circle can reach
        spec[:, :, 0, 0] += off * (h * w)  # un-normalising adds mean / std to every pixel (before the filter)
        z = spec.unsqueeze(0) * filt[:, None, None]  # [2, B, C, H, K]: F Ms and -i F Ma
        ab = torch.fft.irfft(torch.fft.ifft(z, dim=-2), n=w, dim=-1)  # [2, B, C, H, W]: a and b
    if dt == torch.float32 and choose_backend(_OP, imgs.device, (imgs.dtype,)) == "triton":  # float64: torch
        return _triton_low_pass().magnitude_minus(ab, off)
    out = torch.hypot(ab[0], ab[1], out=ab[0])
    return out.sub_(off.view(-1, 1, 1))


def _raw_check(imgs: torch.Tensor, radius: float, mean: list[float], std: list[float]) -> None:
    """The raw op's arguments: imgs [B, C, H, W] and C values in each of mean and std (the Triton epilogue reads one
    offset per channel)."""
    check_shape(_OP, "imgs", imgs, (None, None, None, None))
    c = imgs.shape[1]
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != c:
            raise ValueError(f"{_OP}: {name} has {len(v)} values, expected one per channel ({c})")


_low_pass_op = custom_op("fastmim::low_pass_target", _fwd, _raw_check)


@_low_pass_op.register_fake
def _(imgs, radius, mean, std):
    return imgs.new_empty(imgs.shape, dtype=torch.promote_types(imgs.dtype, torch.float32))


def _channel_values(name: str, v, c: int) -> list[float]:
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        raise ValueError(f"{_OP}: {name} must be a sequence of {c} floats, got {v!r}") from None
    if len(vals) != c or not all(is_finite_number(x) for x in vals):
        raise ValueError(f"{_OP}: {name} must hold {c} finite values (one per channel), got {v!r}")
    return vals


def low_pass_target(
    imgs: torch.Tensor,
    radius: float,
    mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    std: tuple[float, ...] | list[float] = IMAGENET_STD,
) -> torch.Tensor:
    """PixMIM's low-frequency images (see ``low_pass_target_ref`` for the formula).

    Args:
        imgs: [B, C, H, W] images normalised with ``mean`` / ``std`` (any float dtype; computed in fp32, or float64
            for float64 images).
        radius: radius of the ideal circular filter in the shifted spectrum, >= 0 (PixMIM: 40 at 224 px).
        mean, std: the per-channel normalisation the images carry (ImageNet's by default); std > 0.
    Returns: [B, C, H, W] fp32 (float64 for float64 images), normalised like the input; no gradient.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.low_pass_target_ref(imgs.detach(), radius, mean, std)
    if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
        raise ValueError(f"{_OP}: imgs must be [B, C, H, W], got {getattr(imgs, 'shape', type(imgs).__name__)}")
    check_float(_OP, "imgs", imgs)
    if not (is_finite_number(radius) and radius >= 0):
        raise ValueError(f"{_OP}: radius must be a finite number >= 0, got {radius!r}")
    c = imgs.shape[1]
    mean, std = _channel_values("mean", mean, c), _channel_values("std", std, c)
    if any(s <= 0 for s in std):
        raise ValueError(f"{_OP}: std must be > 0 (a normalisation's scale), got {std}")
    imgs = imgs.detach()
    if use_custom_op():
        return _low_pass_op(imgs, float(radius), mean, std)
    return _fwd(imgs, float(radius), mean, std)
