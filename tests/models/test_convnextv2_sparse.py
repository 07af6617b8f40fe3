"""Sparse ConvNeXt V2 execution: every backend computes the dense_masked reference's function."""

import pytest
import torch

from fastmim.models.convnextv2 import ConvNeXtV2
from fastmim.models.convnextv2_sparse import sparse_forward, stage_masks


def small_model(seed=0, drop_path_rate=0.0, **kwargs):
    torch.manual_seed(seed)
    m = ConvNeXtV2(**{"depths": (1, 1, 2, 1), "dims": (8, 16, 16, 24), "head": False, **kwargs},
                   drop_path_rate=drop_path_rate)  # fmt: skip
    for p in m.parameters():  # GRN starts as the identity: random values make its statistic matter
        p.data.add_(0.1 * torch.randn_like(p))
    return m


def patch_mask(b, gh, gw, ratio=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = max(1, int(gh * gw * (1 - ratio)))
    ids = torch.rand(b, gh * gw, generator=g).argsort(1)[:, :keep]
    vis = torch.zeros(b, gh * gw, dtype=torch.bool)
    vis.scatter_(1, ids, True)
    return vis.view(b, gh, gw)


def run(model, imgs, visible, backend, monkeypatch=None, ops_backend=None):
    if ops_backend:
        monkeypatch.setenv("FASTMIM_BACKEND", ops_backend)
    model.zero_grad()
    x = imgs.clone().requires_grad_(True)
    torch.manual_seed(123)  # drop path draws: the same in every backend
    out = sparse_forward(model, x, visible, backend)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if ops_backend:
        monkeypatch.delenv("FASTMIM_BACKEND")
    return out.detach(), x.grad, grads


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    out_a, gx_a, g_a = a
    out_b, gx_b, g_b = b
    torch.testing.assert_close(out_b, out_a, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx_b, gx_a, rtol=rtol, atol=atol)
    for name in g_a:
        scale = g_a[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g_b[name] / scale, g_a[name] / scale, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("img, batch", [(96, 3), (160, 1), (64, 2)])  # 3x3, 5x5 and 2x2 mask grids
def test_fastmim_rows_backend_equals_dense_masked(img, batch):
    model = small_model(drop_path_rate=0.3).train()
    imgs = torch.randn(batch, 3, img, img)
    visible = patch_mask(batch, img // 32, img // 32, seed=img)
    ref = run(model, imgs, visible, "dense_masked")
    assert_same(ref, run(model, imgs, visible, "fastmim"))


def test_triton_kernels_in_the_rows_backend_equal_dense_masked(monkeypatch):
    """The depthwise conv through the Triton kernels (the interpreter on CPU; the GPU path)."""
    model = small_model().train()
    imgs = torch.randn(2, 3, 64, 96)  # a non-square 2x3 grid
    visible = patch_mask(2, 2, 3, seed=1)
    ref = run(model, imgs, visible, "dense_masked")
    assert_same(ref, run(model, imgs, visible, "fastmim", monkeypatch, "triton"))


@pytest.mark.parametrize("backend", ["dense_masked", "fastmim"])
def test_masked_positions_are_exactly_zero_and_visible_ones_are_not(backend):
    model = small_model()
    visible = patch_mask(2, 3, 3)
    out = sparse_forward(model, torch.randn(2, 3, 96, 96), visible, backend)  # [2, 24, 3, 3]
    assert out.shape == (2, 24, 3, 3)
    assert (out.permute(0, 2, 3, 1)[~visible] == 0).all()
    assert (out.permute(0, 2, 3, 1)[visible].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", ["dense_masked", "fastmim"])
def test_nothing_masked_equals_the_dense_model(backend):
    model = small_model()
    imgs = torch.randn(2, 3, 96, 64)
    out = sparse_forward(model, imgs, torch.ones(2, 3, 2, dtype=torch.bool), backend)
    torch.testing.assert_close(out, model.forward_features(imgs), rtol=1e-4, atol=1e-5)


def test_a_fully_masked_sample_gives_zeros_and_leaves_the_others_alone():
    model = small_model()
    imgs = torch.randn(2, 3, 64, 64)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    visible[1] = False
    for backend in ("dense_masked", "fastmim"):
        out = sparse_forward(model, imgs, visible, backend)
        assert (out[1] == 0).all()
        torch.testing.assert_close(out[0], model.forward_features(imgs[:1])[0], rtol=1e-4, atol=1e-5)


def test_stage_masks_upsample_the_patch_grid():
    model = small_model()
    visible = patch_mask(1, 3, 3)
    masks = stage_masks(visible, (96, 96), model)
    assert [tuple(m.shape[1:]) for m in masks] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert torch.equal(masks[-1], visible) and torch.equal(masks[0][:, ::8, ::8], visible)


def test_bad_masks_name_the_problem():
    model = small_model()
    imgs = torch.randn(1, 3, 96, 96)
    with pytest.raises(ValueError, match="does not fit a 96x96 image"):
        sparse_forward(model, imgs, torch.ones(1, 4, 4, dtype=torch.bool))  # 24-px patches
    with pytest.raises(ValueError, match="does not fit"):
        sparse_forward(model, imgs, torch.ones(1, 2, 2, dtype=torch.bool))  # 48-px patches
    with pytest.raises(ValueError, match="bool mask"):
        sparse_forward(model, imgs, torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="samples"):
        sparse_forward(model, imgs, torch.ones(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="sparse backend"):
        sparse_forward(model, imgs, torch.ones(1, 3, 3, dtype=torch.bool), "minkowski")


def test_grn_rows_uniform_reduction_equals_the_scatter_add():
    from fastmim.models.convnextv2 import GlobalResponseNorm
    from fastmim.models.convnextv2_sparse import grn_rows

    grn = GlobalResponseNorm(6)
    grn.weight.data.normal_()
    grn.bias.data.normal_()
    y = torch.randn(12, 6, requires_grad=True)
    batch = torch.arange(3).repeat_interleave(4)  # 4 rows per sample, in sample order
    a = grn_rows(grn, y, batch, 3, uniform=True)
    b = grn_rows(grn, y, batch, 3, uniform=False)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.square().sum(), y)[0]
    gb = torch.autograd.grad(b.square().sum(), y)[0]
    torch.testing.assert_close(ga, gb)
    # and both equal the dense GRN of each sample's rows
    dense = grn(y.detach().view(3, 4, 1, 6)).view(12, 6)
    torch.testing.assert_close(a.detach(), dense, rtol=1e-5, atol=1e-6)


def test_an_all_masked_batch_gives_zeros_in_every_backend():
    model = small_model()
    visible = torch.zeros(2, 2, 2, dtype=torch.bool)
    for backend in ("dense_masked", "fastmim"):
        out = sparse_forward(model, torch.randn(2, 3, 64, 64), visible, backend)
        assert out.shape == (2, 24, 2, 2) and (out == 0).all()


def test_under_bf16_autocast_the_backends_agree_in_dtype_and_value():
    """The reference must not promote activations to fp32 (a float mask of the images' dtype did), and the rows
    backend must compute in the same precision."""
    model = small_model()
    imgs = torch.randn(2, 3, 96, 96)
    visible = patch_mask(2, 3, 3, seed=5)
    outs = {}
    for backend in ("dense_masked", "fastmim"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[backend] = sparse_forward(model, imgs, visible, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model.forward_features(imgs)
    assert outs["dense_masked"].dtype == outs["fastmim"].dtype == dense.dtype
    ref = sparse_forward(model, imgs, visible, "dense_masked")  # fp32
    for out in outs.values():
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 2e-2, err  # bf16 rounding through 5 blocks
