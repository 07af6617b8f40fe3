"""fastmim.ops on CUDA at MAE ViT-B/16 scale, bf16 as under autocast (run by benchmarks/gpu_suite.sh; skipped where
torch sees no GPU). The small-shape backend tests in this folder also run their cuda-* cases there."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim.masking import random_masking
from fastmim.ops import (
    gather_visible,
    gather_visible_ref,
    masked_mse_loss,
    masked_mse_loss_ref,
    scatter_masked,
    scatter_masked_ref,
)
from tests.ops.helpers import check_against_reference

pytestmark = pytest.mark.gpu


@pytest.fixture
def mae_shapes(monkeypatch):
    monkeypatch.setenv("FASTMIM_BACKEND", "triton")
    torch.manual_seed(0)
    b, n = 64, 196
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


def test_mae_fused_step_matches_reference_under_bf16_autocast():
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
