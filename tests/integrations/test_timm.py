"""MAE around a user's timm ViT and FCMAE from a timm ConvNeXt V2 (fastmim.create_model("mae"|"fcmae", encoder=...))."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim.masking.random import random_masking
from fastmim.methods import MaskedAutoencoderViT

timm = pytest.importorskip("timm", reason="timm is a test dependency")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SHAPE = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def test_mae_around_a_timm_vit_equals_fastmims_mae_with_the_same_weights():
    """Loss, prediction and the gradient of every shared weight, for the same mask."""
    torch.manual_seed(0)
    wrapped = fastmim.create_model("mae", encoder=VisionTransformer(num_classes=0, **SHAPE), **DECODER)
    ours = MaskedAutoencoderViT(**SHAPE, **DECODER)
    state = {k.removeprefix("encoder."): v for k, v in wrapped.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    imgs = torch.randn(3, 3, 32, 32)
    mask = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(1))
    la, pa, _ = wrapped(imgs, mask=mask)
    lb, pb, _ = ours(imgs, mask=mask)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    la.backward()
    lb.backward()
    grads = dict(ours.named_parameters())
    shared = 0
    trained = [(name, p) for name, p in wrapped.named_parameters() if p.requires_grad]
    for name, p in trained:
        q = grads[name.removeprefix("encoder.")]
        if q.grad is None:  # fastmim's fixed position embedding; timm's is learned
            assert name == "encoder.pos_embed"
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        shared += 1
    assert shared == len(trained) - 1


@pytest.mark.parametrize("target", [dict(target="hog", hog_bins=6, gaussian_window=8),
                                    dict(target="lowpass", low_pass_radius=5.0)], ids=["hog", "lowpass"])  # fmt: skip
def test_mae_around_a_timm_vit_takes_the_targets_of_fastmims_mae(target):
    """target=hog|lowpass on the wrapper: the same head size, loss and encoder gradients as fastmim's MAE with that
    target and the same weights."""
    torch.manual_seed(0)
    wrapped = fastmim.create_model("mae", encoder=VisionTransformer(num_classes=0, **SHAPE), **DECODER, **target)
    ours = MaskedAutoencoderViT(**SHAPE, **DECODER, **target)
    ours.load_state_dict({k.removeprefix("encoder."): v for k, v in wrapped.state_dict().items()}, strict=True)
    assert wrapped.decoder_pred.out_features == ours.decoder_pred.out_features
    imgs = torch.randn(2, 3, 32, 32)
    mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    la, pa, _ = wrapped(imgs, mask=mask)
    lb, pb, _ = ours(imgs, mask=mask)
    pixels, _, _ = ours.__class__(**SHAPE, **DECODER)(imgs, mask=mask)  # premise: the target changes the loss
    assert not torch.allclose(la, pixels)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.backward()
    lb.backward()
    torch.testing.assert_close(wrapped.encoder.blocks[0].attn.qkv.weight.grad, ours.blocks[0].attn.qkv.weight.grad,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    if target["target"] == "hog":
        assert not wrapped.predicts_pixels
    else:
        assert wrapped.reconstruct(imgs, pa).shape == imgs.shape


@pytest.mark.parametrize("kw", [dict(reg_tokens=4, no_embed_class=True), dict(reg_tokens=2),
                                dict(class_token=False, global_pool="avg")],
                         ids=["registers-no-embed-class", "registers", "no-class-token"])  # fmt: skip
def test_encoder_path_is_timms_own_forward_when_nothing_is_hidden(kw):
    """With every patch kept in order, the MAE encoder path is timm's forward_features (registers, position
    embeddings without class rows, no class token), and the weights load back into the timm model."""
    torch.manual_seed(0)
    vit = VisionTransformer(num_classes=0, **SHAPE, **kw).eval()
    model = fastmim.create_model("mae", encoder=vit, **DECODER)
    imgs = torch.randn(2, 3, 32, 32)
    keep = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        ours = model.forward_encoder(imgs, keep)
        ref = vit.forward_features(imgs)
    n_prefix = vit.num_prefix_tokens
    torch.testing.assert_close(ours[:, 1:], ref[:, n_prefix:], rtol=1e-5, atol=1e-5)
    first = ref[:, :1] if vit.cls_token is not None else ref[:, n_prefix:].mean(1, keepdim=True)
    torch.testing.assert_close(ours[:, :1], first, rtol=1e-5, atol=1e-5)
    loss, _, _ = model.train()(imgs)
    loss.backward()
    if kw.get("reg_tokens"):
        assert vit.reg_token.grad is not None and vit.reg_token.grad.abs().sum() > 0
    fresh = VisionTransformer(num_classes=0, **SHAPE, **kw)
    fresh.load_state_dict(model.encoder_state_dict(), strict=True)


def test_a_distilled_deit_keeps_its_distillation_token_and_a_rotary_vit_is_refused():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    vit = VisionTransformerDistilled(num_classes=0, **SHAPE).eval()
    model = fastmim.create_model("mae", encoder=vit, **DECODER)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_encoder(imgs, torch.arange(16).expand(2, -1))
        ref = vit.forward_features(imgs)
    torch.testing.assert_close(ours, torch.cat([ref[:, :1], ref[:, 2:]], 1), rtol=1e-5, atol=1e-5)  # no dist row
    loss, _, _ = model.train()(imgs)
    loss.backward()
    assert vit.dist_token.grad is not None and vit.dist_token.grad.abs().sum() > 0
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=28, num_classes=0, depth=1)
    assert eva.pos_embed is not None  # premise: it passes the position-embedding check; its rope is what is refused
    with pytest.raises(ValueError, match="Eva applies a rotary position embedding"):
        fastmim.create_model("mae", encoder=eva, **DECODER)


def test_wrapping_refuses_what_it_cannot_mask():
    with pytest.raises(ValueError, match="wraps your timm ViT"):
        fastmim.create_model("mae")
    with pytest.raises(ValueError, match="no absolute position embedding"):
        fastmim.create_model("mae", encoder=VisionTransformer(num_classes=0, pos_embed="none", **SHAPE))
    with pytest.raises(ValueError, match="expected a timm VisionTransformer"):
        fastmim.create_model("mae", encoder=torch.nn.Linear(3, 3))
    vit = VisionTransformer(num_classes=0, **SHAPE)
    refused = [(dict(mask_type="uniform", mask_ratio=0.6), "mask_ratio=0.75"),  # at construction, not at the forward
               (dict(mask_type="grid"), "mask_type must be one of"), (dict(mask_ratio=1.0), "mask_ratio"),
               (dict(target="hog", norm_pix_loss=False), "norm_pix_loss applies to pixel targets"),
               (dict(target="pixels", hog_bins=6), "hog_bins applies to target='hog'")]  # fmt: skip
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            fastmim.create_model("mae", encoder=vit, **DECODER, **kwargs)


def test_fcmae_from_a_timm_convnext_v2_holds_its_weights_and_gives_them_back():
    torch.manual_seed(0)
    src = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)
    model = fastmim.create_model("fcmae", encoder=src, img_size=64)
    back = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)
    back.load_state_dict(model.encoder_state_dict(), strict=True)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    loss, _, _ = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="expected a timm ConvNeXt V2"):
        fastmim.create_model("fcmae", encoder=timm.create_model("convnext_atto", pretrained=False))
    norm_first = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0, head_norm_first=True)
    with pytest.raises(ValueError, match="head_norm_first=True"):
        fastmim.create_model("fcmae", encoder=norm_first)
