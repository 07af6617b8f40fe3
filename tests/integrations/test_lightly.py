"""fastmim.integrations.lightly: lightly's own MAE (its modules, its helpers, as its example writes it) against the
same modules run with fastmim's equivalents: loss and every gradient equal."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("lightly", reason="the lightly integration's tests need lightly (pip install 'fastmim[lightly]')")
pytest.importorskip("timm", reason="lightly's MAE modules are built on timm")
from lightly.models import utils  # noqa: E402
from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fastmim.integrations import lightly as fl  # noqa: E402


def lightly_mae(seed: int = 0):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0)
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MAEDecoderTIMM's deprecation notice (lightly 1.6)
        decoder = MAEDecoderTIMM(num_patches=16, patch_size=8, embed_dim=48, decoder_embed_dim=32, decoder_depth=1,
                                 decoder_num_heads=4)  # fmt: skip
    return backbone, decoder


def lightly_loss(backbone, decoder, images, idx_keep, idx_mask):
    """lightly's MAE example, step by step."""
    x = backbone.encode(images=images, idx_keep=idx_keep)
    x = decoder.embed(x)
    masked = utils.repeat_token(decoder.mask_token, (images.shape[0], backbone.sequence_length))
    masked = utils.set_at_index(masked, idx_keep, x.type_as(masked))
    pred = decoder.predict(utils.get_at_index(decoder.decode(masked), idx_mask))
    target = utils.get_at_index(utils.patchify(images, 8), idx_mask - 1)
    return torch.nn.MSELoss()(pred, target)


def fastmim_loss(backbone, decoder, images, idx_keep, idx_mask, norm_pix=False):
    x = decoder.embed(backbone.encode(images=images, idx_keep=idx_keep))
    pred = decoder.predict(fl.get_at_index(fl.decode_masked(decoder, x, idx_keep, idx_mask), idx_mask))
    return fl.mae_loss(pred, images, idx_mask, 8, norm_pix=norm_pix)


def _grads(modules, loss):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_fastmims_helpers_give_lightlys_mae_loss_and_gradients():
    backbone, decoder = lightly_mae()
    images = torch.randn(3, 3, 32, 32)
    idx_keep, idx_mask = utils.random_token_mask((3, backbone.sequence_length), mask_ratio=0.75)
    a = lightly_loss(backbone, decoder, images, idx_keep, idx_mask)
    b = fastmim_loss(backbone, decoder, images, idx_keep, idx_mask)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(_grads((backbone, decoder), a), _grads((backbone, decoder), b), strict=True):
        if ga is None:
            assert gb is None
        else:
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_patch_lightly_makes_its_encoder_gather_with_fastmim_and_undoes():
    backbone, _ = lightly_mae()
    images = torch.randn(2, 3, 32, 32)
    idx_keep, _ = utils.random_token_mask((2, backbone.sequence_length), mask_ratio=0.75)
    want = backbone.encode(images=images, idx_keep=idx_keep)
    torch.manual_seed(1)
    grid = utils.random_grid_token_mask(size=(2, 17), mask_ratio=0.5, grid_size=2)  # (it gathers integer indices)
    try:
        fl.patch_lightly()
        fl.patch_lightly()
        assert fl.is_patched() and utils.get_at_index is fl.get_at_index
        torch.testing.assert_close(backbone.encode(images=images, idx_keep=idx_keep), want)
        torch.manual_seed(1)
        for a, b in zip(utils.random_grid_token_mask(size=(2, 17), mask_ratio=0.5, grid_size=2), grid, strict=True):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="repeats index 1.*must be distinct.*unpatch_lightly\\(\\) restores"):
            utils.get_at_index(torch.randn(2, 10, 6), torch.tensor([[1, 1, 2], [3, 4, 5]]))  # lightly's own takes it
    finally:
        fl.unpatch_lightly()
    assert not fl.is_patched()
    assert utils.get_at_index(torch.randn(2, 10, 6), torch.tensor([[1, 1, 2], [3, 4, 5]])).shape == (2, 3, 6)


