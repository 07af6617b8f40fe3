"""patch_fft_loss (the patch-based focal frequency loss on masked patches): the reference against a float64 NumPy
implementation of the official focal frequency loss, every backend against the reference in values and gradients
(odd patch sizes, alpha, plain weights, fractional mask weights, bf16 predictions, strided images), unmasked patches
never read, bad inputs, the custom op under torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmim.ops import patch_fft_loss, patch_fft_loss_ref, patchify_ref
from fastmim.ops._dispatch import choose_backend
from fastmim.ops.patch_fft_loss import half_dft
from tests.ops.helpers import check_against_reference, compile_backend

OP = "patch_fft_loss"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)


def _inputs(b, c, h, w, p, device="cpu", dtype=torch.float32, ratio=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (h // p) * (w // p)
    imgs = torch.randn(b, c, h, w, generator=g)
    pred = patchify_ref(imgs, p) + 0.5 * torch.randn(b, n, p * p * c, generator=g)  # a prediction near the target
    mask = (torch.rand(b, n, generator=g) < ratio).float()
    mask[0, 0] = 1.0
    return pred.to(device, dtype).requires_grad_(), imgs.to(device), mask.to(device)


def official_numpy(pred_img, img, patch_factor, alpha=1.0, log_matrix=True):
    """The official FocalFrequencyLoss (EndlessSora/focal-frequency-loss) with ``patch_factor``, ``ave_spectrum`` and
    ``batch_matrix`` off, in float64 NumPy: patches stacked row-major, orthonormal 2-D FFTs, weights
    ``|dF|^alpha`` (log(1 + .)) over each (image, patch, channel) spectrum's maximum, mean of ``w * |dF|^2``."""

    def to_freq(x):
        b, c, h, w = x.shape
        ph, pw = h // patch_factor, w // patch_factor
        patches = [x[:, :, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw] for i in range(patch_factor)
                   for j in range(patch_factor)]  # fmt: skip
        return np.fft.fft2(np.stack(patches, 1), norm="ortho")  # [B, P, C, ph, pw]

    diff = to_freq(pred_img) - to_freq(img)
    d2 = diff.real**2 + diff.imag**2
    m = np.sqrt(d2) ** alpha
    if log_matrix:
        m = np.log(m + 1.0)
    with np.errstate(invalid="ignore"):
        m = m / m.max(axis=(-2, -1), keepdims=True)
    m = np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0)
    return np.mean(m * d2)


