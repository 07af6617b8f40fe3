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
