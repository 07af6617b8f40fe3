"""masked_mse_loss (patchify fused) and masked_mse_loss_patchified: every backend against the reference, value and
gradient, odd shapes, low precision, strided inputs, bad inputs, opcheck, torch.compile and hypothesis shapes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmim import _ext
from fastmim.ops import (
    masked_mse_loss,
    masked_mse_loss_patchified,
    masked_mse_loss_patchified_ref,
    masked_mse_loss_ref,
    patchify_ref,
)
from tests.ops.conftest import DEVICES
from tests.ops.helpers import check_against_reference, compile_backend


def _case(b, c, h, w, p, device, dtype=torch.float32, pred_dtype=None, ratio=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.randn(b, c, h, w, generator=g) * 2 + 0.5).to(device, dtype)
    n, d = (h // p) * (w // p), p * p * c
    pred = torch.randn(b, n, d, generator=g).to(device, pred_dtype or dtype).requires_grad_()
    mask = (torch.rand(b, n, generator=g) < ratio).float()
    mask[0, 0] = 1.0  # never empty
    return pred, imgs, mask.to(device)


# (B, C, H, W, patch): ViT-B/16 at 224 with batch 1, C=1 and prime C=5, non-square grids, D=45 and 49
SHAPES = [(1, 3, 224, 224, 16), (2, 3, 48, 80, 16), (2, 1, 14, 21, 7), (3, 5, 12, 9, 3)]
MODES = [(True, 2), (False, 2), (True, 1), (False, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"norm{int(m[0])}-p{m[1]}")
def test_loss_matches_reference(backend, shape, mode):
    device, name = backend
    norm_pix, p = mode
    pred, imgs, mask = _case(*shape, device)
    fused = functools.partial(masked_mse_loss, patch_size=shape[-1], norm_pix=norm_pix, p=p)
    ref = functools.partial(masked_mse_loss_ref, patch_size=shape[-1], norm_pix=norm_pix, p=p)
    check_against_reference(lambda x: fused(x, imgs, mask), lambda x: ref(x, imgs, mask), [pred], f"loss[{name}]")


def _loss_on(fn, x, imgs, mask, norm_pix, p):
    return fn(x, imgs, mask, 16, norm_pix, p=p)


@pytest.mark.parametrize("dtypes", ["bf16", "bf16-pred", "fp16"])
def test_loss_low_precision(backend, dtypes):
    device, name = backend
    dt = torch.float16 if dtypes == "fp16" else torch.bfloat16
    img_dt = torch.float32 if dtypes == "bf16-pred" else dt  # autocast: bf16 predictions, fp32 images
    pred, imgs, mask = _case(2, 3, 32, 48, 16, device, dtype=img_dt, pred_dtype=dt)
    for norm_pix, p in MODES:
        check_against_reference(
            functools.partial(_loss_on, masked_mse_loss, mask=mask, norm_pix=norm_pix, p=p),
            functools.partial(_loss_on, masked_mse_loss_ref, mask=mask, norm_pix=norm_pix, p=p),
            [pred, imgs],
            f"loss[{name}, {dtypes}, norm={norm_pix}, p={p}]",
        )


def test_patchified_variant(backend):
    device, name = backend
    pred, imgs, mask = _case(2, 3, 32, 32, 8, device)
    target = patchify_ref(imgs, 8)
    for norm_pix, p in MODES:
        check_against_reference(
            functools.partial(masked_mse_loss_patchified, target=target, mask=mask, norm_pix=norm_pix, p=p),
            functools.partial(masked_mse_loss_patchified_ref, target=target, mask=mask, norm_pix=norm_pix, p=p),
            [pred],
            f"patchified[{name}]",
        )
        # and the same number as the loss read from the images
        a = masked_mse_loss_patchified(pred, target, mask, norm_pix, p=p)
        torch.testing.assert_close(a, masked_mse_loss(pred, imgs, mask, 8, norm_pix, p=p))


def test_mask_weights_bool_and_extremes(backend):
    """Fractional weights, bool masks, a single masked patch and an all-masked batch."""
    device, _ = backend
    pred, imgs, _ = _case(2, 3, 16, 32, 8, device)
    g = torch.Generator().manual_seed(3)
    masks = {
        "weights": torch.rand(2, 8, generator=g),
        "one": torch.zeros(2, 8).index_put_((torch.tensor([1]), torch.tensor([5])), torch.tensor(1.0)),
        "all": torch.ones(2, 8),
    }
    for what, m in masks.items():
        m = m.to(device)
        check_against_reference(
            lambda x, m=m: masked_mse_loss(x, imgs, m, 8),
            lambda x, m=m: masked_mse_loss_ref(x, imgs, m, 8),
            [pred],
            what,
        )
    bool_mask = masks["one"].to(device).bool()
    torch.testing.assert_close(masked_mse_loss(pred, imgs, bool_mask, 8), masked_mse_loss_ref(pred, imgs, bool_mask, 8))


def test_integer_images(backend):
    device, _ = backend
    pred, imgs, mask = _case(2, 3, 16, 16, 8, device)
    u8 = (imgs.abs() * 40).clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(masked_mse_loss(pred, u8, mask, 8), masked_mse_loss_ref(pred, u8, mask, 8))


def test_strided_inputs(backend):
    """channels_last images, a strided prediction and a strided mask give the contiguous result."""
    device, name = backend
    pred, imgs, mask = _case(2, 3, 32, 16, 8, device)
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    pred_t = pred.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    mask_s = torch.stack([mask, mask], -1)[..., 0]
    assert not (imgs_cl.is_contiguous() or pred_t.is_contiguous() or mask_s.is_contiguous())
    check_against_reference(
        lambda x: masked_mse_loss(x, imgs_cl, mask_s, 8), lambda x: masked_mse_loss_ref(x, imgs, mask, 8), [pred_t],
        f"strided[{name}]",
    )  # fmt: skip


def test_opcheck(backend):
    device, _ = backend
    pred, imgs, mask = _case(2, 3, 16, 16, 8, device)
    for args in [(pred, imgs, mask, 8, True, 1e-6, 2), (pred, patchify_ref(imgs, 8), mask, 0, False, 1e-6, 1)]:
        torch.library.opcheck(torch.ops.fastmim.masked_loss.default, args)
        grad_loss, denom = torch.tensor(0.5, device=device), mask.sum()
        bwd_args = (grad_loss, pred.detach(), *args[1:3], denom, *args[3:])
        torch.library.opcheck(torch.ops.fastmim.masked_loss_backward.default, bwd_args)


def test_compile_fullgraph(backend):
    device, name = backend
    pred, imgs, mask = _case(2, 3, 16, 24, 8, device)

    def step(x, imgs, mask):
        return masked_mse_loss(x * 1.5, imgs, mask, 8) + 0.1 * masked_mse_loss(x, imgs, mask, 8, p=1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend(device, name))
    check_against_reference(lambda x: compiled(x, imgs, mask), lambda x: step(x, imgs, mask), [pred], "compiled")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    p=st.integers(1, 9),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    norm_pix=st.booleans(),
    l1=st.booleans(),
    ratio=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(backend, b, c, p, gh, gw, norm_pix, l1, ratio, seed):
    device, name = backend
    norm_pix = norm_pix and p * p * c > 1
    pred, imgs, mask = _case(b, c, gh * p, gw * p, p, device, ratio=ratio, seed=seed)
    check_against_reference(
        lambda x: masked_mse_loss(x, imgs, mask, p, norm_pix, p=1 if l1 else 2),
        lambda x: masked_mse_loss_ref(x, imgs, mask, p, norm_pix, p=1 if l1 else 2),
        [pred],
        f"loss[{name}]",
        rtol=1e-5,
    )


def test_weight_zero_patches_are_ignored_even_when_not_finite(backend):
    """NaN/inf in visible patches (or a constant visible patch with eps=0) never reach the loss or the gradient."""
    device, name = backend
    pred, imgs, mask = _case(2, 3, 16, 16, 8, device)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]], device=device)
    bad_imgs = imgs.clone()
    bad_imgs[0, :, 0:8, 8:16] = float("nan")  # patch 1 of sample 0: visible
    bad_imgs[1, :, 8:16, 0:8] = 3.0  # patch 2 of sample 1: visible and constant
    bad_pred = pred.detach().clone()
    bad_pred[1, 3] = float("inf")
    bad_pred.requires_grad_()
    for eps in (1e-6, 0.0):
        loss = masked_mse_loss(bad_pred, bad_imgs, mask, 8, eps=eps)
        (grad,) = torch.autograd.grad(loss, bad_pred)
        ref = masked_mse_loss_ref(bad_pred, bad_imgs, mask, 8, eps=eps)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        torch.testing.assert_close(loss, ref)
        assert (grad[mask == 0] == 0).all()


def test_near_flat_patches_follow_maes_normalisation(backend):
    """Real images have near-flat patches (borders, sky) whose variance is about eps: there, where eps enters matters
    ((var + eps) ** 0.5, MAE's, against var ** 0.5 + eps: 3.75 against 13.7 for one grey level off in a flat patch),
    and a constant masked patch must give a finite loss. The other tests' images (variance 4) cannot tell them apart.
    """
    device, name = backend
    pred, imgs, _ = _case(2, 3, 16, 16, 8, device)
    imgs = imgs * 1e-3  # variance 4e-6: eps (1e-6) is a fifth of it
    imgs[0, :, 0:8, 0:8] = 0.25  # patch 0 of sample 0: constant
    imgs[1, :, 8:16, 8:16] = 0.5  # patch 3 of sample 1: one value 1/255 off
    imgs[1, 0, 12, 12] += 1 / 255
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]], device=device)
    for p in (1, 2):
        check_against_reference(
            lambda x, p=p: masked_mse_loss(x, imgs, mask, 8, norm_pix=True, p=p),
            lambda x, p=p: masked_mse_loss_ref(x, imgs, mask, 8, norm_pix=True, p=p),
            [pred],
            f"near-flat[{name}, p={p}]",
            rtol=1e-5,
        )
    t = patchify_ref(imgs, 8)[1, 3]  # the case tells the two apart:
    assert ((t - t.mean()) / (t.var() + 1e-6) ** 0.5).max().item() == pytest.approx(3.75, abs=0.01)
    assert ((t - t.mean()) / (t.var() ** 0.5 + 1e-6)).max().item() == pytest.approx(13.7, abs=0.1)


def test_double_backward_raises_instead_of_dropping_terms(backend):
    """The fused backwards are kernels, not differentiable graphs: a second derivative must fail loudly."""
    device, name = backend
    pred, imgs, mask = _case(2, 3, 16, 16, 8, device)
    (g,) = torch.autograd.grad(masked_mse_loss(pred, imgs, mask, 8), pred, create_graph=True)
    with pytest.raises(RuntimeError):
        g.square().sum().backward()


# ---- bad input --------------------------------------------------------------------------------------------------


def test_empty_mask_raises(backend):
    device, _ = backend
    if device.type != "cpu":
        pytest.skip("checked on CPU tensors only: on CUDA the check would cost a host sync (the loss is NaN there)")
    pred, imgs, mask = _case(2, 3, 16, 16, 8, device)
    with pytest.raises(ValueError, match="no masked patch"):
        masked_mse_loss(pred, imgs, torch.zeros_like(mask), 8)


def test_bad_arguments_raise():
    pred, imgs, mask = _case(2, 3, 16, 16, 8, "cpu")
    cases = [
        ((pred, imgs[..., :15], mask, 8), ValueError, "image size 16x15 is not divisible by the patch size 8"),
        ((pred, imgs, mask, 0), ValueError, "patch_size must be a positive int"),
        ((pred, imgs, mask, 4), ValueError, r"pred has shape \(2, 4, 192\), expected \(2, 16, 48\)"),
        ((pred, imgs[0], mask, 8), ValueError, r"imgs must be \[B, C, H, W\]"),
        ((pred, imgs, mask[:, :3], 8), ValueError, "mask has shape"),
        ((pred, imgs, mask.view(2, 2, 2), 8), ValueError, r"a \[B, h, w\] grid of patches flattens with mask.flatten"),
        ((pred.detach().long(), imgs, mask, 8), TypeError, "pred must be a floating-point"),
        ((pred, imgs.to("meta"), mask, 8), ValueError, "imgs is on meta"),
        ((pred, imgs, mask.to("meta"), 8), ValueError, "mask is on meta"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            masked_mse_loss(*args)
    for bad_p in (3, 2.0, True):
        with pytest.raises(ValueError, match="p must be the int 1"):
            masked_mse_loss(pred, imgs, mask, 8, p=bad_p)
    with pytest.raises(ValueError, match="no values per patch"):
        masked_mse_loss_patchified(pred[..., :0], pred.detach()[..., :0], mask)
    for eps in (float("nan"), float("inf"), "1e-6"):  # (inf reached the C++ binding; its message named that)
        with pytest.raises(ValueError, match="masked_mse_loss: eps must be a finite number >= 0"):
            masked_mse_loss(pred, imgs, mask, 8, eps=eps)
    with pytest.raises(TypeError, match="norm_pix must be True or False, got 'no'"):  # (was pybind11's signature list)
        masked_mse_loss(pred, imgs, mask, 8, norm_pix="no")
    with pytest.raises(ValueError, match=r"pred has no patches \(L = 0"):
        masked_mse_loss_patchified(pred[:, :0], pred.detach()[:, :0], mask[:, :0])
    with pytest.raises(ValueError, match="imgs requires grad"):
        masked_mse_loss(pred, imgs.clone().requires_grad_(), mask, 8)
    with pytest.raises(ValueError, match="norm_pix needs at least 2 values"):
        masked_mse_loss(torch.zeros(1, 4, 1), imgs[:1, :1, :2, :2], mask[:1, :4], 1)
    with pytest.raises(TypeError, match="imgs must be real-valued"):
        masked_mse_loss(pred, imgs > 0, mask, 8)
    with pytest.raises(ValueError, match="target has shape"):
        masked_mse_loss_patchified(pred, pred.detach()[:, :3], mask)


@pytest.mark.skipif(not _ext.available(), reason=f"fastmim._C not built ({_ext.load_error})")
def test_cpp_kernel_checks_bounds_itself():
    """A geometry that would read past the target buffer raises in C++ instead of reading out of bounds."""
    from fastmim.ops import _cpu

    pred, imgs, mask = _case(2, 3, 16, 16, 8, "cpu")
    small = imgs[:1].contiguous()  # half the buffer the geometry describes
    geometry = (2, 3 * 16 * 16, 8 * 16, 8, 8, 3, 16, 1, 16 * 16)
    with pytest.raises(ValueError):
        _cpu.masked_loss_forward(pred.detach(), small, mask, geometry, True, 1e-6, 2)


def test_huge_patches_leave_the_triton_kernel(monkeypatch):
    """Patches longer than one Triton tile run the reference when the backend is automatic, and a forced Triton
    backend says why it cannot run them."""
    from fastmim.ops import masked_loss

    pred = torch.randn(1, 2, 8)
    monkeypatch.setattr(masked_loss, "TRITON_MAX_PATCH", 4)
    monkeypatch.setattr(masked_loss, "choose_backend", lambda *a, **k: "triton")
    monkeypatch.setenv("FASTMIM_BACKEND", "auto")
    assert masked_loss._backend(pred, pred) == "torch"
    monkeypatch.setenv("FASTMIM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="patches of 8 values exceed"):
        masked_loss._backend(pred, pred)


def test_triton_int64_offsets_path(monkeypatch):
    """Samples past 2^31 elements take the kernels' int64 offsets (WIDE): run that path on small inputs by lowering
    the threshold, for the loss and for patchify (its flat kernel)."""
    from fastmim.ops._dispatch import set_backend, triton_problem
    from fastmim.ops.triton import masked_loss as loss_kernels
    from fastmim.ops.triton import patchify as patch_kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if triton_problem(device):
        pytest.skip(triton_problem(device))
    monkeypatch.setattr(loss_kernels, "INT32_OFFSETS", 1)
    monkeypatch.setattr(patch_kernels, "INT32_OFFSETS", 1)
    pred, imgs, mask = _case(2, 3, 48, 80, 16, device)
    prev = set_backend("triton")
    try:
        check_against_reference(
            lambda x: masked_mse_loss(x, imgs, mask, 16),
            lambda x: masked_mse_loss_ref(x, imgs, mask, 16),
            [pred],
            "wide",
        )
        assert torch.equal(patch_kernels.patchify(imgs, 16), patchify_ref(imgs, 16))
    finally:
        set_backend(prev)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", ["masked_mse_loss", "masked_mse_loss_patchified"])
def test_a_float64_pred_gets_a_float64_loss_that_passes_gradcheck(fn, device):
    """float64 in, float64 out (fp32 would cap gradcheck's precision); other dtypes keep the fp32 loss. The fused
    kernels take fp32/bf16/fp16, so the automatic choice runs float64 on the torch backend (a forced one refuses)."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 48, generator=g, dtype=torch.float64).to(device).requires_grad_()
    imgs = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64).to(device)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]], device=device)
    if fn == "masked_mse_loss":
        fused = lambda x: masked_mse_loss(x, imgs, mask, 4)  # noqa: E731
        ref = lambda x: masked_mse_loss_ref(x, imgs, mask, 4)  # noqa: E731
    else:
        target = patchify_ref(imgs, 4)
        fused = lambda x: masked_mse_loss_patchified(x, target, mask)  # noqa: E731
        ref = lambda x: masked_mse_loss_patchified_ref(x, target, mask)  # noqa: E731
    assert fused(pred).dtype == ref(pred).dtype == torch.float64
    torch.testing.assert_close(fused(pred), ref(pred), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (pred,))
    assert fused(pred.detach().float()).dtype == torch.float32
    # fractional weights (an fp32 mask): the gradient divides by their float64 sum, as the reference's autograd (the
    # forward's fp32 sum gave a 3e-8 relative error, which gradcheck's tolerance lets through)
    mask.copy_(torch.rand(2, 4, generator=g))
    (got,), (want,) = (torch.autograd.grad(f(pred), pred) for f in (fused, ref))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_norm_pix_statistics_are_float64(device):
    """The per-patch mean and std of a float64 target were taken in fp32: a 1e30-scaled image's variance (1e60)
    overflowed to inf and the target became 0; a 1e150-scaled one gave NaN. Against NumPy's float64, written out."""
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 12, generator=g, dtype=torch.float64).to(device).requires_grad_()
    imgs = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    for scale in (1.0, 1e30, 1e150):
        t = imgs.numpy().reshape(2, 3, 2, 2, 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(2, 4, 12) * scale
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
        per_patch = ((pred.detach().cpu().numpy() - t) ** 2).mean(-1)
        expected = (per_patch * mask.numpy()).sum() / mask.numpy().sum()
        for fn in (masked_mse_loss, masked_mse_loss_ref):
            loss = fn(pred, (imgs * scale).to(device), mask.to(device), 2)
            assert float(loss) == pytest.approx(expected, rel=1e-9), (fn.__name__, scale)
        (grad,) = torch.autograd.grad(masked_mse_loss(pred, (imgs * scale).to(device), mask.to(device), 2), pred)
        expected_grad = 2 * (pred.detach().cpu().numpy() - t) * mask.numpy()[..., None] / mask.numpy().sum() / 12
        np.testing.assert_allclose(grad.cpu().numpy(), expected_grad, rtol=1e-9, atol=1e-12)
