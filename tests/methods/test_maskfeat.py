"""MaskFeat on a ViT: the loss against MaskFeat's formula written out (HOG of the input in float64 NumPy, MSE on the
masked tokens), the masks (BEiT blocks, 78 of 196), fused and reference paths agree, the encoder exports to timm, and
the CLI trains it without reconstruction images."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.masking import random_masking
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import assert_encoder_matches_timm, tiny_args_for
from tests.ops.test_hog_target import _numpy_hog


def _tiny(**kw):
    torch.manual_seed(0)
    return fastmim.create_model("maskfeat_vit_tiny_patch16", img_size=64, depth=2, **kw)


@pytest.mark.parametrize("fused_ops", [True, False])
def test_loss_is_maskfeats_hog_mse_on_masked_tokens(fused_ops):
    m = _tiny(fused_ops=fused_ops)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    info = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(2))
    loss, pred, mask = m(imgs, mask=info)
    assert pred.shape == (2, 16, 108) and torch.equal(mask, info.mask)
    with torch.no_grad():
        want_pred = m.decoder(m.forward_encoder(imgs, info.mask)[:, 1:])
    hog = torch.from_numpy(_numpy_hog(imgs.double().numpy(), 16, 8, 9, 0))  # [B, 16, 108], MaskFeat's layout
    per_token = ((want_pred.double() - hog) ** 2).mean(-1)  # [B, N]
    want = (per_token * info.mask).sum() / info.mask.sum()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_fused_and_reference_paths_agree_with_the_gaussian_window():
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    info = random_masking(2, 16, 0.4, generator=torch.Generator().manual_seed(2))
    grads = []
    for fused in (True, False):
        m = _tiny(fused_ops=fused, gaussian_window=16)
        loss = m(imgs, mask=info)[0]
        loss.backward()
        grads.append((loss.detach(), m.decoder.weight.grad.clone(), m.blocks[0].attn.qkv.weight.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_masks_are_beit_blocks_of_78_in_196():
    """BEiT's generator (MaskFeat's default) stops short where no block fits: at most 78, 78 in most samples;
    ``mask_exact=True`` grows the blocks to exactly 78."""
    m = fastmim.create_model("maskfeat_vit_base_patch16")
    strategy = m.mask_strategy(seed=0)
    assert strategy.name == "block" and strategy.exact_hidden is None and not strategy.config.exact
    assert strategy.config.min_num_patches == 15 and strategy.num_hidden == 78
    counts = strategy(indices=torch.arange(200), device="cpu").mask.flatten(1).sum(1)
    assert int(counts.max()) == 78 and int(counts.min()) < 78 and float((counts == 78).float().mean()) > 0.5
    exact = fastmim.create_model("maskfeat_vit_base_patch16", mask_exact=True).mask_strategy(seed=0)
    assert exact.exact_hidden == 78
    assert exact(indices=torch.arange(8), device="cpu").mask.flatten(1).sum(1).tolist() == [78] * 8
    # a 4x4 grid hides 7: no 15-token block fits, so the default grows blocks rather than leave masks near empty
    tiny = _tiny().mask_strategy(seed=0)
    assert tiny.exact_hidden == 7 and _tiny(mask_exact=False).mask_strategy(seed=0).exact_hidden is None


def test_trainer_forward_takes_a_different_count_per_sample():
    """The trainer hands mask-token models the float mask alone (no index form), so BEiT's short masks train; MAE,
    which drops tokens, still needs one count and says so."""
    from fastmim.masking import Masks
    from fastmim.train.engine import _masked_forward

    m = _tiny()
    assert m.drops_tokens is False
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :6], mask[1, :5] = True, True
    loss = _masked_forward(m, False, imgs, mask, None)
    want = m(imgs, mask=Masks(mask).info(ids=False))[0]
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(float(want.detach()))
    mae = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, depth=1, decoder_depth=1)
    with pytest.raises(ValueError, match="same number of tokens"):
        _masked_forward(mae, True, imgs, mask, None)
    with pytest.raises(ValueError, match="drops the masked tokens"):
        mae(imgs, mask=Masks(mask).info(ids=False))


def test_encoder_exports_to_timm():
    m = _tiny()
    assert_encoder_matches_timm(m, depth=2)


@pytest.mark.slow
def test_maskfeat_pretrains_from_the_cli(image_folder, tmp_path, capsys):
    out = tmp_path / "maskfeat"
    args = [
        *tiny_args_for("maskfeat_vit_tiny_patch16"),
        "--data-path",
        str(image_folder),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
    ]
    pretrain.run(args)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and (out / "encoder.safetensors").exists()
    assert not (out / "reconstructions").exists()  # HOG targets: no pixel reconstructions to show
    assert pretrain.main([*args, "--output-dir", str(tmp_path / "x"), "--decoder-depth", "2"]) == 2
    assert "does not apply to MaskFeat" in capsys.readouterr().err
    assert pretrain.main([*args, "--output-dir", str(tmp_path / "y"), "--mask-type", "uniform"]) == 2
    assert "uniform masking hides 75% of the tokens" in capsys.readouterr().err  # MaskFeat's ratio is 78/196


@pytest.mark.parametrize("name", ["maskfeat", "a2mim"])
def test_a_learned_position_embedding_trains_and_exports(name):
    """MaskFeat's (mmpretrain) and A2MIM's (openmixup) learned absolute position embedding, class-token row
    included: drawn from a truncated normal 0.02, it gets a gradient at every row a token passed through, an
    optimizer step moves it, and the encoder (its learned values) loads into timm's VisionTransformer with the same
    features; the fixed sin-cos one stays out of the gradient."""
    torch.manual_seed(0)
    m = fastmim.create_model(f"{name}_vit_tiny_patch16", img_size=64, depth=2, abs_pos_embed="learned")
    pos = m.pos_embed
    assert pos.requires_grad and pos.shape == (1, 17, 192)
    assert 0.018 < float(pos.detach().std()) < 0.022  # torch's trunc_normal_(std=0.02): cut at +-2, not 2 std
    imgs = torch.randn(2, 3, 64, 64)
    loss, _, _ = m(imgs, mask=m.mask_strategy(seed=1)(indices=torch.arange(2), device="cpu").info(ids=False))
    loss.backward()
    assert (pos.grad.abs().sum(-1) > 0).all()  # every row: the class token and each patch (hidden ones as the token)
    before = pos.detach().clone()
    torch.optim.SGD([pos], lr=1.0).step()
    assert not torch.equal(pos.detach(), before)
    assert_encoder_matches_timm(m, depth=2)
    fixed = fastmim.create_model(f"{name}_vit_tiny_patch16", img_size=64, depth=2)
    assert not fixed.pos_embed.requires_grad
    with pytest.raises(ValueError, match="abs_pos_embed must be one of"):
        fastmim.create_model(f"{name}_vit_tiny_patch16", img_size=64, depth=2, abs_pos_embed="fourier")


@pytest.mark.slow
def test_a_learned_position_embedding_from_the_cli(image_folder, tmp_path, capsys):
    """--abs-pos learned: the run trains the embedding (AdamW holds moments for it), encoder.safetensors carries
    it and says so (load_encoder's encoder keeps it trainable), and a resume that would fix it is refused."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = [*tiny_args_for("maskfeat_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
            "--max-steps", "2", "--abs-pos", "learned"]  # fmt: skip
    pretrain.run(args)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["model"]["pos_embed"].shape == (1, 17, 192) and state["config"]["abs_pos"] == "learned"
    moments = {state["optimizer_params"][i]: st for i, st in state["optimizer"]["state"].items()}
    assert moments["pos_embed"]["exp_avg"].abs().sum() > 0
    torch.testing.assert_close(load_file(out / "encoder.safetensors")["pos_embed"], state["model"]["pos_embed"])
    from fastmim.eval import load_encoder

    encoder, _ = load_encoder(out)  # the file says the embedding was learned: it stays trainable there
    assert encoder.abs_pos == "learned" and encoder.pos_embed.requires_grad
    torch.testing.assert_close(encoder.pos_embed.detach(), state["model"]["pos_embed"])
    capsys.readouterr()
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "3", "--abs-pos", "sincos"]) == 2
    assert "trained with abs_pos learned" in capsys.readouterr().err
