"""patchify / unpatchify: every backend against the reference, any patch size and channel count, both gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmim.ops import patchify, patchify_ref, unpatchify, unpatchify_ref
from tests.ops.helpers import check_against_reference


@pytest.mark.parametrize("shape", [(1, 3, 224, 224, 16), (2, 5, 21, 14, 7), (3, 1, 4, 6, 1), (2, 2, 9, 9, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patchify_round_trip_matches_reference(backend, shape, dtype):
    device, name = backend
    b, c, h, w, p = shape
    imgs = torch.randn(b, c, h, w).to(device, dtype).requires_grad_()
    check_against_reference(lambda x: patchify(x, p), lambda x: patchify_ref(x, p), [imgs], f"patchify[{name}]")
    x = torch.randn(b, (h // p) * (w // p), p * p * c).to(device, dtype).requires_grad_()
    grid = (h // p, w // p)
    check_against_reference(
        lambda t: unpatchify(t, p, grid, c), lambda t: unpatchify_ref(t, p, grid, c), [x], f"unpatchify[{name}]"
    )
    assert torch.equal(unpatchify(patchify(imgs, p), p, grid, c), imgs)


def test_strided_images(backend):
    device, _ = backend
    imgs = torch.randn(2, 3, 8, 12, device=device).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(patchify(imgs, 4), patchify_ref(imgs, 4), rtol=0, atol=0)


def test_opcheck_and_compile(backend):
    device, name = backend
    imgs = torch.randn(2, 3, 8, 12, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastmim.patchify.default, (imgs, 4))
    torch.library.opcheck(torch.ops.fastmim.unpatchify.default, (patchify_ref(imgs, 4).detach(), 4, 2, 3, 3))
    torch._dynamo.reset()
    fn = torch.compile(lambda x: unpatchify(patchify(x, 4) * 2, 4, (2, 3), 3), fullgraph=True, backend="aot_eager")
    check_against_reference(fn, lambda x: unpatchify_ref(patchify_ref(x, 4) * 2, 4, (2, 3), 3), [imgs], name)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), c=st.integers(1, 5), p=st.integers(1, 8), gh=st.integers(1, 4), gw=st.integers(1, 4))
def test_hypothesis_shapes(backend, b, c, p, gh, gw):
    device, _ = backend
    imgs = torch.randn(b, c, gh * p, gw * p, device=device)
    out = patchify(imgs, p)
    assert torch.equal(out, patchify_ref(imgs, p))
    assert torch.equal(unpatchify(out, p, (gh, gw), c), imgs)


def test_double_backward(backend):
    """patchify and unpatchify are linear and each other's backward: higher derivatives work (and vanish)."""
    device, _ = backend
    imgs = torch.randn(2, 3, 8, 12, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(patchify(imgs, 4).square().sum(), imgs, create_graph=True)
    torch.testing.assert_close(g, 2 * imgs)
    (gg,) = torch.autograd.grad(g.sum(), imgs)
    torch.testing.assert_close(gg, torch.full_like(imgs, 2.0))


def test_bad_arguments_raise():
    imgs = torch.randn(2, 3, 8, 12)
    with pytest.raises(ValueError, match="not divisible by the patch size 5"):
        patchify(imgs, 5)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        patchify(imgs, 0)
    with pytest.raises(ValueError, match=r"imgs must be \[B, C, H, W\]"):
        patchify(imgs[0], 4)
    with pytest.raises(ValueError, match=r"expected \[B, 6, 48\] for grid 2x3"):
        unpatchify(torch.randn(2, 5, 48), 4, (2, 3), 3)
    read = r"\(imgs read as \[B, C, H, W\] = \(2, 8, 12, 3\); .*imgs.permute\(0, 3, 1, 2\)"
    with pytest.raises(ValueError, match=read):
        patchify(imgs.permute(0, 2, 3, 1), 4)  # channels-last data
    with pytest.raises(ValueError, match=r"grid \(2.5, 2\) and channels 3 must be positive ints"):
        unpatchify(torch.randn(2, 4, 48), 4, (2.5, 2), 3)
    square = torch.randn(2, 4, 48)
    assert torch.equal(unpatchify(square, 4, 2, 3), unpatchify(square, 4, (2, 2), 3))  # one int: a square grid
    assert torch.equal(unpatchify_ref(square, 4, 2, 3), unpatchify(square, 4, 2, 3))


@pytest.mark.parametrize("config", [("flat", 64, 0, 4), ("flat", 1024, 0, 4), ("strip", 1, 8, 4), ("strip", 4, 256, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_both_triton_kernel_forms_and_their_tiles(config, layout):
    """The flat kernel (default) and the strip kernel it replaced, with tiles smaller and larger than a row of patches,
    on any strides: both are timed on the GPU by benchmarks/tune_triton_ops.py, so both must be right."""
    from fastmim.ops._dispatch import triton_problem

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = triton_problem(device)
    if why:
        pytest.skip(why)
    from fastmim.ops.triton import patchify as kernels

    b, c, p, gh, gw = 2, 3, 4, 3, 5
    imgs = torch.randn(b, c, gh * p + 2, gw * p + 3, device=device)
    if layout == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    imgs = imgs[:, :, 1 : 1 + gh * p, 2 : 2 + gw * p] if layout == "sliced" else imgs[:, :, : gh * p, : gw * p]
    want = patchify_ref(imgs, p)
    assert torch.equal(kernels.patchify(imgs, p, config), want)
    pat = torch.randn(b, gh * gw, p * p * c + 5, device=device)[:, :, 3 : 3 + p * p * c]  # rows with a stride
    assert torch.equal(kernels.unpatchify(pat, p, (gh, gw), c, config), unpatchify_ref(pat, p, (gh, gw), c))


def test_the_cuda_patchify_takes_patches_the_gpus_shared_memory_holds(monkeypatch):
    """The CUDA kernel holds one patch in shared memory: up to 200 KiB on an H100 (227 KiB opt-in), but an RTX 4090
    opts in to 99 KiB a block, where a 64-pixel fp32 RGB patch (48 KiB) fits and a 112-pixel one (147 KiB) goes to
    Triton instead of failing its launch."""
    import sys

    from fastmim.ops import _cuda as cuda_ops

    patchify_module = sys.modules["fastmim.ops.patchify"]  # (fastmim.ops.patchify is also the function's name)

    class Props:
        def __init__(self, optin):
            self.shared_memory_per_block_optin = optin

    props = {0: Props(232448), 1: Props(101376)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    patchify_module._shared_memory_limit.cache_clear()
    try:
        fits = patchify_module._cuda_fits
        h100, rtx = torch.device("cuda", 0), torch.device("cuda", 1)
        assert fits(3, 64, 4, h100) and fits(3, 64, 4, rtx)
        assert fits(3, 112, 4, h100) and not fits(3, 112, 4, rtx)
        assert not fits(3, 160, 4, h100)  # 300 KiB: over the kernel's own 200 KiB bound everywhere
        assert patchify_module._shared_memory_limit(0) == cuda_ops.PATCHIFY_MAX_BYTES
    finally:
        patchify_module._shared_memory_limit.cache_clear()
