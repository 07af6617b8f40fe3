"""fft_loss (A2MIM's focal frequency loss, one FFT per batch): values and gradients against the official computation
(``fft_loss_ref``: each image's FFT, batch-averaged spectra), with and without A2MIM's mixed replacement of the
visible pixels, low-precision inputs, float64, the all-equal case (weights 0 / 0 -> 0), bad inputs, opcheck and
torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastmim.ops import fft_loss, fft_loss_ref
from tests.ops.helpers import compile_backend

OP = "fft_loss"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)


def _pair(b, c, h, w, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, c, h, w, generator=g).to(device, dtype).requires_grad_()
    target = torch.randn(b, c, h, w, generator=g).to(device, dtype).requires_grad_()
    return pred, target


def _mask(b, n, device, seed=1):
    return (torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.6).float().to(device)


def official_numpy(pred, target, mask, p):
    """A2MIM's frequency loss in float64 NumPy, written from openmixup's A2MIMHead + FocalFrequencyLoss(alpha=1,
    ave_spectrum, log_matrix, batch_matrix): visible pixels mixed as 0.5 pred + 0.5 target (pred's part detached),
    orthonormal 2-D FFT per image and channel, spectra averaged over the batch, d2 = |dF|^2, w = log(1 + |dF|)
    over its global maximum (NaN -> 0, clamped, no gradient), loss = mean(w d2). Returns (loss, dloss/dpred): the
    gradient by hand (F unitary: dL/dx = Re(F^H g) with g = dL/dRe + i dL/dIm)."""
    import numpy as np

    b, c, h, w = pred.shape
    m = np.ones((b, 1, h, w)) if mask is None else np.kron(mask.reshape(b, 1, h // p, w // p), np.ones((1, 1, p, p)))
    mixed = pred * m + (0.5 * pred + 0.5 * target) * (1 - m)
    fp = np.fft.fft2(mixed, norm="ortho").mean(0)  # [C, H, W] complex
    ft = np.fft.fft2(target, norm="ortho").mean(0)
    diff = fp - ft
    d2 = diff.real**2 + diff.imag**2
    wgt = np.log1p(np.sqrt(d2))
    wgt = np.clip(np.nan_to_num(wgt / wgt.max(), nan=0.0), 0.0, 1.0)
    loss = (wgt * d2).mean()
    g = 2 * wgt * diff / d2.size  # dL/dRe + i dL/dIm of the batch-mean spectrum
    grad_mixed = np.fft.ifft2(np.broadcast_to(g, (b, c, h, w)), norm="ortho").real / b
    return loss, grad_mixed * m  # the visible pixels' pred part is detached


@pytest.mark.parametrize("shape, p", [((3, 3, 32, 32), 16), ((2, 1, 24, 40), 8)])
@pytest.mark.parametrize("masked", [True, False], ids=["mixed", "plain"])
def test_matches_the_official_formula_in_float64_numpy(shape, p, masked):
    b, c, h, w = shape
    pred, target = _pair(b, c, h, w, "cpu", torch.float64)
    mask = _mask(b, (h // p) * (w // p), "cpu").double() if masked else None
    loss = fft_loss(pred, target, mask, p if masked else None)
    (grad,) = torch.autograd.grad(loss, pred)
    want, want_grad = official_numpy(pred.detach().numpy(), target.detach().numpy(),
                                     None if mask is None else mask.numpy(), p)  # fmt: skip
    # the op computes in fp32 (as the official code, which calls .float()): fp32 rounding against float64
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    torch.testing.assert_close(grad, torch.from_numpy(want_grad), rtol=1e-5, atol=1e-5 * abs(want_grad).max())


def _check(pred, target, mask, p, rtol=1e-5):
    loss = fft_loss(pred, target, mask, p)
    grads = torch.autograd.grad(loss, (pred, target))
    ref = fft_loss_ref(pred, target, mask, p)
    ref_grads = torch.autograd.grad(ref, (pred, target))
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=1e-7)
    for a, r in zip(grads, ref_grads, strict=True):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=rtol, atol=rtol * r.abs().max().item())


@pytest.mark.parametrize("shape, p", [((4, 3, 32, 32), 16), ((2, 1, 24, 40), 8), ((1, 3, 16, 16), 16)])
@pytest.mark.parametrize("masked", [True, False], ids=["mixed", "plain"])
def test_matches_the_official_computation(backend, shape, p, masked):
    device, _ = backend
    pred, target = _pair(*shape, device)
    n = (shape[2] // p) * (shape[3] // p)
    _check(pred, target, _mask(shape[0], n, device) if masked else None, p if masked else None)


def test_low_precision_float64_and_equal_images(backend):
    device, name = backend
    pred, target = _pair(2, 3, 32, 32, device, torch.bfloat16)
    _check(pred, target, _mask(2, 4, device), 16, rtol=1e-2)  # fp32 from the same bf16 values; bf16 gradients
    pred, target = _pair(2, 3, 32, 32, device, torch.float64 if name == "torch" else torch.float32)
    _check(pred, target, None, None)
    same = pred.detach().clone().requires_grad_()
    loss = fft_loss(same, same.detach())
    assert loss.item() == 0.0 and fft_loss_ref(same, same.detach()).item() == 0.0
    (g,) = torch.autograd.grad(loss, same)
    assert torch.isfinite(g).all() and not g.any()


def test_only_masked_pixels_of_the_prediction_get_a_gradient():
    pred, target = _pair(2, 3, 32, 32, "cpu")
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    (g,) = torch.autograd.grad(fft_loss(pred, target, mask, 16), pred)
    assert g[0, :, :16, :16].any() and g[0, :, 16:, 16:].any()  # masked tokens 0 and 3
    assert not g[0, :, :16, 16:].any() and not g[1].any()  # visible: the mixed-in pred.detach()


def test_bad_inputs():
    pred, target = _pair(2, 3, 32, 32, "cpu")
    with pytest.raises(ValueError, match="target has shape"):
        fft_loss(pred, target[:, :2])
    with pytest.raises(ValueError, match="a mask needs patch_size"):
        fft_loss(pred, target, _mask(2, 4, "cpu"))
    with pytest.raises(ValueError, match=r"mask must be \[B, L\] = \[2, 4\]"):
        fft_loss(pred, target, _mask(2, 5, "cpu"), 16)
    with pytest.raises(ValueError, match="image size 32x32 is not divisible by the patch size 12"):
        fft_loss(pred, target, _mask(2, 4, "cpu"), 12)
    cl = pred.permute(0, 2, 3, 1)  # channels-last [B, H, W, C]
    with pytest.raises(ValueError, match=r"channels-last \[B, H, W, C\], pass pred.permute\(0, 3, 1, 2\)"):
        fft_loss(cl, target.permute(0, 2, 3, 1), _mask(2, 4, "cpu"), 16)
    with pytest.raises(ValueError, match="must be \\[B, C, H, W\\]"):
        fft_loss(pred[0], target[0])
    for shape in ((2, 0, 4, 4), (2, 3, 0, 4)):  # (torch.fft's own errors name neither the op nor the dimension)
        with pytest.raises(ValueError, match=r"no pixels to transform: C, H, W = \d, \d, 4"):
            fft_loss(torch.zeros(shape), torch.zeros(shape))


def test_opcheck_and_compile(backend):
    device, name = backend
    pred, target = _pair(2, 3, 16, 16, device)
    mask = _mask(2, 4, device)
    torch.library.opcheck(torch.ops.fastmim.fft_loss.default, (pred, target, mask, 8))
    loss, weighted = torch.ops.fastmim.fft_loss(pred.detach(), target.detach(), mask, 8)
    f32 = torch.float32
    for m, need in ((mask, (True, True)), (None, (True, False)), (mask, (False, True))):
        args = (torch.ones((), device=device), weighted, m, [2, 3, 16, 16], 8, f32, f32, *need)
        torch.library.opcheck(torch.ops.fastmim.fft_loss_backward.default, args)

    def a2mim_loss(pred, target, mask):
        return (pred - target).abs().mean() + 0.1 * fft_loss(pred, target, mask, 8)

    compiled = torch.compile(a2mim_loss, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    got = torch.autograd.grad(compiled(pred, target, mask), (pred,))
    want = torch.autograd.grad(a2mim_loss(pred, target, mask), (pred,))
    torch.testing.assert_close(got, want)
