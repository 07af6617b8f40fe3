"""low_pass_target (PixMIM's low-frequency target): the reference against a float64 NumPy implementation of the
official formula, every backend against the reference (even and odd sides, radii that keep nothing, a few bins or
everything, other channel counts and normalisations, low-precision and strided images, float64), bad inputs, the
custom op under torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmim.ops import low_pass_target, low_pass_target_ref
from fastmim.ops._dispatch import choose_backend
from fastmim.ops.low_pass import spectral_filters
from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD, low_pass_filter
from tests.ops.helpers import compile_backend

OP = "low_pass_target"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)


def _imgs(b, c, h, w, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).to(device, dtype)


def official_numpy(imgs: np.ndarray, radius: float, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """mmselfsup's LowFreqTargetGenerator, written again in float64 NumPy: un-normalise, fft2, fftshift, the circle
    (i - (h-1)/2)^2 + (j - (w-1)/2)^2 <= r^2 kept, ifft2 without ifftshift, abs, normalise."""
    m = np.array(mean).reshape(1, -1, 1, 1)
    s = np.array(std).reshape(1, -1, 1, 1)
    x = imgs * s + m
    spec = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    h, w = x.shape[-2:]
    keep = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            if (i - (h - 1) / 2) ** 2 + (j - (w - 1) / 2) ** 2 <= radius**2:
                keep[i, j] = 1.0
    return (np.abs(np.fft.ifft2(spec * keep)) - m) / s


@pytest.mark.parametrize(("h", "w", "radius"), [(32, 32, 5.7), (24, 18, 4.0), (17, 17, 3.0)])
def test_reference_matches_the_official_formula_in_float64(h, w, radius):
    imgs = _imgs(2, 3, h, w, seed=h)
    want = official_numpy(imgs.double().numpy(), radius)
    ref = low_pass_target_ref(imgs.double(), radius)
    assert ref.dtype == torch.float64 and ref.shape == imgs.shape
    np.testing.assert_allclose(ref.numpy(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(low_pass_target_ref(imgs, radius).numpy(), want, rtol=1e-5, atol=1e-5)


CASES = [
    ((2, 3, 32, 32), 5.7),  # even sides: the circle's centre half a bin off frequency 0
    ((2, 3, 37, 50), 9.0),  # odd and even
    ((3, 3, 33, 31), 5.0),  # odd sides: the circle centred on frequency 0
    ((1, 3, 16, 16), 100.0),  # every bin kept, Nyquist rows and columns included: the image itself
    ((1, 3, 16, 16), 0.8),  # the four bins around the centre
    ((1, 3, 16, 16), 0.0),  # nothing kept
    ((2, 3, 16, 15), 11.3),  # the rim crosses the Nyquist frequency of the rows
    ((2, 3, 64, 64), 40 * 64 / 224),  # PixMIM's radius scaled to 64 px
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, (*c[0], c[1]))))
def test_matches_reference(backend, case):
    device, name = backend
    shape, radius = case
    imgs = _imgs(*shape, device=device, seed=shape[2])
    out = low_pass_target(imgs, radius)
    ref = low_pass_target_ref(imgs.double(), radius)
    assert out.dtype == torch.float32 and out.shape == imgs.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"[{name}] {m}")
    f64 = low_pass_target(imgs.double(), radius)  # float64 images run the torch backend in float64
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64, ref, rtol=1e-12, atol=1e-12)


def test_other_channels_and_normalisations(backend):
    device, name = backend
    for c, mean, std in ((1, (0.5,), (0.25,)), (4, (0.1, 0.2, -0.3, 0.0), (1.0, 0.5, 2.0, 0.3))):
        imgs = _imgs(2, c, 24, 20, device=device, seed=c)
        want = official_numpy(imgs.double().cpu().numpy(), 4.5, mean, std)
        got = low_pass_target(imgs, 4.5, mean, std)
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=f"[{name}] C={c}")


def test_low_precision_and_strided_images(backend):
    """bf16 / fp16 images give the target of their (rounded) values in fp32; channels-last and sliced images are read
    through their strides."""
    device, name = backend
    imgs = _imgs(2, 3, 32, 32, device=device)
    for dt in (torch.bfloat16, torch.float16):
        lowp = imgs.to(dt)
        out = low_pass_target(lowp, 6.0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, low_pass_target_ref(lowp.float(), 6.0), rtol=1e-5, atol=1e-5)
    cl = imgs.to(memory_format=torch.channels_last)
    sliced = _imgs(2, 3, 32, 40, device=device)[..., 4:36]
    for x in (cl, sliced):
        assert not x.is_contiguous()
        torch.testing.assert_close(low_pass_target(x, 6.0), low_pass_target_ref(x.contiguous(), 6.0), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip


def test_filters_split_into_symmetric_and_antisymmetric_parts():
    """Ms + i(-i Ma) restricted to the kept columns is the official circle moved to FFT order (fftshift undone)."""
    for h, w, r in ((16, 16, 5.0), (15, 18, 4.2), (8, 8, 100.0)):
        filt, k = spectral_filters(h, w, r, torch.float64, "cpu")
        full = torch.fft.ifftshift(low_pass_filter(h, w, r).double(), dim=(-2, -1))  # [h, w] in FFT order
        m = filt[0] + 1j * filt[1]  # Ms + Ma
        torch.testing.assert_close(m.real, full[:, :k])
        assert float(m.imag.abs().max()) == 0.0
        assert not full[:, k : w - k + 1].any(), "a kept column beyond the first K would be lost"


def test_no_gradient_empty_batch_and_bad_inputs():
    imgs = _imgs(1, 3, 16, 16).requires_grad_()
    assert not low_pass_target(imgs, 3.0).requires_grad
    assert low_pass_target(_imgs(0, 3, 16, 16), 3.0).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        low_pass_target(_imgs(1, 3, 16, 16), -1.0)
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        low_pass_target(_imgs(1, 3, 16, 16), float("nan"))
    with pytest.raises(ValueError, match="mean must hold 3 finite values"):
        low_pass_target(_imgs(1, 3, 16, 16), 3.0, mean=(0.5,))
    for std in ((1.0, 0.0, 1.0), (-0.2, 0.2, 0.2)):  # a negative scale: the magnitude's sign would be lost
        with pytest.raises(ValueError, match=r"std must be > 0 \(a normalisation's scale\)"):
            low_pass_target(_imgs(1, 3, 16, 16), 3.0, std=std)
    with pytest.raises(ValueError, match="std must be a sequence of 3 floats, got 'abc'"):
        low_pass_target(_imgs(1, 3, 16, 16), 3.0, std="abc")
    # a radius past the corners keeps the whole spectrum (no overflow of radius^2), as one just past them
    x = _imgs(2, 3, 16, 12)
    whole = low_pass_target_ref(x, 20.0)
    for r in (1e300, 1e200):
        torch.testing.assert_close(low_pass_target(x, r), whole)
        torch.testing.assert_close(low_pass_target_ref(x, r), whole)
    with pytest.raises(ValueError, match=r"imgs must be \[B, C, H, W\]"):
        low_pass_target(torch.zeros(3, 16, 16), 3.0)
    with pytest.raises(TypeError, match="floating-point"):
        low_pass_target(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 3.0)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend(OP, torch.device("cpu"), (torch.float32,)) == "torch"


def test_opcheck_and_compile(backend):
    device, name = backend
    imgs = _imgs(2, 3, 32, 32, device=device)
    args = (imgs, 6.0, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.library.opcheck(torch.ops.fastmim.low_pass_target.default, args, test_utils=(
        "test_schema", "test_faketensor"))  # fmt: skip

    def target_loss(pred, imgs):
        return ((pred - low_pass_target(imgs, 6.0)) ** 2).mean()

    compiled = torch.compile(target_loss, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    pred = torch.randn(2, 3, 32, 32, device=device)
    torch.testing.assert_close(compiled(pred, imgs), target_loss(pred, imgs))
