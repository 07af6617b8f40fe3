"""fastmim.ops on CUDA at MAE ViT-B/16 scale, bf16 as under autocast, for both GPU backends (Triton and the CUDA
kernels of fastmim._cuda; run by benchmarks/gpu_suite.sh, skipped where torch sees no GPU). The small-shape backend
tests in this folder also run their cuda-* cases there (odd sizes: the kernels' element-wise paths); the shapes here
take the 16-byte vector paths. Before each op the allocator's cache is filled with NaN, so an output element a kernel
fails to write shows up."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim import _ext
from fastmim.masking import random_masking
from fastmim.ops import (
    gather_visible,
    gather_visible_ref,
    masked_mse_loss,
    masked_mse_loss_patchified,
    masked_mse_loss_patchified_ref,
    masked_mse_loss_ref,
    patchify,
    patchify_ref,
    scatter_masked,
    scatter_masked_ref,
    unpatchify,
    unpatchify_ref,
)
from tests.ops.helpers import check_against_reference

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [
    "triton",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not _ext.cuda_available(), reason=f"fastmim._cuda not built: {_ext.cuda_load_error}"),
    ),
]


def poison(mb: int = 512) -> None:
    """Fills the caching allocator's free memory with NaN: the next allocations reuse it."""
    junk = torch.full((mb * 2**18,), float("nan"), device="cuda")
    del junk


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request, monkeypatch):
    monkeypatch.setenv("FASTMIM_BACKEND", request.param)
    return request.param


@pytest.fixture
def mae_shapes(gpu_backend):
    torch.manual_seed(0)
    b, n = 64, 196
    poison()
    return b, n, random_masking(b, n, 0.75, device="cuda")


