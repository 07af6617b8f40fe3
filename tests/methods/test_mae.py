"""MAE recipe: official state-dict layout, loss semantics, encoder-on-visible-tokens, decoder unshuffle."""

import math
import re

import pytest
import torch

import fastmim
from fastmim.masking import masking_from_noise
from fastmim.ops import masked_mse_loss_ref, patchify_ref, unpatchify_ref


def official_mae_base_shapes() -> dict[str, tuple]:
    """Keys and shapes of facebookresearch/mae's mae_vit_base_patch16 (models_mae.py), written out by hand."""
    d, dd, n, p = 768, 512, 196, 16
    shapes = {
        "cls_token": (1, 1, d), "pos_embed": (1, n + 1, d), "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd),
        "decoder_pos_embed": (1, n + 1, dd), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
        "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * 3, dd),
        "decoder_pred.bias": (p * p * 3,),
    }  # fmt: skip
    for prefix, width, depth in (("blocks", d, 12), ("decoder_blocks", dd, 8)):
        for i in range(depth):
            b = f"{prefix}.{i}."
            shapes.update({
                b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
            })  # fmt: skip
    return shapes


def tiny_mae(**kw):
    args = dict(img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    return fastmim.create_model("mae_vit_tiny_patch16", **{**args, **kw})


def test_state_dict_matches_official_mae_layout():
    with torch.device("meta"):
        m = fastmim.create_model("mae_vit_base_patch16")
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == official_mae_base_shapes()


def test_loss_against_hand_computed_values():
    # one image, 1 channel, 2x4 pixels, patch 2 -> two patches: [1, 2, 3, 4] (left) and [5, 6, 7, 8] (right)
    imgs = torch.tensor([[[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0]]]])
    pred = torch.zeros(1, 2, 4)
    mask = torch.tensor([[1.0, 0.0]])
    # norm-pix: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; mean of squares of normalised values
    expected = (5.0 / (5.0 / 3.0 + 1e-6)) / 4.0
    assert masked_mse_loss_ref(pred, imgs, mask, 2).item() == pytest.approx(expected, rel=1e-6)
    # raw pixels, only the masked (left) patch counts: (1 + 4 + 9 + 16) / 4
    assert masked_mse_loss_ref(pred, imgs, mask, 2, norm_pix=False).item() == pytest.approx(7.5)
    # both patches masked: mean over the two patches' errors; right one is (25 + 36 + 49 + 64) / 4 = 43.5
    both = torch.ones(1, 2)
    assert masked_mse_loss_ref(pred, imgs, both, 2, norm_pix=False).item() == pytest.approx((7.5 + 43.5) / 2)
    # L1 on pixels: (1 + 2 + 3 + 4) / 4
    assert masked_mse_loss_ref(pred, imgs, mask, 2, norm_pix=False, p=1).item() == pytest.approx(2.5)


def test_model_loss_equals_manual_norm_pix_mse():
    torch.manual_seed(0)
    m = tiny_mae()
    imgs = torch.randn(2, 3, 64, 64)
    loss, pred, mask = m(imgs)
    target = patchify_ref(imgs, 16)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    manual = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, manual)
    assert mask.shape == (2, 16) and (mask.sum(1) == 12).all()


def test_patchify_layout_is_channels_last_and_inverts():
    imgs = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    x = patchify_ref(imgs, 2)
    assert x.shape == (2, 6, 12)
    # patch 0, first vector entries are pixel (0,0) of channels 0,1,2
    assert x[0, 0, :3].tolist() == [imgs[0, 0, 0, 0].item(), imgs[0, 1, 0, 0].item(), imgs[0, 2, 0, 0].item()]
    assert torch.equal(unpatchify_ref(x, 2, (2, 3), 3), imgs)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        patchify_ref(torch.zeros(1, 3, 6, 8), 4)


def test_encoder_on_all_tokens_in_order_equals_full_vit():
    torch.manual_seed(0)
    m = tiny_mae().eval()
    imgs = torch.randn(2, 3, 64, 64)
    ids_all = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_encoder(imgs, ids_all), m.forward_features(imgs))


