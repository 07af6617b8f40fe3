"""The nn.Module forms of the ops: the functional op's value and gradients, settings kept, bad settings refused."""

from __future__ import annotations

import pytest
import torch

import fastmim.ops as ops
from fastmim.models.convnextv2 import GlobalResponseNorm


def _mask(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, generator=g) < 0.6).float()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_losses_equal_the_reference_for_images_and_patches(p, norm_pix):
    torch.manual_seed(0)
    imgs, mask = torch.randn(2, 3, 32, 32), _mask(2, 16)
    pred = torch.randn(2, 16, 8 * 8 * 3, requires_grad=True)
    module = ops.MaskedL1Loss(8, norm_pix=norm_pix) if p == 1 else ops.MaskedMSELoss(8, norm_pix=norm_pix)
    got = module(pred, imgs, mask)
    want = ops.masked_mse_loss_ref(pred, imgs, mask, 8, norm_pix, 1e-6, p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, pred)
    (g_want,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    target = torch.randn(2, 16, 12)  # already patches: HOG, teacher tokens
    pred2 = torch.randn(2, 16, 12)
    torch.testing.assert_close(module(pred2, target, mask),
                               ops.masked_mse_loss_patchified_ref(pred2, target, mask, norm_pix, 1e-6, p))  # fmt: skip


def test_masked_loss_defaults_are_maes_and_simmims():
    """MaskedMSELoss() is MAE's loss (norm_pix, squared error), MaskedL1Loss() SimMIM's (raw pixels, absolute error):
    the defaults as values, not only as reprs."""
    torch.manual_seed(0)
    imgs, mask, pred = torch.randn(2, 3, 16, 16), _mask(2, 4), torch.randn(2, 4, 192)
    torch.testing.assert_close(ops.MaskedMSELoss(8)(pred, imgs, mask), ops.masked_mse_loss_ref(pred, imgs, mask, 8,
                               True, 1e-6, 2))  # fmt: skip
    torch.testing.assert_close(ops.MaskedL1Loss(8)(pred, imgs, mask), ops.masked_mse_loss_ref(pred, imgs, mask, 8,
                               False, 1e-6, 1))  # fmt: skip
    assert (ops.MaskedMSELoss().norm_pix, ops.MaskedL1Loss().norm_pix, ops.MaskedL1Loss().p) == (True, False, 1)


def test_masked_loss_settings_are_checked():
    with pytest.raises(ValueError, match="p must be the int 1 or 2"):
        ops.MaskedMSELoss(16, p=3)
    with pytest.raises(ValueError, match="need patch_size"):
        ops.MaskedMSELoss()(torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8), torch.ones(1, 4))
    # every module form refuses a bad setting when built, not at its first call
    bad = [(lambda: ops.MaskedMSELoss(0), "MaskedMSELoss: patch_size must be a positive int, got 0"),
           (lambda: ops.MaskedMSELoss(4, eps=-1.0), "MaskedMSELoss: eps must be a finite number >= 0"),
           (lambda: ops.MaskedL1Loss(4, norm_pix="yes"), "MaskedL1Loss: norm_pix must be true or false"),
           (lambda: ops.PatchFFTLoss(2, alpha=-1), "PatchFFTLoss: alpha must be a"),
           (lambda: ops.PatchFFTLoss(2, alpha=0), "PatchFFTLoss: alpha must be a finite number > 0"),
           (lambda: ops.FFTLoss(0), "FFTLoss: patch_size must be a positive int"),
           (lambda: ops.HOGTarget(16, nbins=0), "HOGTarget: nbins must be an int >= 1"),
           (lambda: ops.LowPassTarget(-1), "LowPassTarget: radius must be a finite number >= 0"),
           (lambda: ops.LowPassTarget(3, mean=(0.5,)), "LowPassTarget: mean and std need one value per channel"),
           (lambda: ops.GRN(0), "GRN: dim must be an int >= 1")]  # fmt: skip
    for build, message in bad:
        with pytest.raises(ValueError, match=message):
            build()


def test_modules_show_their_settings_and_refuse_a_float_p():
    """print(model) shows each module's settings; p=2.0 (a float) is refused when built, not at the first call."""
    from fastmim import ops

    assert repr(ops.HOGTarget(8, 4)) == "HOGTarget(patch_size=8, cell_size=4, nbins=9, gaussian_window=0)"
    assert repr(ops.PatchFFTLoss(4, 0.5)) == "PatchFFTLoss(patch_size=4, alpha=0.5, log_weights=True)"
    assert repr(ops.FFTLoss(16)) == "FFTLoss(patch_size=16)" and "radius=3.0" in repr(ops.LowPassTarget(3.0))
    assert repr(ops.GRN(4)) == "GRN(dim=4, eps=1e-06)"
    with pytest.raises(ValueError, match="p must be the int 1 or 2, got 2.0"):
        ops.MaskedMSELoss(4, p=2.0)
    with pytest.raises(ValueError, match=r"grid \(-2, -3\) and channels 3 must be positive ints"):
        ops.unpatchify(torch.randn(1, 6, 48), 4, (-2, -3), 3)


def test_grn_module_equals_convnext_v2s_grn_with_gradients():
    torch.manual_seed(0)
    ours, ref = ops.GRN(6), GlobalResponseNorm(6)
    for m in (ours, ref):
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-1, 1, 6))
            m.bias.copy_(torch.linspace(0.5, -0.5, 6))
    x = torch.randn(2, 5, 4, 6, requires_grad=True)  # channels-last [B, H, W, C]
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.square().sum(), [x, ours.weight, ours.bias])
    gb = torch.autograd.grad(b.square().sum(), [x, ref.weight, ref.bias])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    assert ours(x.view(2, 20, 6)).shape == (2, 20, 6)


def test_target_and_frequency_modules_call_their_ops():
    torch.manual_seed(0)
    imgs, mask = torch.randn(2, 3, 32, 32), _mask(2, 4)
    torch.testing.assert_close(ops.HOGTarget(16, 8, 9)(imgs), ops.hog_target_ref(imgs, 16, 8, 9), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ops.LowPassTarget(5.0)(imgs), ops.low_pass_target_ref(imgs, 5.0), rtol=1e-4, atol=1e-5)
    pred = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ops.FFTLoss(16)(pred, imgs, mask), ops.fft_loss_ref(pred, imgs, mask, 16),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    pp = torch.randn(2, 4, 16 * 16 * 3)
    torch.testing.assert_close(ops.PatchFFTLoss(16)(pp, imgs, mask), ops.patch_fft_loss_ref(pp, imgs, mask, 16),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
