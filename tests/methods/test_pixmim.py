"""PixMIM: the low-pass target (the fused op behind ``low_pass_images``) against a float64 NumPy implementation of the
official formula, and the recipe's loss against MAE's loss on those targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmim.masking import random_masking
from fastmim.ops import masked_mse_loss_ref
from fastmim.targets import low_pass_images
from fastmim.targets.low_pass import default_radius, low_pass_filter
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import TINY_ARGS
from tests.ops.test_low_pass_target import official_numpy


@pytest.mark.parametrize(("h", "w", "radius"), [(32, 32, 5.7), (24, 18, 4.0), (17, 17, 3.0)])
def test_low_pass_images_match_the_official_formula(h, w, radius):
    imgs = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
    got = low_pass_images(imgs, radius)
    want = official_numpy(imgs.double().numpy(), radius)
    assert got.dtype == torch.float32 and got.shape == imgs.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_full_radius_keeps_the_image_and_zero_radius_keeps_its_mean():
    """Every frequency kept: the image itself (its pixels are >= 0 in [0, 1]); only the centre: a flat image."""
    x01 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imgs = (x01 - mean) / std
    torch.testing.assert_close(low_pass_images(imgs, 100.0), imgs, rtol=1e-5, atol=1e-5)
    assert low_pass_filter(16, 16, 0.0).sum() == 0  # the centre (7.5, 7.5) falls between bins: nothing kept
    flat = low_pass_images(imgs, 0.8)  # the four bins around the centre: still smooth, not the image
    assert float((flat - imgs).abs().mean()) > 0.1
    with pytest.raises(ValueError, match="radius must be >= 0"):
        low_pass_filter(4, 4, -1.0)


def test_pixmim_loss_is_mae_loss_on_low_pass_targets():
    torch.manual_seed(0)
    m = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, decoder_depth=1)
    assert m.low_pass_radius == pytest.approx(default_radius(64)) == pytest.approx(40 * 64 / 224)
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    loss, pred, _ = m(imgs, mask=mask)
    want = masked_mse_loss_ref(pred.detach(), low_pass_images(imgs, m.low_pass_radius), mask.mask, 16)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    plain = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1)
    plain.load_state_dict(m.state_dict())  # the same weights and keys as MAE's
    assert abs(float(plain(imgs, mask=mask)[0].detach()) - float(loss.detach())) > 1e-4  # another target, another loss
    rec = m.reconstruct(imgs, pred)
    assert rec.shape == imgs.shape and torch.isfinite(rec).all()
    with pytest.raises(ValueError, match="low_pass_radius must be a finite number >="):
        fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, low_pass_radius=0)


def test_the_low_pass_target_takes_the_images_normalisation():
    """The filter acts on the un-normalised image, so images normalised another way (mean 0.5, std 0.5) need their
    own constants: ImageNet's were the only ones, and gave another target. Another channel count takes its own."""
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    half = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    m = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, **half)
    r = m.low_pass_radius
    torch.testing.assert_close(m.target_images(imgs), low_pass_images(imgs, r, half["image_mean"], half["image_std"]))
    assert (m.target_images(imgs) - low_pass_images(imgs, r)).abs().max() > 1e-2  # ImageNet's: another target
    for name in ("mae_vit_tiny_patch16", "simmim_vit_tiny_patch16"):
        other = fastmim.create_model(name, img_size=64, target="lowpass", **half)
        torch.testing.assert_close(other.target_images(imgs), m.target_images(imgs))
    grey = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, in_chans=1, image_mean=(0.5,),
                                image_std=(0.25,))  # fmt: skip
    assert torch.isfinite(grey(torch.randn(2, 1, 64, 64))[0])
    with pytest.raises(ValueError, match="for in_chans=1 give image_mean and image_std"):
        fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, in_chans=1)
    with pytest.raises(ValueError, match="image_std must be > 0"):
        fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, image_mean=(0, 0, 0), image_std=(1, 0, 1))
    with pytest.raises(ValueError, match="image_mean must be 3 numbers, one per channel"):
        fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, image_mean=(0, 0), image_std=(1, 1))
    with pytest.raises(ValueError, match="image_mean applies to target='lowpass', not 'pixels'"):
        fastmim.create_model("mae_vit_tiny_patch16", img_size=64, **half)


def test_pixmim_without_fused_ops_runs_no_fastmim_op(monkeypatch):
    """fused_ops=False (--no-fused-ops, the benchmark's reference): the official low-pass computation, not the fused
    op; the same loss."""
    import fastmim.targets.low_pass as lp

    torch.manual_seed(0)
    fused = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, decoder_depth=1)
    plain = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, decoder_depth=1, fused_ops=False)
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    want = fused(imgs, mask=mask)[0]
    monkeypatch.setattr(lp, "low_pass_target", lambda *a: pytest.fail("the fused op ran with fused_ops=False"))
    torch.testing.assert_close(plain(imgs, mask=mask)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pixmim_pretrains_from_the_cli_and_exports_a_timm_encoder(image_folder, tmp_path):
    out = tmp_path / "pixmim"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "2"]
    args[args.index("--model") + 1] = "pixmim_vit_tiny_patch16"
    pretrain.run(args)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and state["config"]["model"] == "pixmim_vit_tiny_patch16"
    assert (out / "reconstructions" / "step_0000002.png").is_file()
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    from safetensors.torch import load_file

    enc = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=0
    )
    enc.load_state_dict(load_file(out / "encoder.safetensors"), strict=True)


def test_the_cli_refuses_another_normalisation_for_the_low_pass_target():
    """The CLI's loaders normalise with ImageNet's constants: other ones in model_args would filter the wrong image."""
    from fastmim.pretrain import resolve_config

    with pytest.raises(ValueError, match="model_args image_mean: fastmim's loaders normalise the images with ImageNet"):
        resolve_config(["--model", "pixmim_vit_tiny_patch16", "--model-args", "image_mean=0.5"])