def test_encoder_sees_only_visible_patches():
    torch.manual_seed(0)
    m = tiny_mae().eval()
    info = masking_from_noise(torch.rand(1, 16), 4)
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    pix = info.mask.reshape(1, 1, 4, 1, 4, 1).expand(1, 3, 4, 16, 4, 16).reshape(1, 3, 64, 64)
    b = torch.where(pix.bool(), b, a)  # same visible patches, different masked ones
    with torch.no_grad():
        torch.testing.assert_close(m.forward_encoder(a, info.ids_keep), m.forward_encoder(b, info.ids_keep))


def test_decoder_places_visible_latents_and_mask_tokens():
    torch.manual_seed(0)
    m = tiny_mae().eval()
    info = masking_from_noise(torch.rand(2, 16), 4)
    latent = torch.randn(2, 5, 192)
    seen = {}
    m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        m.forward_decoder(latent, info.ids_restore)
        x = seen["x"] - m.decoder_pos_embed  # [B, 17, 64]
        emb = m.decoder_embed(latent)
        for b in range(2):
            torch.testing.assert_close(x[b, 0], emb[b, 0])
            for j, tok in enumerate(info.ids_keep[b].tolist()):
                torch.testing.assert_close(x[b, 1 + tok], emb[b, 1 + j])
            for tok in torch.nonzero(info.mask[b]).flatten().tolist():
                torch.testing.assert_close(x[b, 1 + tok], m.mask_token[0, 0])


def test_block_mask_type_trains_with_exact_count():
    torch.manual_seed(0)
    m = tiny_mae(mask_type="block", mask_ratio=0.6)
    loss, _, mask = m(torch.randn(3, 3, 64, 64))
    loss.backward()
    assert (mask.sum(1) == 16 - int(16 * 0.4)).all()
    assert m.decoder_pred.weight.grad is not None and torch.isfinite(loss)


@pytest.mark.parametrize("mask_type, ratio, hidden", [("simmim", 0.5, 8), ("uniform", 0.75, 12)])
def test_simmim_and_uniform_mask_types_train(mask_type, ratio, hidden):
    """The 4x4 token grid: SimMIM hides 2 of its four 2x2-token (32-px) cells; uniform keeps one token per 2x2 cell."""
    torch.manual_seed(0)
    m = tiny_mae(mask_type=mask_type, mask_ratio=ratio)
    loss, _, mask = m(torch.randn(3, 3, 64, 64))
    loss.backward()
    assert (mask.sum(1) == hidden).all() and torch.isfinite(loss)
    cells = mask.view(3, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).flatten(3)  # [B, 2, 2, 4]: the 2x2 cells
    if mask_type == "simmim":
        assert ((cells.sum(-1) == 0) | (cells.sum(-1) == 4)).all()
    else:
        assert (cells.sum(-1) == 3).all()
    torch.manual_seed(0)  # masks come from torch's RNG: seeding repeats them, as for random masks
    _, _, again = tiny_mae(mask_type=mask_type, mask_ratio=ratio)(torch.randn(3, 3, 64, 64))
    assert torch.equal(again, mask)
    with pytest.raises(ValueError, match="uniform masking hides 75%"):
        tiny_mae(mask_type="uniform", mask_ratio=0.6)(torch.randn(1, 3, 64, 64))


def test_reconstruct_refuses_what_is_not_an_image_of_these_images():
    x = torch.randn(2, 3, 64, 64)
    hog = tiny_mae(target="hog")
    with pytest.raises(ValueError, match="predicts hog targets, not pixels: there is no image to reconstruct"):
        hog.reconstruct(x, hog(x)[1])
    m = tiny_mae()
    with pytest.raises(ValueError, match=r"pred must be \[B, L, D\] for the B=1 images given, got shape \(2, 16"):
        m.reconstruct(x[:1], m(x)[1])


def test_reconstruct_undoes_norm_pix():
    m = tiny_mae()
    imgs = torch.randn(1, 3, 64, 64)
    target = patchify_ref(imgs, 16)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(m.reconstruct(imgs, normed), imgs, rtol=1e-4, atol=1e-4)


