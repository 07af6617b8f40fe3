"""hog_target (MaskFeat's HOG target for the masked patches): the reference against a float64 NumPy implementation of
the official formula, every backend against the reference (masked rows equal, the others zero and not computed;
Gaussian window; other cell, patch and bin counts; non-square and strided images; low-precision input), bad inputs,
the custom op under torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastmim.ops import hog_target, hog_target_ref
from fastmim.ops._dispatch import choose_backend
from tests.ops.helpers import compile_backend

OP = "hog_target"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)


def _imgs(b, c, h, w, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).to(device, dtype)


def _numpy_hog(imgs: np.ndarray, patch: int, cell: int, nbins: int, window: int) -> np.ndarray:
    """SlowFast's HOGLayerC / mmpretrain's HOGGenerator, written out in float64 with loops over cells."""
    b, c, h, w = imgs.shape
    x = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    kx = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    ky = kx.T
    gx = sum(kx[i, j] * x[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3))
    gy = sum(ky[i, j] * x[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3))
    mag = np.sqrt(gx**2 + gy**2)
    if window:
        n = np.arange(window) - (window - 1) / 2
        g1 = np.exp(-0.5 * (n / (window // 2)) ** 2)
        g2 = np.outer(g1, g1)
        mag = mag * np.tile(g2 / g2.sum(), (h // window, w // window))
    bins = np.mod(np.floor(np.arctan2(gx, gy) / math.pi * nbins).astype(np.int64), nbins)
    hc, wc = h // cell, w // cell
    hist = np.zeros((b, c, nbins, hc, wc))
    for i in range(hc):
        for j in range(wc):
            sl = (slice(None), slice(None), slice(i * cell, (i + 1) * cell), slice(j * cell, (j + 1) * cell))
            for k in range(nbins):
                hist[:, :, k, i, j] = np.where(bins[sl] == k, mag[sl], 0.0).sum(axis=(2, 3))
    hist /= np.maximum(np.sqrt((hist**2).sum(axis=2, keepdims=True)), 1e-12)
    k = patch // cell
    gh, gw = h // patch, w // patch
    out = hist.reshape(b, c * nbins, gh, k, gw, k).transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C*bins, K, K]
    return out.reshape(b, gh * gw, -1)


@pytest.mark.parametrize(
    "shape, patch, cell, nbins, window",
    [((2, 3, 32, 32), 16, 8, 9, 0), ((1, 3, 32, 48), 16, 8, 9, 16), ((2, 1, 16, 24), 8, 4, 6, 8)],
)
def test_reference_matches_the_official_formula_in_float64(shape, patch, cell, nbins, window):
    """In float64 (the reference computes in the images' precision, at least fp32), then in fp32 with MaskFeat's odd
    bin count, whose boundaries no border gradient sits on."""
    imgs = _imgs(*shape)
    want = _numpy_hog(imgs.double().numpy(), patch, cell, nbins, window)
    ref = hog_target_ref(imgs.double(), patch, cell, nbins, window)
    assert ref.dtype == torch.float64 and ref.shape == want.shape
    assert ref.shape[-1] == shape[1] * nbins * (patch // cell) ** 2
    np.testing.assert_allclose(ref.numpy(), want, rtol=1e-10, atol=1e-12)
    if nbins % 2:
        np.testing.assert_allclose(hog_target_ref(imgs, patch, cell, nbins, window).numpy(), want, rtol=1e-5, atol=1e-6)


CASES = [
    ((2, 3, 32, 32), 16, 8, 9, 0),  # MaskFeat's layout: 108 values per patch
    ((1, 3, 48, 32), 16, 8, 9, 16),  # non-square, mmpretrain's Gaussian window
    ((2, 2, 24, 16), 8, 4, 6, 0),  # other channels, cells, bins
    ((1, 3, 16, 16), 16, 16, 9, 0),  # one cell per patch, one patch
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, (*c[0], *c[1:]))))
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "all"])
def test_matches_reference(backend, case, masked):
    device, name = backend
    shape, patch, cell, nbins, window = case
    imgs = _imgs(*shape, device=device)
    b, n = shape[0], (shape[2] // patch) * (shape[3] // patch)
    mask = (torch.rand(b, n, generator=torch.Generator().manual_seed(3)) < 0.5).to(device) if masked else None
    if mask is not None:
        mask[0, 0] = True  # at least one masked patch
    out = hog_target(imgs, mask, patch, cell, nbins, window)
    ref = hog_target_ref(imgs.double(), patch, cell, nbins, window).float()  # exact bins at exact boundaries
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rows = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=device)
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-5, atol=1e-6, msg=lambda m: f"[{name}] {m}")
    assert not out[~rows].any()  # unmasked patches: never computed, zero


def test_low_precision_and_strided_images(backend):
    """bf16 images give the HOG of their (rounded) values in fp32; a channels-last image is read through strides."""
    device, name = backend
    imgs = _imgs(2, 3, 32, 32, device=device)
    lowp = imgs.bfloat16()
    torch.testing.assert_close(hog_target(lowp), hog_target_ref(lowp.double()).float(), rtol=1e-5, atol=1e-6)
    cl = imgs.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    torch.testing.assert_close(hog_target(cl), hog_target_ref(imgs.double()).float(), rtol=1e-5, atol=1e-6)


def test_a_nan_pixel_makes_its_cells_nan(backend):
    """As the reference: every bin of a cell whose block sum is NaN is NaN (Triton's max(norm, eps) turned the NaN
    norm into eps and wrote the other bins times 1e12)."""
    device, name = backend
    imgs = _imgs(1, 1, 16, 16, device=device)
    imgs[0, 0, 5, 5] = float("nan")
    want, got = hog_target_ref(imgs.double()).float(), hog_target(imgs)
    assert torch.equal(want.isnan(), got.isnan()), name
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-6)


def test_no_gradient_and_bad_inputs():
    imgs = _imgs(1, 3, 32, 32).requires_grad_()
    assert not hog_target(imgs).requires_grad
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by the patch size 16"):
        hog_target(_imgs(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"channels-last \[B, H, W, C\], pass imgs.permute\(0, 3, 1, 2\)"):
        hog_target(_imgs(1, 3, 32, 32).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="not a multiple of cell_size"):
        hog_target(_imgs(1, 3, 32, 32), patch_size=16, cell_size=6)
    with pytest.raises(ValueError, match=r"mask must be \[B, L\] = \[1, 4\]"):
        hog_target(_imgs(1, 3, 32, 32), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="gaussian_window 12 must divide"):
        hog_target(_imgs(1, 3, 32, 32), gaussian_window=12)
    with pytest.raises(ValueError, match="nbins must be at most 16"):
        hog_target(_imgs(1, 3, 32, 32), nbins=17)
    with pytest.raises(TypeError, match="floating-point"):
        hog_target(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend(OP, torch.device("cpu"), (torch.float32,)) == "torch"


def test_opcheck_and_compile(backend):
    device, name = backend
    imgs = _imgs(2, 3, 32, 32, device=device)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]], device=device)
    torch.library.opcheck(torch.ops.fastmim.hog_target.default, (imgs, mask, 16, 8, 9, 0), test_utils=(
        "test_schema", "test_faketensor"))  # fmt: skip

    def target_loss(pred, imgs, mask):
        return ((pred - hog_target(imgs, mask)) ** 2).mean(-1)[mask].mean()

    compiled = torch.compile(target_loss, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    pred = torch.randn(2, 4, 108, device=device)
    torch.testing.assert_close(compiled(pred, imgs, mask), target_loss(pred, imgs, mask))