@pytest.mark.parametrize(("p", "alpha", "log"), [(8, 1.0, True), (4, 2.0, False), (8, 0.5, True)])
def test_reference_is_the_official_loss_over_every_patch(p, alpha, log):
    pred, imgs, _ = _inputs(2, 3, 32, 32, p, dtype=torch.float64)
    all_masked = torch.ones(2, (32 // p) ** 2, dtype=torch.float64)
    got = patch_fft_loss_ref(pred, imgs.double(), all_masked, p, alpha, log)
    pred_img = pred.detach().reshape(2, 32 // p, 32 // p, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 32, 32)
    want = official_numpy(pred_img.numpy(), imgs.double().numpy(), 32 // p, alpha, log)
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)


def test_reference_weights_masked_patches_like_the_masked_mse_loss():
    """sum(mask * patch_loss) / sum(mask): each patch's loss is the official loss of that patch alone."""
    p = 8
    pred, imgs, mask = _inputs(1, 3, 16, 24, p, dtype=torch.float64, ratio=0.5)
    mask[0, 1] = 0.25
    patch_losses = []
    for tok in range(6):
        one = torch.zeros_like(mask)
        one[0, tok] = 1.0
        patch_losses.append(patch_fft_loss_ref(pred, imgs.double(), one, p).item())
    want = (mask[0].numpy() * np.array(patch_losses)).sum() / mask.sum().item()
    np.testing.assert_allclose(patch_fft_loss_ref(pred, imgs.double(), mask, p).item(), want, rtol=1e-12)


CASES = [
    ((2, 3, 32, 32), 16, 1.0, True),  # MAE / A2MIM-sized patches: the half spectrum in several chunks
    ((2, 3, 24, 40), 8, 1.0, False),  # non-square image, plain weights
    ((3, 2, 15, 10), 5, 0.7, True),  # odd patch side (no Nyquist column), other channel count, alpha
    ((1, 1, 8, 8), 2, 2.0, True),  # tiny patches: the matrices padded to tl.dot's minimum
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, (*c[0], *c[1:]))))
def test_matches_reference(backend, case):
    device, name = backend
    shape, p, alpha, log = case
    pred, imgs, mask = _inputs(*shape, p, device=device)
    mask[-1, -1] = 0.5  # a fractional weight
    check_against_reference(lambda x: patch_fft_loss(x, imgs, mask, p, alpha, log),
                            lambda x: patch_fft_loss_ref(x, imgs, mask, p, alpha, log), [pred],
                            f"[{name}] {case}")  # fmt: skip


def test_low_precision_prediction_and_strided_images(backend):
    device, name = backend
    pred, imgs, mask = _inputs(2, 3, 32, 32, 16, device=device)
    lowp = pred.detach().bfloat16().requires_grad_()
    check_against_reference(lambda x: patch_fft_loss(x, imgs, mask, 16),
                            lambda x: patch_fft_loss_ref(x, imgs, mask, 16), [lowp], f"[{name}] bf16")  # fmt: skip
    cl = imgs.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    torch.testing.assert_close(patch_fft_loss(pred, cl, mask, 16), patch_fft_loss_ref(pred, imgs, mask, 16))


def test_unmasked_patches_are_never_read(backend):
    """NaN in an unmasked patch (prediction or image) does not reach the loss or the gradient; its gradient is 0."""
    device, name = backend
    pred, imgs, mask = _inputs(2, 3, 32, 32, 16, device=device, ratio=0.5)
    mask[1, 3] = 0.0
    clean = patch_fft_loss(pred, imgs, mask, 16)
    (grad,) = torch.autograd.grad(clean, pred)
    bad_pred = pred.detach().clone()
    bad_pred[1, 3] = float("nan")
    bad_imgs = imgs.clone()
    bad_imgs[1, :, 16:, 16:] = float("nan")
    bad_pred.requires_grad_()
    loss = patch_fft_loss(bad_pred, bad_imgs, mask, 16)
    (bad_grad,) = torch.autograd.grad(loss, bad_pred)
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(bad_grad, grad)
    assert not grad[mask == 0].any()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_counted_patch_gives_a_nan_loss(backend, value):
    """As the reference: NaN, not a finite loss over NaN gradients (the zero-spectrum guard hid a NaN spectrum, whose
    maximum is NaN, and Triton's max drops NaNs), so that a finite-loss check stops the run."""
    device, name = backend
    pred, imgs, mask = _inputs(2, 3, 32, 32, 16, device=device, ratio=0.5)
    rows = mask.nonzero()
    bad = pred.detach().clone()
    bad[rows[0, 0], rows[0, 1], 5] = value
    assert patch_fft_loss_ref(bad, imgs, mask, 16).isnan()
    bad.requires_grad_()
    loss = patch_fft_loss(bad, imgs, mask, 16)
    assert loss.isnan(), f"[{name}] {value}: loss {loss.item()}"


def test_half_dft_is_the_orthonormal_dft():
    """Kr + i Ki equals torch.fft.fft2(norm='ortho') on the kept half; mult counts each column's conjugate."""
    for p in (2, 5, 8):
        kr, ki, mult = half_dft(p, torch.float64, "cpu")
        e = torch.randn(3, p * p, dtype=torch.float64)
        f = torch.fft.fft2(e.view(3, p, p), norm="ortho")[..., : p // 2 + 1].reshape(3, -1)
        torch.testing.assert_close(e @ kr + 1j * (e @ ki), f)
        d2_full = torch.fft.fft2(e.view(3, p, p), norm="ortho").abs().square().sum(dim=(1, 2))
        torch.testing.assert_close(f.abs().square() @ mult, d2_full)


def test_bad_inputs():
    pred, imgs, mask = _inputs(1, 3, 32, 32, 16)
    with pytest.raises(ValueError, match=r"pred has shape \(1, 4, 700\), expected \(1, 4, 768\)"):
        patch_fft_loss(torch.zeros(1, 4, 700), imgs, mask, 16)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        patch_fft_loss(pred, torch.zeros(1, 3, 30, 32), mask, 16)
    with pytest.raises(ValueError, match=r"mask must be \[B, L\] = \[1, 4\]"):
        patch_fft_loss(pred, imgs, torch.ones(1, 5), 16)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        patch_fft_loss(pred, imgs, mask, 16, alpha=0.0)
    with pytest.raises(ValueError, match="mask has no masked patch"):
        patch_fft_loss(pred, imgs, torch.zeros(1, 4), 16)
    with pytest.raises(ValueError, match="imgs requires grad"):
        patch_fft_loss(pred, imgs.clone().requires_grad_(), mask, 16)
    with pytest.raises(TypeError, match="floating-point"):
        patch_fft_loss(pred, imgs.to(torch.uint8), mask, 16)
    with pytest.raises(ValueError, match="imgs have no pixels to transform: C, H, W = 0, 32, 32"):  # (Triton: NaN)
        patch_fft_loss(torch.zeros(1, 4, 0), torch.zeros(1, 0, 32, 32), mask, 16)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend(OP, torch.device("cpu"), (torch.float32, torch.float32)) == "torch"


def test_opcheck_and_compile(backend):
    device, name = backend
    pred, imgs, mask = _inputs(2, 3, 16, 16, 8, device=device)
    torch.library.opcheck(torch.ops.fastmim.patch_fft_loss.default, (pred, imgs, mask, 8, 1.0, True), test_utils=(
        "test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip

    def loss_fn(x):
        return patch_fft_loss(x, imgs, mask, 8) + x.square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    (want,) = torch.autograd.grad(loss_fn(pred), pred)
    (got,) = torch.autograd.grad(compiled(pred), pred)
    torch.testing.assert_close(got, want)


def test_compile_with_a_strided_prediction(backend):
    """The backward's fake kernel promised pred's strides while both backends return a contiguous gradient: inductor's
    stride assertion failed for a transposed prediction."""
    device, name = backend
    pred, imgs, mask = _inputs(2, 3, 4, 6, 2, device=device)  # (a shape where inductor keeps pred's layout)
    strided = pred.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not strided.is_contiguous()
    compiled = torch.compile(lambda x: patch_fft_loss(x, imgs, mask, 2), fullgraph=True, backend="inductor")
    torch._dynamo.reset()
    (got,) = torch.autograd.grad(compiled(strided), strided)
    (want,) = torch.autograd.grad(patch_fft_loss_ref(strided, imgs, mask, 2), strided)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_frequency_loss_module_runs_both_losses():
    """fastmim.targets.FrequencyLoss: "patch" is patch_fft_loss on predicted patches, "batch" A2MIM's fft_loss on a
    reconstructed image; fused=False runs the official computations, the same values."""
    from fastmim.ops import fft_loss_ref, unpatchify_ref
    from fastmim.targets import FrequencyLoss

    pred, imgs, mask = _inputs(2, 3, 32, 32, 16)
    for fused in (True, False):
        patch = FrequencyLoss("patch", 16, alpha=2.0, log_weights=False, fused=fused)
        torch.testing.assert_close(patch(pred, imgs, mask), patch_fft_loss_ref(pred, imgs, mask, 16, 2.0, False))
        rec = unpatchify_ref(pred, 16, (2, 2))
        batch = FrequencyLoss("batch", 16, fused=fused)
        torch.testing.assert_close(batch(rec, imgs, mask), fft_loss_ref(rec, imgs, mask, 16))
    with pytest.raises(ValueError, match="needs the mask"):
        FrequencyLoss("patch", 16)(pred, imgs, None)
    with pytest.raises(ValueError, match="kind must be one of batch, patch"):
        FrequencyLoss("pixel")