def test_two_training_steps_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = tiny_mae()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    imgs = torch.randn(4, 3, 64, 64)
    mask = masking_from_noise(torch.rand(4, 16), 4)
    before = m.decoder_pred.weight.detach().clone()
    losses = []
    for _ in range(2):
        loss, _, _ = m(imgs, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0] and all(math.isfinite(v) for v in losses)
    assert not torch.equal(before, m.decoder_pred.weight)
    assert m.pos_embed.grad is None and m.decoder_pos_embed.grad is None  # fixed embeddings


def test_bad_recipe_arguments():
    with pytest.raises(ValueError, match="mask_ratio must be a number in the open interval"):
        tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_type must be one of"):
        tiny_mae(mask_type="checkerboard")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny_mae(img_size=70)


@pytest.mark.parametrize("name", ["auto", "cpp", "triton", "torch"])
def test_fused_ops_path_equals_reference_path(name, monkeypatch):
    """The MAE recipe on fastmim.ops (default) and on the plain reference path: same loss, prediction and gradient
    of every parameter, for the same weights and mask."""
    from tests.ops.conftest import _skip_reason

    why = _skip_reason("cpu", name) if name != "auto" else None
    if why:
        pytest.skip(why)
    monkeypatch.setenv("FASTMIM_BACKEND", name)
    torch.manual_seed(0)
    kw = dict(img_size=32, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    fused = fastmim.create_model("mae_vit_tiny_patch16", **kw)
    plain = fastmim.create_model("mae_vit_tiny_patch16", fused_ops=False, **kw)
    plain.load_state_dict(fused.state_dict())
    assert fused.fused_ops and not plain.fused_ops
    imgs = torch.randn(3, 3, 32, 32)
    mask = fused.make_mask(3, imgs.device)
    results = []
    for m in (fused, plain):
        loss, pred, _ = m(imgs, mask=mask)
        loss.backward()
        results.append((loss.detach(), pred.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    (l1, p1, g1), (l2, p2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g2.keys() and "mask_token" in g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "simmim_vit_tiny_patch16", "maskfeat_vit_tiny_patch16",
                                  "a2mim_vit_tiny_patch16", "fcmae_convnextv2_atto"])  # fmt: skip
def test_a_given_mask_may_be_a_bool_tensor_a_grid_or_a_strategys_masks(name):
    """The forms a user has a mask in (a strategy's Masks, its MaskInfo, a bool [B, N] or [B, h, w] tensor, a 0/1
    float tensor) give the same loss; anything else is named."""
    from fastmim.masking import build_mask

    torch.manual_seed(0)
    model = fastmim.create_model(name, img_size=64)
    imgs = torch.randn(2, 3, 64, 64)
    grid = (2, 2) if name.startswith("fcmae") else (4, 4)  # FCMAE masks 32-px cells, the ViTs 16-px patches
    masks = build_mask("random", grid, seed=0, ratio=0.5)(2)
    want, _, mask = model(imgs, mask=masks.info())
    assert mask.sum() == 2 * masks.mask[0].sum()
    for form in (masks, masks.mask, masks.mask.flatten(1), masks.mask.float()):
        torch.testing.assert_close(model(imgs, mask=form)[0], want)
    with pytest.raises(ValueError, match=r"a mask tensor must be \[B, \d+\]"):
        model(imgs, mask=masks.mask.flatten()[None, :-1])
    with pytest.raises(ValueError, match="True/1 for hidden patches"):
        model(imgs, mask=masks.mask.float() * 2)
    with pytest.raises(TypeError, match=r"mask must be a MaskInfo \(build_mask"):
        model(imgs, mask=masks.mask.tolist())


def test_um_mae_secondary_masking_follows_the_official_encoder():
    """vis_mask_ratio (UM-MAE's --vis_mask_ratio): the secondary tokens of a uniform mask enter the encoder as
    vis_mask_token + their position embedding (UM-MAE's models_mae.forward_encoder, written out here), the loss stays on
    the hidden patches; drawn masks replace K - int(K * (1 - r)) visible tokens per sample; the token is not part of
    the encoder's export and gets a gradient; without the ratio there is no such parameter."""
    from fastmim.masking import build_mask

    torch.manual_seed(0)
    m = tiny_mae(mask_type="uniform", vis_mask_ratio=0.25, img_size=128)  # 8x8 grid: 16 visible, 4 secondary
    masks = build_mask("uniform", (8, 8), secondary_ratio=0.25)(3)
    assert (masks.secondary.flatten(1).sum(1) == 4).all()
    imgs = torch.randn(3, 3, 128, 128)
    loss, _, mask = m(imgs, mask=masks)
    loss.backward()
    assert m.vis_mask_token.grad is not None and m.vis_mask_token.grad.abs().sum() > 0

    with torch.no_grad():  # UM-MAE's encoder and MAE's decoder and loss, by hand
        hidden, sec = masks.mask.flatten(1), masks.secondary.flatten(1)
        x = m.patch_embed(imgs) + m.pos_embed[:, 1:]
        x = x[~hidden].reshape(3, -1, x.shape[-1])
        tok = (m.vis_mask_token + m.pos_embed[:, 1:]).expand(3, -1, -1)[~hidden].reshape(3, -1, x.shape[-1])
        vis = sec[~hidden].reshape(3, -1, 1).float()
        x = x * (1 - vis) + tok * vis
        x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(3, -1, -1), x], 1)
        for blk in m.blocks:
            x = blk(x)
        x = m.decoder_embed(m.norm(x))
        full = m.mask_token.expand(3, 64, -1).clone()
        full[~hidden] = x[:, 1:].reshape(-1, x.shape[-1])
        x = torch.cat([x[:, :1], full], 1) + m.decoder_pos_embed
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]
        want = masked_mse_loss_ref(pred, imgs, hidden.float(), 16)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    plain = tiny_mae(mask_type="uniform", img_size=128)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "vis_mask_token"})
    assert not torch.allclose(plain(imgs, mask=masks)[0], loss)  # the secondary tokens changed the loss

    drawn = m.secondary_mask(torch.arange(16).expand(5, 16))  # drawn from torch's generator, UM-MAE's count
    assert drawn.shape == (5, 16) and (drawn.sum(1) == 16 - int(16 * 0.75)).all()
    assert torch.isfinite(m(imgs)[0])
    assert "vis_mask_token" not in m.encoder_state_dict() and "vis_mask_token" in m.no_weight_decay()
    assert not hasattr(plain, "vis_mask_token")
    with pytest.raises(ValueError, match=r"vis_mask_ratio must be a number in \[0, 1\), got 1.0"):
        tiny_mae(vis_mask_ratio=1.0)


