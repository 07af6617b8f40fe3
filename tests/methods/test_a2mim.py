"""A2MIM on a ViT: the loss against A2MIM's formula written out (SimMIM's L1 on masked pixels + 0.1 x the focal
frequency loss of the mixed reconstruction), masked patches enter the encoder as the image's channel means plus the
mask token, fused and reference paths agree, and the CLI trains it."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.masking import random_masking
from fastmim.ops import fft_loss_ref
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import ROOT, tiny_args_for
from tests.methods.test_simmim import official_loss


def _tiny(**kw):
    torch.manual_seed(0)
    return fastmim.create_model("a2mim_vit_tiny_patch16", img_size=64, depth=2, **kw)


@pytest.mark.parametrize("fused_ops", [True, False])
def test_loss_is_l1_plus_a_tenth_of_the_frequency_loss(fused_ops):
    m = _tiny(fused_ops=fused_ops)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    info = m.mask_strategy(seed=3)(indices=torch.arange(2), device="cpu").info()
    loss, pred, _ = m(imgs, mask=info)
    with torch.no_grad():
        rec = m.forward_decoder(m.forward_encoder(imgs, info.mask))
    want = official_loss(imgs, rec, info.mask, 16) + 0.1 * fft_loss_ref(rec, imgs, info.mask, 16)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    no_fft = _tiny(fused_ops=fused_ops, fft_weight=0.0)
    assert float(no_fft(imgs, mask=info)[0].detach()) == pytest.approx(float(official_loss(imgs, rec, info.mask, 16)),
                                                                       rel=1e-5)  # fmt: skip


def test_masked_patches_enter_as_channel_means_plus_the_mask_token():
    m = _tiny().eval()
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    info = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    seen, with_pos = {}, m.with_pos
    handle = m.patch_embed.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], out=out))
    m.with_pos = lambda x: seen.update(tokens=x) or with_pos(x)
    with torch.no_grad():
        m.mask_token.normal_(generator=torch.Generator().manual_seed(3))
        m.forward_encoder(imgs, info.mask)
    handle.remove()
    added = seen["out"] + m.mask_token.detach() * info.mask.unsqueeze(-1)  # plus, not instead (SimMIM's)
    torch.testing.assert_close(seen["tokens"], added, rtol=0, atol=1e-6)
    pix = info.mask.view(2, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1).bool()
    means = imgs.mean(dim=(2, 3), keepdim=True).expand_as(imgs)
    torch.testing.assert_close(seen["x"][pix.expand_as(imgs)], means[pix.expand_as(imgs)])  # filled with the means
    torch.testing.assert_close(seen["x"][~pix.expand_as(imgs)], imgs[~pix.expand_as(imgs)])  # visible: unchanged


def test_gradients_agree_between_fused_and_reference():
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    info = random_masking(2, 16, 0.6, generator=torch.Generator().manual_seed(2))
    out = []
    for fused in (True, False):
        m = _tiny(fused_ops=fused)
        loss = m(imgs, mask=info)[0]
        loss.backward()
        out.append((loss.detach(), m.decoder[0].weight.grad.clone(), m.mask_token.grad.clone()))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_a2mim_pretrains_from_the_cli(image_folder, tmp_path):
    out = tmp_path / "a2mim"
    args = [*tiny_args_for("a2mim_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
            "--max-steps", "2"]  # fmt: skip
    pretrain.run(args)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and "mask_token" in state["model"] and (out / "encoder.safetensors").exists()


def test_head_and_encoder_are_drawn_as_openmixups():
    """openmixup's NonLinearMIMNeck draws the 1x1 convolution from a truncated normal 0.02 with a zero bias (PyTorch's
    default, kept by SimMIM, is a uniform draw within 1/sqrt(fan_in) with a uniform bias); its ViT's init_weights,
    run after its layers' xavier draw, leaves every linear a truncated normal 0.02 with a zero bias (``init="trunc"``,
    the config's)."""

    torch.manual_seed(0)
    m = fastmim.create_model("a2mim_vit_base_patch16", depth=1, init="trunc").requires_grad_(False)
    conv = m.decoder[0]
    bound = conv.weight.shape[1] ** -0.5  # PyTorch's default draw stays within it
    assert torch.count_nonzero(conv.bias) == 0
    assert float(conv.weight.abs().max()) > 1.5 * bound  # a normal's tails, not a uniform
    assert float(conv.weight.std()) == pytest.approx(0.02, rel=0.02)
    for lin in (m.blocks[0].attn.qkv, m.blocks[0].mlp.fc1, m.blocks[0].mlp.fc2):
        assert torch.count_nonzero(lin.bias) == 0
        assert float(lin.weight.std()) == pytest.approx(0.02, rel=0.03)
    simmim = fastmim.create_model("simmim_vit_base_patch16", depth=1).requires_grad_(False)
    assert float(simmim.decoder[0].weight.abs().max()) <= bound  # SimMIM keeps PyTorch's default
    cfg, _ = pretrain.resolve_config(["--config", str(ROOT / "configs" / "a2mim_vit_base_in1k.yaml")])
    assert (cfg.vit_init, cfg.abs_pos) == ("trunc", "learned")


def test_paper_config_keeps_openmixups_images_per_forward_pass():
    """The frequency loss compares spectra averaged over one forward pass's images, so splitting a batch changes it
    (accumulation does not undo that): the ViT-B config must pass openmixup's 128 images per process (8 x 128 x 2)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 3, 32, 32, generator=g)
    pred = target + 0.5 * torch.randn(8, 3, 32, 32, generator=g)
    whole = fft_loss_ref(pred, target)
    halves = (fft_loss_ref(pred[:4], target[:4]) + fft_loss_ref(pred[4:], target[4:])) / 2
    assert float(halves) > 1.3 * float(whole)  # independent errors: the smaller passes' term is larger
    cfg, _ = pretrain.resolve_config(["--config", str(ROOT / "configs" / "a2mim_vit_base_in1k.yaml")])
    assert (cfg.batch_size, cfg.batch_size * cfg.accum_iter * 8) == (128, 2048)
