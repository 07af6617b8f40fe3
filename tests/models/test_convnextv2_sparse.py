"""Sparse ConvNeXt V2 execution: every backend computes the dense_masked reference's function."""

import os

import pytest
import torch

from fastmim.models.convnextv2 import ConvNeXtV2
from fastmim.models.convnextv2_sparse import sparse_forward, stage_masks

SPARSE_BACKENDS = ["dense_masked", "fastmim", "spconv"]


def skip_without(backend):
    """The spconv backend's tests skip where its optional dependency is not installed."""
    if backend == "spconv":
        pytest.importorskip("spconv.pytorch", reason="optional dependency spconv missing: pip install spconv-cu120")


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
    skip_without(backend)
    if ops_backend:
        monkeypatch.setenv("FASTMIM_BACKEND", ops_backend)
    model.zero_grad()
    x = imgs.clone().requires_grad_(True)
    torch.manual_seed(123)  # drop path draws: the same in every backend
    out = sparse_forward(model, x, visible, backend)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
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


@pytest.mark.parametrize(
    "hw, batch", [((96, 96), 3), ((160, 160), 1), ((64, 96), 2), ((96, 160), 2)], ids=["3x3", "5x5", "2x3", "3x5"]
)
def test_spconv_backend_equals_dense_masked(hw, batch):
    """The stem and downsampling convs through spconv (gradients into the model's own Conv2d weights), the rest as
    the fastmim backend: outputs, input and parameter gradients, with drop path."""
    model = small_model(drop_path_rate=0.3).train()
    imgs = torch.randn(batch, 3, *hw)
    visible = patch_mask(batch, hw[0] // 32, hw[1] // 32, seed=hw[1])
    ref = run(model, imgs, visible, "dense_masked")
    got = run(model, imgs, visible, "spconv")
    assert_same(ref, got)
    assert got[2]["stem.0.weight"].abs().sum() > 0 and got[2]["stages.1.downsample.1.weight"].abs().sum() > 0


def test_spconv_conv_puts_rows_in_raster_order_whatever_order_spconv_returns():
    """spconv numbers its outputs in its own order (input order on CPU, hash order on GPU): fed the rows shuffled,
    the downsampling conv still returns the rows of the output layout, as the matmul path does."""
    skip_without("spconv")
    from fastmim.models.convnextv2_sparse import _downsample_rows, _spconv_conv
    from fastmim.ops import SparseLayout

    torch.manual_seed(0)
    active = torch.rand(3, 5, 7) > 0.4
    prev = SparseLayout.from_mask(active.repeat_interleave(2, 1).repeat_interleave(2, 2))
    cur = SparseLayout.from_mask(active)
    conv = torch.nn.Conv2d(6, 10, kernel_size=2, stride=2)
    x = torch.randn(prev.num_rows, 6, requires_grad=True)
    _, h, w = prev.shape
    coords = torch.stack([prev.batch, prev.pixel % (h * w) // w, prev.pixel % w], dim=1).int()
    perm = torch.randperm(prev.num_rows)
    got = _spconv_conv(x[perm], coords[perm], prev.shape, conv, cur)
    ref = _downsample_rows(x, prev, cur, conv)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    inputs = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(ref, inputs, g), torch.autograd.grad(got, inputs, g), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_spconv_backend_without_spconv_names_the_package(monkeypatch):
    import sys

    from fastmim.models import convnextv2_sparse

    monkeypatch.setitem(sys.modules, "spconv", None)  # import spconv raises ImportError
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)
    convnextv2_sparse._spconv.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install spconv-cu120"):
            sparse_forward(small_model(), torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2, dtype=torch.bool), "spconv")
    finally:
        convnextv2_sparse._spconv.cache_clear()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_masked_positions_are_exactly_zero_and_visible_ones_are_not(backend):
    skip_without(backend)
    model = small_model()
    visible = patch_mask(2, 3, 3)
    out = sparse_forward(model, torch.randn(2, 3, 96, 96), visible, backend)  # [2, 24, 3, 3]
    assert out.shape == (2, 24, 3, 3)
    assert (out.permute(0, 2, 3, 1)[~visible] == 0).all()
    assert (out.permute(0, 2, 3, 1)[visible].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_nothing_masked_equals_the_dense_model(backend):
    skip_without(backend)
    model = small_model()
    imgs = torch.randn(2, 3, 96, 64)
    out = sparse_forward(model, imgs, torch.ones(2, 3, 2, dtype=torch.bool), backend)
    torch.testing.assert_close(out, model.forward_features(imgs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_a_fully_masked_sample_gives_zeros_and_leaves_the_others_alone(backend):
    skip_without(backend)
    model = small_model()
    imgs = torch.randn(2, 3, 64, 64)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    visible[1] = False
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


def test_uniform_grn_gradients_are_exact():
    """The fused GRN the uniform rows path calls (fastmim.ops.grn, its closed-form backward) against finite
    differences (float64), with a channel that is zero in one sample (vector_norm's zero subgradient there) and
    weight/bias gradients; equal to the dense GRN's autograd; and under bf16 it stays within bf16 rounding of the
    fp32 result, in bf16."""
    from fastmim.ops import grn as fused_grn

    torch.manual_seed(0)
    y = torch.randn(3, 5, 7, dtype=torch.float64)
    y[1, :, 2] = 0.0
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, w, b: fused_grn(y, w, b, 1e-6), (y, w, b))
    # the plain formula's gradients (autograd of the dense GRN) on the same input, including the zero channel
    from fastmim.models.convnextv2 import GlobalResponseNorm

    grn = GlobalResponseNorm(7).double()
    grn.weight.data.copy_(w.detach())
    grn.bias.data.copy_(b.detach())
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    y2 = y.detach().clone().requires_grad_(True)
    (grn(y2.unsqueeze(2)).squeeze(2) * g).sum().backward()
    (fused_grn(y, w, b, 1e-6) * g).sum().backward()
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(w.grad, grn.weight.grad)
    torch.testing.assert_close(b.grad, grn.bias.grad)
    yb = y.detach().float().bfloat16()
    out = fused_grn(yb, w.detach().float(), b.detach().float(), 1e-6)
    assert out.dtype == torch.bfloat16
    ref = grn(yb.double().unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_an_all_masked_batch_gives_zeros_in_every_backend(backend):
    skip_without(backend)
    model = small_model()
    visible = torch.zeros(2, 2, 2, dtype=torch.bool)
    out = sparse_forward(model, torch.randn(2, 3, 64, 64), visible, backend)
    assert out.shape == (2, 24, 2, 2) and (out == 0).all()
    out.sum().backward()  # every parameter in the graph, with a zero gradient
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["fastmim", "spconv"])
def test_under_bf16_autocast_the_backends_agree_in_dtype_and_value(backend):
    """The reference must not promote activations to fp32 (a float mask of the images' dtype did), and the rows
    backends must compute in the same precision (spconv, with no bf16 kernels, on bf16-rounded inputs)."""
    skip_without(backend)
    model = small_model()
    imgs = torch.randn(2, 3, 96, 96)
    visible = patch_mask(2, 3, 3, seed=5)
    outs = {}
    for b in ("dense_masked", backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[b] = sparse_forward(model, imgs, visible, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model.forward_features(imgs)
    assert outs["dense_masked"].dtype == outs[backend].dtype == dense.dtype
    ref = sparse_forward(model, imgs, visible, "dense_masked")  # fp32
    for out in outs.values():
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 2e-2, err  # bf16 rounding through 5 blocks


@pytest.mark.parametrize("ops_backend", [None, "triton"], ids=["auto", "triton"])
def test_fused_norm_rows_equal_the_plain_layer_norm(ops_backend, monkeypatch):
    """fused_norm=True runs each block's LayerNorm through fastmim.ops.layer_norm (the Triton kernel under the
    interpreter, the GPU path): in fp32 the same values and gradients; under bf16 autocast its output is bf16 where
    nn.LayerNorm's is fp32 on CUDA, so fc1 reads the same bf16 values either way."""
    if ops_backend == "triton":
        pytest.importorskip("triton", reason="optional dependency triton missing")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET=1 is not set: Triton cannot run CPU tensors")
    import fastmim.models.convnextv2_sparse as sparse

    model = small_model(drop_path_rate=0.3).train()
    imgs = torch.randn(2, 3, 96, 96)
    visible = patch_mask(2, 3, 3, seed=3)
    ref = run(model, imgs, visible, "fastmim")
    calls = []
    real = sparse.fused_layer_norm
    monkeypatch.setattr(sparse, "fused_layer_norm", lambda *a: calls.append(a[0].dtype) or real(*a))
    model.fused_norm = True
    assert_same(ref, run(model, imgs, visible, "fastmim", monkeypatch, ops_backend))
    assert len(calls) == 5  # one per block
    model.eval()  # no drop-path draws
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = sparse_forward(model, imgs, visible, "fastmim")
    model.fused_norm = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain16 = sparse_forward(model, imgs, visible, "fastmim")
    assert out16.dtype == plain16.dtype
    assert (out16.float() - plain16.float()).norm() / plain16.float().norm() < 2e-2