def test_a_subclass_mask_strategy_draws_the_masks_of_a_forward_given_none():
    """A user's MAE whose mask_strategy() is its own: the trainer drew those masks, but model(imgs) (the
    reconstruction pictures) drew MAE's random ones, so the pictures showed masks the run never trained on."""
    import fastmim
    from fastmim.masking import Masks
    from fastmim.methods.fcmae import FCMAE
    from fastmim.methods.mae import MaskedAutoencoderViT

    class LeftHalf:  # hides the left half of the grid
        def __init__(self, grid):
            self.grid = grid

        def draw(self, batch, device):
            m = torch.zeros(batch, *self.grid, dtype=torch.bool, device=device)
            m[..., : self.grid[1] // 2] = True
            return Masks(m, num_hidden=m[0].sum().item())

    class Mine(MaskedAutoencoderViT):
        def mask_strategy(self, seed=0, ratio=None):
            return LeftHalf(self.grid_size)

    base = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1, decoder_embed_dim=32,
                                decoder_num_heads=2)  # fmt: skip
    base.__class__ = Mine  # (the same weights, the subclass's masks)
    _, _, mask = base(torch.randn(2, 3, 64, 64))
    want = torch.zeros(2, 4, 4, dtype=torch.bool)
    want[..., :2] = True
    assert torch.equal(mask.bool(), want.flatten(1))
    fc = fastmim.create_model("fcmae_convnextv2_atto", img_size=64)

    class MineFC(FCMAE):
        def mask_strategy(self, seed=0, ratio=None):
            return LeftHalf(self.grid_size)

    fc.__class__ = MineFC
    g = fc.grid_size
    info = fc.make_mask(2, torch.device("cpu"))
    half = torch.zeros(2, *g, dtype=torch.bool)
    half[..., : g[1] // 2] = True
    assert torch.equal(info.mask.bool(), half.flatten(1))
    base.__class__ = MaskedAutoencoderViT  # MAE's own: random masks, 75% hidden, not the left half
    _, _, mask = base(torch.randn(2, 3, 64, 64))
    assert mask.sum().item() == 2 * 12 and not torch.equal(mask.bool(), want.flatten(1))


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "simmim_vit_tiny_patch16"])
def test_a_target_of_another_shape_is_refused_naming_target_images(name):
    """A subclass's target_images giving one channel, or half the size: the loss said "pred has shape (4, 16, 192),
    expected (4, 16, 64)", blaming the prediction; an integer target went in as it was."""
    model = fastmim.create_model(name, img_size=64)
    imgs = torch.randn(2, 3, 64, 64)
    for bad, got in ((lambda x: x.mean(1, keepdim=True), "torch.float32 (2, 1, 64, 64)"),
                     (lambda x: x[..., ::2, ::2], "torch.float32 (2, 3, 32, 32)"),
                     (lambda x: (x > 0).to(torch.uint8), "torch.uint8 (2, 3, 64, 64)")):  # fmt: skip
        model.target_images = bad
        with pytest.raises(ValueError, match=rf"target_images\(imgs\) must give a floating-point tensor shaped as the "
                                             rf"images, \(2, 3, 64, 64\) .*got {re.escape(got)}"):  # fmt: skip
            model(imgs)
    model.target_images = lambda x: x.flip(-1)  # a target of the images' shape: trained on
    loss, _, _ = model(imgs)
    assert torch.isfinite(loss)


