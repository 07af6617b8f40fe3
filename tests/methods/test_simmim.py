"""SimMIM on a ViT: the loss against SimMIM's formula written out, mask tokens really replace the masked patches,
fused and reference paths agree, the encoder exports to timm, and the CLI trains it."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.masking import random_masking
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import TINY_ARGS, tiny_args_for


def official_loss(imgs: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """microsoft/SimMIM: the token mask upsampled to pixels, (|x - x_rec| * mask).sum() / (mask.sum() + 1e-5) / C."""
    b, c, h, w = imgs.shape
    m = mask.view(b, h // p, w // p).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()
    return ((imgs - rec).abs() * m).sum() / (m.sum() + 1e-5) / c


@pytest.mark.parametrize("fused_ops", [True, False])
def test_loss_is_simmims_l1_on_masked_pixels(fused_ops):
    torch.manual_seed(0)
    m = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, depth=2, fused_ops=fused_ops)
    imgs = torch.randn(2, 3, 64, 64)
    mask = m.mask_strategy(seed=3)(indices=torch.arange(2), device="cpu").info()
    assert mask.mask.sum(1).tolist() == [12.0, 12.0]  # 3 of 4 32-px cells (ceil(4 x 0.6)) of 4 tokens each
    loss, pred, _ = m(imgs, mask=mask)
    rec = m.forward_decoder(m.forward_encoder(imgs, mask.mask))
    torch.testing.assert_close(loss.detach(), official_loss(imgs, rec.detach(), mask.mask, 16), rtol=1e-5, atol=1e-6)
    assert pred.shape == (2, 16, 768)


def test_masked_patches_reach_the_encoder_only_as_the_mask_token():
    torch.manual_seed(0)
    m = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, depth=2).eval()
    imgs = torch.randn(2, 3, 64, 64)
    info = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    other = imgs.clone()
    hidden = info.mask.view(2, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1).bool()
    other[hidden.expand_as(other)] = 5.0  # change every hidden pixel
    with torch.no_grad():
        a, b = m.forward_encoder(imgs, info.mask), m.forward_encoder(other, info.mask)
        torch.testing.assert_close(a, b)  # nothing of a hidden patch leaks into the encoding
        visible = info.mask.clone()
        visible[0, info.mask[0].argmin()] = 1.0  # hide one more token: the encoding changes
        assert not torch.allclose(m.forward_encoder(imgs, visible), a)


@pytest.mark.parametrize("name, mode", [("simmim", "shared"), ("a2mim", "block"), ("maskfeat", "shared")])
def test_the_mask_token_recipes_train_a_relative_position_bias_without_abs_positions(name, mode):
    """SimMIM's ViT-B encoder (and A2MIM's per-block bias, and MaskFeat's encoder with one): every tables' gradient is
    nonzero, the encoder's state has the tables and no pos_embed; a different position of the same hidden patch
    changes the encoding (the bias is the only position signal)."""
    torch.manual_seed(0)
    m = fastmim.create_model(f"{name}_vit_tiny_patch16", img_size=64, depth=2, rel_pos_bias=mode, abs_pos_embed=False)
    imgs = torch.randn(2, 3, 64, 64)
    mask = m.mask_strategy(seed=3)(indices=torch.arange(2), device="cpu").info()
    loss, _, _ = m(imgs, mask=mask)
    loss.backward()
    tables = [p for n, p in m.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == (1 if mode == "shared" else 2) and all(t.grad.abs().sum() > 0 for t in tables)
    state = m.encoder_state_dict()
    assert "pos_embed" not in state and sum(k.endswith("relative_position_bias_table") for k in state) == len(tables)
    with torch.no_grad():
        for t in tables:
            t.normal_()
        a = m.eval().forward_encoder(imgs, mask.mask)
        swapped = imgs.clone()  # two visible patches exchanged: the same tokens in other places
        (y0, x0), (y1, x1) = [divmod(int(i), 4) for i in (mask.mask[0] == 0).nonzero()[:2, 0]]
        first = (0, slice(None), slice(y0 * 16, y0 * 16 + 16), slice(x0 * 16, x0 * 16 + 16))
        second = (0, slice(None), slice(y1 * 16, y1 * 16 + 16), slice(x1 * 16, x1 * 16 + 16))
        swapped[first], swapped[second] = imgs[second], imgs[first]
        assert not torch.allclose(m.forward_encoder(swapped, mask.mask)[0, 0], a[0, 0], atol=1e-4)


@pytest.mark.slow
def test_simmim_pretrains_from_the_cli_and_exports_a_timm_encoder(image_folder, tmp_path):
    out = tmp_path / "simmim"
    args = [
        *tiny_args_for("simmim_vit_tiny_patch16"),
        "--data-path",
        str(image_folder),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
    ]
    pretrain.run(args)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and "mask_token" in state["model"] and "decoder.0.weight" in state["model"]
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    from safetensors.torch import load_file

    enc = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=0
    )
    enc.load_state_dict(load_file(out / "encoder.safetensors"), strict=True)


def test_bad_simmim_options_are_refused(image_folder, tmp_path, capsys):
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(tmp_path / "x")]
    args[args.index("--model") + 1] = "simmim_vit_tiny_patch16"
    assert pretrain.main(args) == 2
    assert "--decoder-embed-dim does not apply to SimMIM" in capsys.readouterr().err
    plain = list(args)
    for flag in ("--decoder-embed-dim", "--decoder-depth", "--decoder-num-heads"):
        i = plain.index(flag)
        del plain[i : i + 2]
    for model in ("data2vec2_vit_tiny_patch16", "ijepa_vit_tiny_patch16"):  # refused, not silently ignored
        plain[plain.index("--model") + 1] = model
        assert pretrain.main([*plain, "--drop-path", "0.1"]) == 2
        assert "--drop-path does not apply to the teacher recipes" in capsys.readouterr().err
    for model in ("simmim_vit_tiny_patch16", "a2mim_vit_tiny_patch16", "maskfeat_vit_tiny_patch16",
                  "mae_vit_tiny_patch16", "pixmim_vit_tiny_patch16"):  # fmt: skip
        plain[plain.index("--model") + 1] = model
        cfg, _ = pretrain.resolve_config([*plain, "--drop-path", "0.1"])
        assert pretrain.build_model(cfg, torch.device("cpu")).blocks[-1].drop_path.p == pytest.approx(0.1), model
        cfg, _ = pretrain.resolve_config([*plain, "--model-args", "drop_path_rate=0.2"])
        with pytest.raises(pretrain.UsageError, match="--model-args drop_path_rate: set it with --drop-path"):
            pretrain.build_model(cfg, torch.device("cpu"))
    # patch 14: SimMIM's mask patches are 2x2 tokens (28 px), as its 32 px are at patch 16
    masks = fastmim.create_model("simmim_vit_tiny_patch14", img_size=56).mask_strategy(seed=0)(4).mask  # [4, 4, 4]
    cells = masks.view(4, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).flatten(3)  # [B, 2, 2, 4]: the 2x2-token cells
    assert ((cells.sum(-1) == 0) | (cells.sum(-1) == 4)).all() and masks.any()