def test_gather_scatter_at_vit_b_scale(mae_shapes):
    b, n, info = mae_shapes
    x = torch.randn(b, n, 768, device="cuda", requires_grad=True)
    check_against_reference(gather_visible, gather_visible_ref, [x, info.ids_keep], "gather fp32")
    xv = torch.randn(b, 49, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cls = torch.randn(b, 1, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mt = torch.randn(1, 1, 512, device="cuda", requires_grad=True)
    pos = torch.randn(1, n + 1, 512, device="cuda")
    check_against_reference(scatter_masked, scatter_masked_ref, [xv, info.ids_restore, mt, pos, cls], "scatter")


@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16])
def test_loss_at_vit_b_scale(mae_shapes, pred_dtype):
    b, n, info = mae_shapes
    imgs = torch.randn(b, 3, 224, 224, device="cuda")
    pred = torch.randn(b, n, 768, device="cuda", dtype=pred_dtype, requires_grad=True)
    check_against_reference(
        lambda p: masked_mse_loss(p, imgs, info.mask, 16), lambda p: masked_mse_loss_ref(p, imgs, info.mask, 16),
        [pred], f"loss {pred_dtype}", rtol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patchify_at_vit_b_scale(gpu_backend, dtype):
    poison()
    imgs = torch.randn(32, 3, 224, 224, device="cuda", dtype=dtype)
    out = patchify(imgs, 16)
    assert torch.equal(out, patchify_ref(imgs, 16)), "patchify is a permutation: bit for bit"
    back = unpatchify(out, 16, (14, 14), 3)
    assert torch.equal(back, unpatchify_ref(out, 16, (14, 14), 3))
    # strided: a channels-last image and a transposed patch tensor
    cl = imgs.contiguous(memory_format=torch.channels_last)
    assert torch.equal(patchify(cl, 16), patchify_ref(imgs, 16))
    pt = out.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(unpatchify(pt, 16, (14, 14), 3), back)
    check_against_reference(lambda x: patchify(x, 16), lambda x: patchify_ref(x, 16),
                            [imgs.float().requires_grad_()], "patchify grad")  # fmt: skip


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_tokens_ids_int32_and_bad_ids(gpu_backend, ids_dtype):
    """int32 ids work; an id out of range gives a NaN row (never an out-of-bounds read) on CUDA without checks."""
    poison()
    b, n, d = 8, 196, 768
    info = random_masking(b, n, 0.75, device="cuda")
    x = torch.randn(b, n, d, device="cuda")
    ids = info.ids_keep.to(ids_dtype)
    assert torch.equal(gather_visible(x, ids), gather_visible_ref(x, info.ids_keep))
    bad = ids.clone()
    bad[0, 3] = n + 5
    out = gather_visible(x, bad)
    assert torch.isnan(out[0, 3]).all() and not torch.isnan(out[1:]).any()
    restore = info.ids_restore.to(ids_dtype)
    xv = torch.randn(b, 49, 512, device="cuda", dtype=torch.bfloat16)
    mt = torch.randn(512, device="cuda")
    assert torch.equal(scatter_masked(xv, restore, mt), scatter_masked_ref(xv, info.ids_restore, mt))


def test_loss_patchified_and_l1_at_scale(mae_shapes):
    b, n, info = mae_shapes
    tgt = torch.randn(b, n, 768, device="cuda")
    pred = torch.randn(b, n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    check_against_reference(
        lambda p: masked_mse_loss_patchified(p, tgt, info.mask),
        lambda p: masked_mse_loss_patchified_ref(p, tgt, info.mask), [pred], "patchified loss",
    )  # fmt: skip
    imgs = torch.randn(b, 3, 224, 224, device="cuda")
    check_against_reference(
        lambda p: masked_mse_loss(p, imgs, info.mask, 16, norm_pix=False, p=1),
        lambda p: masked_mse_loss_ref(p, imgs, info.mask, 16, norm_pix=False, p=1), [pred], "L1 loss",
    )  # fmt: skip


def test_ops_are_deterministic(mae_shapes):
    """The same inputs give bit-identical values and gradients run after run (no atomics in the reductions)."""
    b, n, info = mae_shapes
    imgs = torch.randn(b, 3, 224, 224, device="cuda")
    xv = torch.randn(b, 49, 512, device="cuda", dtype=torch.bfloat16)
    mt = torch.randn(512, device="cuda")
    runs = []
    for _ in range(2):
        gen = torch.Generator("cuda").manual_seed(1)
        pred = torch.randn(b, n, 768, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        x, m = xv.clone().requires_grad_(), mt.clone().requires_grad_()
        loss = masked_mse_loss(pred, imgs, info.mask, 16)
        out = scatter_masked(x, info.ids_restore, m)
        (loss + out.float().square().mean()).backward()
        runs.append((loss.detach(), pred.grad, x.grad, m.grad))
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mae_fused_step_matches_reference_under_bf16_autocast(backend, monkeypatch):
    monkeypatch.setenv("FASTMIM_BACKEND", backend)
    torch.manual_seed(0)
    fused = fastmim.create_model("mae_vit_base_patch16").cuda()
    plain = fastmim.create_model("mae_vit_base_patch16", fused_ops=False).cuda()
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(16, 3, 224, 224, device="cuda")
    mask = random_masking(16, 196, 0.75, device="cuda")
    losses, grads = [], []
    for m in (fused, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = m(imgs, mask=mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    # the same bf16 matmuls on the same inputs: only the fused ops' fp32 summation order differs
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.999, f"gradient cosine similarity {cos:.5f}"


def test_id_checks_on_cuda_on_request(monkeypatch):
    """FASTMIM_CHECK_IDS=1 turns the (host-syncing) id checks on for CUDA tensors too; without it bad ids give NaN."""
    x = torch.randn(2, 8, 4, device="cuda")
    ids = torch.tensor([[0, 9], [1, 2]], device="cuda")
    assert torch.isnan(gather_visible(x, ids)[0, 1]).all()
    monkeypatch.setenv("FASTMIM_CHECK_IDS", "1")
    with pytest.raises(IndexError, match=r"ids_keep\[0, 1\] = 9 is out of range \[0, 8\)"):
        gather_visible(x, ids)
    with pytest.raises(ValueError, match="repeats index 1"):
        gather_visible(x, torch.tensor([[1, 1], [0, 2]], device="cuda"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on a GPU that is not the current)")
def test_ops_on_a_gpu_that_is_not_current(gpu_backend):
    """A library call on cuda:1 with cuda:0 current (no set_device) gives what the same call with cuda:1 current
    gives, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 196, 64, generator=g)
    imgs = torch.randn(8, 3, 224, 224, generator=g)
    pred = torch.randn(8, 196, 768, generator=g)
    info = random_masking(8, 196, 0.75, generator=g)
    results = []
    for current in (1, 0):
        with torch.cuda.device(current):
            xc = x.to("cuda:1").requires_grad_()
            pc = pred.to("cuda:1").requires_grad_()
            ic = imgs.to("cuda:1")
            vis = gather_visible(xc, info.ids_keep.to("cuda:1"))
            loss = masked_mse_loss(pc, ic, info.mask.to("cuda:1"), 16)
            (vis.square().mean() + loss).backward()
            results.append((vis, loss, xc.grad, pc.grad, patchify(ic, 16)))
    torch.cuda.synchronize(1)
    for a, b in zip(results[0], results[1], strict=True):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a, b, rtol=0, atol=0)