def test_images_a_user_differentiates_the_loss_by_get_the_same_gradient_with_or_without_fused_ops():
    """The fused loss differentiates the prediction only: with fused_ops the model refused images that require grad
    (a saliency map of the loss), without them it carried the gradient. Both carry it now, equal."""
    torch.manual_seed(0)
    model = fastmim.create_model("mae_vit_tiny_patch16", img_size=32, decoder_depth=1, decoder_embed_dim=32,
                                 decoder_num_heads=2)  # fmt: skip
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 4)
    grads = []
    for fused in (True, False):
        model.fused_ops = fused
        x = imgs.clone().requires_grad_()
        loss, _, _ = model(x, mask=masking_from_noise(noise, 1))  # 3 of 4 patches hidden
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_a_timm_encoder_given_images_of_another_size_is_refused_in_fastmims_words():
    """create_model("mae", encoder=timm_vit) at another image size failed with timm's AssertionError from inside."""
    timm = pytest.importorskip("timm", reason="timm is an optional dependency (fastmim[timm])")
    enc = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    model = fastmim.create_model("mae", encoder=enc, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\] \(the timm encoder's img_size\), got "
                                         r"\(2, 3, 64, 64\)"):  # fmt: skip
        model(torch.randn(2, 3, 64, 64))
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)


def test_a_hog_target_is_read_from_target_images():
    """A model with target=hog and target_images of its own trained on the plain images' HOG, unsaid: the HOG is
    now taken of target_images(imgs), as the pixel targets are (the built-in one gives imgs: the same loss)."""
    torch.manual_seed(0)
    model = fastmim.create_model("mae_vit_tiny_patch16", img_size=32, target="hog", decoder_depth=1,
                                 decoder_embed_dim=32, decoder_num_heads=2)  # fmt: skip
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    model.target_images = lambda x: x.flip(-1)
    loss, pred, mask = model(imgs, mask=masking_from_noise(noise, 1))
    del model.target_images
    with torch.no_grad():
        want, plain = model.hog_loss(pred, imgs.flip(-1), mask), model.hog_loss(pred, imgs, mask)
    torch.testing.assert_close(loss.detach(), want)
    assert not torch.allclose(loss.detach(), plain)