def test_mae_loss_with_norm_pix_is_maes_normalised_target():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    idx_keep, idx_mask = utils.random_token_mask((2, 17), mask_ratio=0.75)
    pred = torch.randn(2, idx_mask.shape[1], 192)
    target = utils.get_at_index(utils.patchify(images, 8), idx_mask - 1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(fl.mae_loss(pred, images, idx_mask, 8, norm_pix=True),
                               torch.nn.MSELoss()(pred, target), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_decode_masked_refuses_indices_that_do_not_cover_the_tokens():
    _, decoder = lightly_mae()
    with pytest.raises(ValueError, match="must cover the decoder's 17 token positions"):
        fl.decode_masked(decoder, torch.randn(1, 5, 32), torch.arange(5)[None], torch.arange(5, 16)[None])
    with pytest.raises(TypeError, match="expected lightly's MAEDecoderTIMM"):
        fl.decode_masked(torch.nn.Linear(2, 2), torch.randn(1, 5, 32), torch.arange(5)[None], torch.arange(5)[None])


@pytest.mark.parametrize(
    "idx_mask, loss_error, decode_error",
    [
        ([[2, 2]], "idx_mask row 0 repeats index 2", " row 0 repeats index 2"),
        ([[2, 17]], r"idx_mask\[0, 1\] = 17 is out of range \[1, 17\)", r"\[0, 16\] = 17 is out of range \[0, 17\)"),
        ([[0, 3]], r"idx_mask\[0, 0\] = 0 is out of range \[1, 17\)", " row 0 repeats index 0"),  # the class token
    ],
    ids=["repeated", "past the last patch", "the class token"],
)
def test_mae_loss_and_decode_masked_refuse_indices_lightly_would_not_make(idx_mask, loss_error, decode_error):
    """A repeated or out-of-range masked token (lightly's masks never make one) is named, not silently counted once or
    misplaced (the positions are sorted into a permutation, which would hide it)."""
    imgs, pred = torch.randn(1, 3, 32, 32), torch.randn(1, 2, 192)
    with pytest.raises((ValueError, IndexError), match=f"mae_loss: {loss_error}"):
        fl.mae_loss(pred, imgs, torch.tensor(idx_mask), 8)
    _, decoder = lightly_mae()
    keep = torch.tensor([[i for i in range(17) if i not in (2, 3)][:15]])  # 15 kept + 2 masked = 17 positions
    with pytest.raises((ValueError, IndexError), match=r"decode_masked: cat\(idx_keep, idx_mask\)" + decode_error):
        fl.decode_masked(decoder, torch.randn(1, 15, 32), keep, torch.tensor(idx_mask))


def test_shapes_that_do_not_fit_the_indices_are_named_with_the_callers_names():
    """lightly's own MSELoss / set_at_index raise on these; the fused equivalents must too (a pred with too few rows
    would compare the missing patches with zeros, too many would be dropped, swapped indices would misplace tokens)."""
    backbone, decoder = lightly_mae()
    images = torch.randn(2, 3, 32, 32)
    idx_keep, idx_mask = utils.random_token_mask((2, backbone.sequence_length), mask_ratio=0.75)  # 5 kept, 12 masked
    for rows in (5, 13):
        with pytest.raises(ValueError, match=rf"mae_loss: pred has shape \(2, {rows}, 192\), expected \(2, 12, 192\)"):
            fl.mae_loss(torch.randn(2, rows, 192), images, idx_mask, 8)
    with pytest.raises(ValueError, match=r"mae_loss: pred has shape \(2, 12, 100\), expected \(2, 12, 192\)"):
        fl.mae_loss(torch.randn(2, 12, 100), images, idx_mask, 8)
    with pytest.raises(ValueError, match=r"mae_loss: idx_mask must be \[B=2, K\] int64"):
        fl.mae_loss(torch.randn(1, 12, 192), images, idx_mask[:1], 8)
    x = decoder.embed(backbone.encode(images=images, idx_keep=idx_keep))
    with pytest.raises(ValueError, match="are idx_keep and idx_mask swapped"):
        fl.decode_masked(decoder, x, idx_mask, idx_keep)
    for bad in (x[:, :3], torch.cat([x, x], 1)):
        with pytest.raises(ValueError, match=f"decode_masked: x has {bad.shape[1]} tokens and idx_keep 5"):
            fl.decode_masked(decoder, bad, idx_keep, idx_mask)
    with pytest.raises(ValueError, match=r"get_at_index: index must be \[B=2, K\] int64 .* got torch.float32"):
        fl.get_at_index(x, idx_keep.float())


def test_example_script_trains_lightlys_mae_with_fastmims_ops():
    import math
    import re

    from tests.conftest import run_cli

    # --steps 8 at batch 16: more than the 6 batches of the 100 built-in photos, so a second epoch (it stopped at 6)
    r = run_cli(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--steps", "8", "--batch-size", "16",
                 "--device", "cpu"], module=["examples/lightly_mae.py"], timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", r.stdout)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses) and "done: 8 steps" in r.stdout
    assert "epoch 2 step 7" in r.stdout
    assert "Warning" not in r.stderr, r.stderr[-2000:]  # a new user's first lines: no notices that are not theirs
    r = run_cli(["--model", "resnet18", "--steps", "1"], module=["examples/lightly_mae.py"], timeout=300)
    assert r.returncode == 2 and "--model resnet18" in r.stderr and "timm ViT" in r.stderr, r.stderr[-2000:]
