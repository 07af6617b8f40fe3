"""Masks composed with recipes: the recipes that keep every token (SimMIM, A2MIM, MaskFeat) take any of the CLI's
mask strategies as well as their own, MAE and PixMIM take each, and the recipes whose masks are part of the method
(data2vec 2.0, I-JEPA, FCMAE) refuse another by name; options of another recipe's parts are refused, not ignored."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

import fastmim
from fastmim import pretrain
from fastmim.config import CONFIG_FORMAT, PretrainConfig
from fastmim.train import checkpoint as ckpt
from tests.conftest import tiny_args_for


def _cells_whole(mask: torch.Tensor) -> bool:
    """Whether a [B, H, W] mask hides whole 2x2-token cells (SimMIM's mask patches)."""
    b, h, w = mask.shape
    cells = mask.view(b, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).flatten(3)
    return bool(((cells.sum(-1) == 0) | (cells.sum(-1) == 4)).all())


@pytest.mark.parametrize("name", ["simmim_vit_tiny_patch16", "a2mim_vit_tiny_patch16", "maskfeat_vit_tiny_patch16"])
def test_token_keeping_recipes_take_every_mask_strategy(name):
    own = fastmim.create_model(name, img_size=128).mask_strategy(seed=0)
    assert own.name == ("block" if name.startswith("maskfeat") else "simmim")
    for mask_type in ("random", "block", "simmim", "uniform"):
        ratio = {"mask_ratio": 0.75} if mask_type == "uniform" else {}
        model = fastmim.create_model(name, img_size=128, mask_type=mask_type, **ratio)
        strategy = model.mask_strategy(seed=0)
        assert strategy.name == mask_type
        masks = strategy(8).mask  # [8, 8, 8]
        if mask_type == "random":
            assert not _cells_whole(masks)  # tokens one by one, not SimMIM's cells
        loss, _, mask = model(torch.randn(2, 3, 128, 128))
        assert torch.isfinite(loss) and mask.sum() > 0
    with pytest.raises(ValueError, match=r"mask_type must be None \(this recipe's own"):
        fastmim.create_model(name, img_size=128, mask_type="tube")


@pytest.mark.parametrize("name", ["simmim_vit_tiny_patch14", "a2mim_vit_tiny_patch14", "maskfeat_vit_tiny_patch14"])
def test_patch_14_recipes_build_with_their_defaults(name):
    """2x2-token mask cells (28 px) for SimMIM and A2MIM, 7-px HOG cells (half the patch) for MaskFeat."""
    model = fastmim.create_model(name, img_size=56)
    loss, _, _ = model(torch.randn(2, 3, 56, 56))
    assert torch.isfinite(loss)
    if name.startswith("maskfeat"):
        assert model.hog.cell == 7
    else:
        assert _cells_whole(model.mask_strategy(seed=0)(4).mask)


def test_cli_mask_flag_reaches_every_recipe_that_takes_it(image_folder, tmp_path, capsys):
    """--mask random on MaskFeat trains with random masks (it used to be taken for the default and ignored); the
    config records what was asked (None: the recipe's own); recipes with their own masks refuse another."""
    base = [*tiny_args_for("maskfeat_vit_tiny_patch16"), "--data-path", str(image_folder), "--max-steps", "2"]
    losses = {}
    for mask in (None, "random"):
        out = tmp_path / f"maskfeat-{mask}"
        pretrain.run([*base, "--output-dir", str(out)] + (["--mask", mask] if mask else []))
        assert yaml.safe_load((out / "config.yaml").read_text())["mask_type"] == mask
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mask] = [r["loss"] for r in rows if "loss" in r]
    assert losses[None] and losses[None] != losses["random"]  # other masks, other losses
    for model, flags, message in [
        ("data2vec2_vit_tiny_patch16", ["--mask", "random"], "--mask-type random does not apply to data2vec 2.0"),
        ("ijepa_vit_tiny_patch16", ["--mask", "block"], "--mask-type and --mask-ratio do not apply"),
        ("fcmae_convnextv2_atto", ["--mask", "block"], "--mask-type block does not apply to FCMAE"),
        ("fcmae_convnextv2_atto", ["--attn-impl", "sdpa"], "--attn-impl sdpa does not apply to FCMAE"),
        ("mae_vit_tiny_patch16", ["--sparse-backend", "spconv"], "--sparse-backend spconv applies to FCMAE"),
    ]:  # fmt: skip
        args = [*tiny_args_for(model), "--data-path", str(image_folder), "--output-dir", str(tmp_path / "refused")]
        assert pretrain.main([*args, *flags]) == 2, (model, flags)
        assert message in capsys.readouterr().err


def test_a_recipe_file_changed_since_the_run_began_keeps_the_runs_network(image_folder, tmp_path, capsys):
    """A requeued job's same command, whose --config file now sets another network option (a recipe updated since the
    run began): the run continues with the network it was trained with, and a note names the file; a flag that
    changes it, or a file that names another model, is refused naming where it came from."""
    from fastmim.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    recipe = tmp_path / "a2mim.yaml"
    recipe.write_text("model: a2mim_vit_tiny_patch16\nrel_pos_bias: block\n")
    args = [*tiny_args_for("a2mim_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
            "--config", str(recipe), "--resume", "if-exists"]  # fmt: skip
    pretrain.run([*args, "--max-steps", "1"])
    recipe.write_text("model: a2mim_vit_tiny_patch16\nrel_pos_bias: block\nabs_pos: learned\n")
    capsys.readouterr()
    pretrain.run([*args, "--max-steps", "2"])
    said = capsys.readouterr().out
    assert f"note: {recipe} sets abs_pos learned, the run was trained with sincos: the run continues" in said, said
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and state["config"]["abs_pos"] == "sincos" and not (out / "resumes.jsonl").exists()
    assert pretrain.main([*args, "--max-steps", "3", "--abs-pos", "learned"]) == 2
    assert "trained with abs_pos sincos; --abs-pos learned would change the network" in capsys.readouterr().err
    recipe.write_text("model: a2mim_vit_small_patch16\nabs_pos: learned\n")
    i = args.index("--model")
    assert pretrain.main([*args[:i], *args[i + 2 :], "--max-steps", "3"]) == 2  # the model from the file alone
    out_err = capsys.readouterr()
    assert "--model a2mim_vit_small_patch16, --abs-pos learned would change the network" in out_err.err
    assert f"(model set in {recipe}; abs_pos set in {recipe})" in out_err.err, out_err.err  # (not resume, output_dir)
    assert "continues with its own" not in out_err.out  # another model: refused as a whole
    # a setting the run left unset (the model's default) that the file now sets: the run keeps it unset
    mae, mae_recipe = tmp_path / "mae", tmp_path / "mae.yaml"
    mae_recipe.write_text("model: mae_vit_tiny_patch16\n")
    mae_args = [*args[:i], *args[i + 2 :]]
    mae_args[mae_args.index(str(out))], mae_args[mae_args.index(str(recipe))] = str(mae), str(mae_recipe)
    pretrain.run([*mae_args, "--max-steps", "1"])
    mae_recipe.write_text("model: mae_vit_tiny_patch16\ndecoder_depth: 3\n")
    capsys.readouterr()
    pretrain.run([*mae_args, "--max-steps", "2"])
    assert f"{mae_recipe} sets decoder_depth 3, the run was trained with its default (unset)" in capsys.readouterr().out
    assert load_checkpoint(mae / "checkpoint.pt")["config"]["decoder_depth"] is None


def test_resume_refuses_another_network_and_says_what_changes_the_masks(image_folder, tmp_path, capsys):
    from fastmim.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    args = [*tiny_args_for("maskfeat_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out)]
    pretrain.run([*args, "--max-steps", "1"])
    resume = ["--resume", "--output-dir", str(out), "--max-steps", "2"]
    assert pretrain.main([*resume, "--model", "maskfeat_vit_small_patch16"]) == 2
    err = capsys.readouterr().err
    assert "this run was trained with model maskfeat_vit_tiny_patch16; --model maskfeat_vit_small_patch16" in err
    assert "size mismatch" not in err  # one line, not load_state_dict's key dump
    (tmp_path / "ma.yaml").write_text("model_args:\n  mlp_ratio: 2.0\n")  # a file's model_args with other shapes
    assert pretrain.main([*resume, "--config", str(tmp_path / "ma.yaml")]) == 2
    assert f"model_args set in {tmp_path / 'ma.yaml'}" in capsys.readouterr().err  # (the file was not named)
    (tmp_path / "typo.yaml").write_text("model_args:\n  low_pass_radus: 3\n")  # (a new run: no flag was given)
    assert (
        pretrain.main([*args[:-2], "--output-dir", str(tmp_path / "new"), "--config", str(tmp_path / "typo.yaml")]) == 2
    )
    err = capsys.readouterr().err
    assert (
        f"(model_args low_pass_radus=3) (model_args set in {tmp_path / 'typo.yaml'})" in err
        and "--model-args" not in err
    )
    assert pretrain.main([*resume, "--mask", "random"]) == 0
    said = capsys.readouterr().out
    assert "note: resuming with changed settings: mask_type unset (the recipe's own) -> random" in said, said
    # a checkpoint of the old format saved mask_type "random" for every recipe: read as the recipe's own masks
    state = load_checkpoint(out / "checkpoint.pt")
    state.pop("config_format")
    state["config"]["mask_type"] = "random"
    torch.save(state, out / "checkpoint.pt")
    cfg, _ = pretrain.resolve_config(resume)
    assert cfg.mask_type is None
    # so does an old config.yaml passed back with --config (a hand-written one means what it says)
    text = (out / "config.yaml").read_text()
    assert f"config_format: {CONFIG_FORMAT}\n" in text
    (tmp_path / "old.yaml").write_text(
        text.replace(f"config_format: {CONFIG_FORMAT}\n", "").replace("mask_type: null", "mask_type: random")
    )
    assert pretrain.resolve_config(["--config", str(tmp_path / "old.yaml")])[0].mask_type is None
    (tmp_path / "own.yaml").write_text("model: maskfeat_vit_tiny_patch16\nmask_type: random\n")
    assert pretrain.resolve_config(["--config", str(tmp_path / "own.yaml")])[0].mask_type == "random"
    # a job script's own file with a resume: key (README's requeue advice) is not taken for an old run's: it kept
    # mask_type random, and no decay_exempt was slipped in (both were rewritten, silently)
    (tmp_path / "job.yaml").write_text(f"model: maskfeat_vit_tiny_patch16\nmask_type: random\nresume: if-exists\n"
                                       f"output_dir: {tmp_path / 'job'}\n")  # fmt: skip
    cfg = pretrain.resolve_config(["--config", str(tmp_path / "job.yaml")])[0]
    assert cfg.mask_type == "random" and cfg.decay_exempt == PretrainConfig().decay_exempt


def test_model_args_reach_the_recipe_from_flags_and_yaml(image_folder, tmp_path, capsys):
    """--model-args (a YAML mapping in a config) passes a recipe's own settings that have no flag; a misspelt name
    gets the close ones, a setting with its own flag is pointed to it, and the run's config records them."""
    from fastmim.config import PretrainConfig

    cfg = PretrainConfig(model="pixmim_vit_tiny_patch16", img_size=64, model_args={"low_pass_radius": 3.5})
    assert pretrain.build_model(cfg, torch.device("cpu")).low_pass_radius == 3.5
    cfg, _ = pretrain.resolve_config(["--model-args", "low_pass_radius=3.5,fused_norm=true"])
    assert cfg.model_args == {"low_pass_radius": 3.5, "fused_norm": True}
    conf = tmp_path / "c.yaml"
    conf.write_text("model: maskfeat_vit_tiny_patch16\nmodel_args:\n  hog_cell: 4\n")
    cfg, _ = pretrain.resolve_config(["--config", str(conf), "--img-size", "64"])
    assert pretrain.build_model(cfg, torch.device("cpu")).hog.cell == 4
    base = [*tiny_args_for("pixmim_vit_tiny_patch16"), "--data-path", str(image_folder)]
    out = tmp_path / "run"
    pretrain.run([*base, "--output-dir", str(out), "--max-steps", "1", "--model-args", "low_pass_radius=3.5"])
    assert yaml.safe_load((out / "config.yaml").read_text())["model_args"] == {"low_pass_radius": 3.5}
    capsys.readouterr()
    cfg, _ = pretrain.resolve_config(["--model-args", "context_scale=[0.8, 1.0],pred_depth=2"])
    assert cfg.model_args == {"context_scale": [0.8, 1.0], "pred_depth": 2}  # commas inside a list stay
    maskfeat = [*tiny_args_for("maskfeat_vit_tiny_patch16"), "--data-path", str(image_folder)]
    assert pretrain.main([*maskfeat, "--output-dir", str(tmp_path / "x"), "--model-args", "target=hog"]) == 2
    assert "unexpected keyword argument 'target'" in capsys.readouterr().err  # named, not a KeyError
    for bad, message in [("low_pass_radus=3", "did you mean low_pass_radius?"),
                         ("mask_ratio=0.5", "--model-args mask_ratio: set it with --mask-ratio"),
                         ("low_pass_radius", "takes KEY=VALUE")]:  # fmt: skip
        assert pretrain.main([*base, "--output-dir", str(tmp_path / "x"), "--model-args", bad]) == 2
        assert message in capsys.readouterr().err
    resumed = ["--resume", "--output-dir", str(out), "--max-steps", "2", "--model-args", "low_pass_radius=5"]
    assert pretrain.main(resumed) == 0
    assert "model_args {'low_pass_radius': 3.5} -> {'low_pass_radius': 5}" in capsys.readouterr().out


def test_mae_with_maskfeats_hog_target_is_the_formula_and_trains_from_the_cli(image_folder, tmp_path):
    """MAE's encoder and decoder with MaskFeat's target: the decoder predicts each masked patch's HOG features; the
    loss is the mean over masked patches of the squared error against the official whole-image HOG."""
    from fastmim.ops import hog_target_ref

    torch.manual_seed(0)
    model = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, target="hog")
    imgs = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 16, 108) and not model.predicts_pixels
    want = (pred.detach() - hog_target_ref(imgs, 16, 8)).square().mean(-1)  # [B, N] per patch
    torch.testing.assert_close(loss.detach(), (want * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    plain = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, target="hog", fused_ops=False)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(imgs, mask=mask.bool())[0], loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="target must be one of"):
        fastmim.create_model("mae_vit_tiny_patch16", target="tokens")
    with pytest.raises(ValueError, match="PixMIM's target is the low-pass image"):
        fastmim.create_model("pixmim_vit_tiny_patch16", target="hog")
    out = tmp_path / "run"
    pretrain.run([*tiny_args_for("mae_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
                  "--max-steps", "2", "--model-args", "target=hog,hog_bins=6"])  # fmt: skip
    assert (out / "encoder.safetensors").exists() and not (out / "reconstructions").exists()
    from safetensors import safe_open

    with safe_open(str(out / "encoder.safetensors"), "pt") as f:  # the file says what its encoder learned to predict
        meta = f.metadata()
    assert (meta["target"], meta["hog_cell"], meta["hog_bins"], meta["gaussian_window"]) == ("hog", "8", "6", "0")
    assert ckpt.encoder_metadata(model, "m", 0, 64)["target"] == "hog"
    lowpass = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, low_pass_radius=7.5)
    assert ckpt.encoder_metadata(lowpass, "m", 0, 64).items() >= {"target": "lowpass", "low_pass_radius": "7.5"}.items()
    assert "target" not in ckpt.encoder_metadata(fastmim.create_model("data2vec2_vit_tiny_patch16"), "m", 0, 224)


def test_targets_compose_with_other_recipes_encoders_and_heads(image_folder, tmp_path):
    """target="hog" / "lowpass" on SimMIM and MAE (fastmim.targets.choice): SimMIM's encoder with MaskFeat's target
    and linear head is MaskFeat on the same weights and masks; MAE with the low-pass target is PixMIM; SimMIM's L1
    against the low-pass image is the formula; the CLI trains SimMIM on HOG."""
    from fastmim.ops import fft_loss_ref, low_pass_target_ref

    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    simmim = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, target="hog")
    maskfeat = fastmim.create_model("maskfeat_vit_tiny_patch16", img_size=64)
    maskfeat.load_state_dict(simmim.state_dict())  # the same keys: encoder, mask_token, decoder.weight/bias
    mask = simmim.make_mask(2, torch.device("cpu"))
    loss, pred, m = simmim(imgs, mask=mask)
    assert pred.shape == (2, 16, 108) and not simmim.predicts_pixels
    want, want_pred, _ = maskfeat(imgs, mask=mask)
    torch.testing.assert_close(pred, want_pred)
    torch.testing.assert_close(loss, want)

    mae = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, target="lowpass", low_pass_radius=6.0)
    pixmim = fastmim.create_model("pixmim_vit_tiny_patch16", img_size=64, low_pass_radius=6.0)
    pixmim.load_state_dict(mae.state_dict())
    info = mae.make_mask(2, torch.device("cpu"))
    torch.testing.assert_close(mae(imgs, mask=info)[0], pixmim(imgs, mask=info)[0])
    torch.testing.assert_close(mae.reconstruct(imgs, mae(imgs, mask=info)[1]),
                               pixmim.reconstruct(imgs, pixmim(imgs, mask=info)[1]))  # fmt: skip
    assert fastmim.create_model("pixmim_vit_tiny_patch16", img_size=224).low_pass_radius == 40.0

    low = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, target="lowpass", low_pass_radius=5.0)
    mask = low.make_mask(2, torch.device("cpu"))
    loss, pred, m = low(imgs, mask=mask)
    target = low_pass_target_ref(imgs, 5.0).reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, -1)
    per_patch = (pred.detach() - target).abs().mean(-1)
    torch.testing.assert_close(loss.detach(), (per_patch * m).sum() / m.sum(), rtol=1e-5, atol=1e-6)
    # A2MIM on the low-pass image: its L1 and its frequency term (0.1 x the official focal frequency loss of the
    # reconstruction, visible pixels mixed) both against the low-frequency image
    a2mim = fastmim.create_model("a2mim_vit_tiny_patch16", img_size=64, target="lowpass", low_pass_radius=5.0)
    loss, pred, m = a2mim(imgs, mask=a2mim.make_mask(2, torch.device("cpu")))
    low_img = low_pass_target_ref(imgs, 5.0)
    target = low_img.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, -1)
    rec = pred.detach().reshape(2, 4, 4, 16, 16, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 64, 64)
    l1 = ((pred.detach() - target).abs().mean(-1) * m).sum() / m.sum()
    want = l1 + 0.1 * fft_loss_ref(rec, low_img, m, 16)
    assert fft_loss_ref(rec, low_img, m, 16) > 1e-3 * l1  # the frequency term counts in the comparison
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)

    for name, kwargs, message in [
        ("a2mim_vit_tiny_patch16", dict(target="hog"), "target='hog' does not apply"),
        ("simmim_vit_tiny_patch16", dict(hog_cell=4), "hog_cell applies to target='hog', not 'pixels'"),
        (
            "mae_vit_tiny_patch16",
            dict(target="hog", low_pass_radius=3.0),
            "low_pass_radius applies to target='lowpass'",
        ),
        ("simmim_vit_tiny_patch16", dict(target="hog", hog_cell=6), "must be a multiple of hog_cell, got 6"),
        ("mae_vit_tiny_patch16", dict(target="lowpass", low_pass_radius=0), "low_pass_radius must be a finite"),
        ("simmim_vit_tiny_patch16", dict(target="tokens"), "target must be one of pixels, lowpass, hog"),
    ]:
        with pytest.raises(ValueError, match=message):
            fastmim.create_model(name, img_size=64, **kwargs)

    out = tmp_path / "run"
    pretrain.run([*tiny_args_for("simmim_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir",
                  str(out), "--max-steps", "2", "--model-args", "target=hog"])  # fmt: skip
    assert (out / "encoder.safetensors").exists() and not (out / "reconstructions").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["model_args"] == {"target": "hog"}


def test_a_mask_for_another_grid_or_batch_is_refused_by_name():
    """A mask must fit the images: a 9x7 mask (as many tokens as the 7x9 grid), a [B, h, w] tensor of the wrong
    grid, or masks for another batch size are one line each, whatever the mask's form; I-JEPA takes its strategy's
    Masks whole (context and target blocks)."""
    from fastmim.masking import build_mask

    mae = fastmim.create_model("mae_vit_tiny_patch16", img_size=(112, 144))  # a 7x9 patch grid
    imgs = torch.randn(2, 3, 112, 144)
    for bad, said in [(build_mask("random", (9, 7))(2), "the Masks' mask is a 9x7 grid; this model's patch grid"),
                      (torch.zeros(2, 9, 7, dtype=torch.bool), "a mask tensor is a 9x7 grid"),
                      (build_mask("random", (7, 9))(3), "holds masks for 3 images; the batch has 2"),
                      (build_mask("random", (7, 9))(2).info(), None),
                      (torch.zeros(2, 2, 7, 9, dtype=torch.bool), "must be [B, 63] or [B, 7, 9]")]:  # fmt: skip
        if said is None:
            assert torch.isfinite(mae(imgs, mask=bad)[0])
            continue
        with pytest.raises(ValueError, match=re.escape(said)):
            mae(imgs, mask=bad)
    simmim = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64)
    with pytest.raises(ValueError, match="SimMIMViT: the Masks' mask holds masks for 2 images; the batch has 3"):
        simmim(torch.randn(3, 3, 64, 64), mask=simmim.mask_strategy()(2))
    with pytest.raises(ValueError, match="ratio must be in \\(0, 1\\)"):  # refused when built, not at each forward
        fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, mask_ratio=1.2)
    ijepa = fastmim.create_model("ijepa_vit_tiny_patch16", img_size=64)
    masks = ijepa.make_masks(2, torch.device("cpu"))
    torch.manual_seed(0)
    whole = ijepa(torch.ones(2, 3, 64, 64), mask=masks)[0]
    torch.manual_seed(0)
    parts = ijepa(torch.ones(2, 3, 64, 64), mask=masks.info(), targets=masks.targets)[0]
    torch.testing.assert_close(whole, parts)


def test_fcmaes_image_size_on_resume_is_a_said_change(image_folder, tmp_path, capsys):
    """FCMAE's weights do not depend on the image size, so a resume may change it, but not silently: it is said and
    recorded like any other data setting. And a YAML list of lr milestones reads as their text."""
    out = tmp_path / "run"
    args = [*tiny_args_for("fcmae_convnextv2_atto"), "--data-path", str(image_folder), "--output-dir", str(out)]
    pretrain.run([*args, "--max-steps", "1"])
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "2", "--img-size", "96"])
    assert "resuming with changed settings: img_size 64 -> 96" in capsys.readouterr().out
    assert json.loads((out / "resumes.jsonl").read_text())["changed"] == {"img_size": [64, 96]}
    (tmp_path / "m.yaml").write_text("lr_schedule: multistep\nlr_milestones: [300, 700.0]\n")
    assert pretrain.resolve_config(["--config", str(tmp_path / "m.yaml")])[0].milestone_epochs() == (300.0, 700.0)


def test_hog_options_reach_the_hog_target_of_every_recipe_that_takes_it():
    """hog_bins and gaussian_window (MaskFeat's mmpretrain setting) on MAE's and SimMIM's HOG target as on MaskFeat's:
    the same features; on another target, refused by name."""
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    want = fastmim.create_model("maskfeat_vit_tiny_patch16", img_size=64, hog_bins=12, gaussian_window=16).hog
    for name in ("mae_vit_tiny_patch16", "simmim_vit_tiny_patch16"):
        m = fastmim.create_model(name, img_size=64, target="hog", hog_bins=12, gaussian_window=16)
        assert m.hog.dim == want.dim == 4 * 12 * 3
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, ::3] = True
        torch.testing.assert_close(m.hog(imgs, mask), want(imgs, mask))
        for key, value in (("hog_bins", 12), ("gaussian_window", 16), ("hog_cell", 4)):
            with pytest.raises(ValueError, match=f"{key} applies to target='hog', not 'lowpass'"):
                fastmim.create_model(name, img_size=64, target="lowpass", **{key: value})


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("mae_vit_tiny_patch16", {"mask_type": "uniform", "mask_ratio": 0.6}, r"hides 75%.*mask_ratio=0.75"),
        ("mae_vit_tiny_patch16", {"img_size": 48, "mask_type": "uniform"}, "even"),
        ("pixmim_vit_tiny_patch16", {"img_size": 32, "mask_type": "simmim"}, "SimMIM masks need at least two"),
        ("simmim_vit_tiny_patch16", {"img_size": 16, "mask_type": "random"}, "one 16-px patch: SimMIMViT"),
        ("maskfeat_vit_tiny_patch16", {"img_size": 16}, "one 16-px patch: MaskFeatViT"),
        ("mae_vit_tiny_patch16", {"target": "hog", "norm_pix_loss": False}, "norm_pix_loss applies to pixel"),
        ("maskfeat_vit_tiny_patch16", {"mask_type": "random", "mask_exact": True}, "mask_exact applies to block"),
        ("maskfeat_vit_tiny_patch16", {"target": "lowpass"}, "target is its own: MAE, SimMIM and A2MIM take"),
        (
            "pixmim_vit_tiny_patch16",
            {"img_size": 64, "low_pass_radius": 44.6},  # the corner: 31.5 * sqrt(2) = 44.55
            r"keeps the whole spectrum of a 64x64 image \(its corner is 44.5.*below 44.5 \(PixMIM's: 11.4",
        ),
        ("simmim_vit_tiny_patch16", {"img_size": 64, "target": "lowpass", "low_pass_radius": 1e3}, "whole spectrum"),
        ("mae_vit_tiny_patch16", {"in_chans": 1, "target": "lowpass"}, "for in_chans=1 give image_mean and image_std"),
    ],
)
def test_a_composition_its_parts_cannot_take_is_refused_when_built(name, kwargs, message):
    """Refused by create_model with one message, not at the first forward (nor inside the loss), nor ignored."""
    with pytest.raises(ValueError, match=message):
        fastmim.create_model(name, **{"img_size": 64, **kwargs})


def test_model_args_naming_a_key_twice_are_refused(image_folder, tmp_path, capsys):
    args = [*tiny_args_for("mae_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(tmp_path)]
    assert pretrain.main([*args, "--model-args", "target=hog,target=lowpass"]) == 2
    assert "names target more than once" in capsys.readouterr().err


def test_resume_refuses_another_target_as_another_recipe(image_folder, tmp_path, capsys):
    """A low-pass (PixMIM-like) run resumed without its target, or with another, is refused naming the run's target,
    even where the weights' shapes would load (pixels and lowpass); the run's own target given again is no change."""
    out = tmp_path / "run"
    args = [*tiny_args_for("mae_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out)]
    pretrain.run([*args, "--max-steps", "1", "--model-args", "target=lowpass,low_pass_radius=6"])
    resume = ["--resume", "--output-dir", str(out), "--max-steps", "2"]
    for given, now in ((["--model-args", "none"], "model_args without a target (pixels)"),
                       (["--model-args", "target=hog"], "--model-args target=hog")):  # fmt: skip
        assert pretrain.main([*resume, *given]) == 2
        err = capsys.readouterr().err
        assert f"this run was trained with target=lowpass; {now} would change what it learns" in err, err
        assert "size mismatch" not in err
    assert pretrain.main([*resume, "--model-args", "hog_bins=6"]) == 2  # the target came from the run: said so
    err = capsys.readouterr().err
    assert "hog_bins applies to target='hog'" in err and "the model_args of the run being resumed with those given " \
        "now added: target='lowpass', low_pass_radius=6, hog_bins=6" in err, err  # fmt: skip
    assert pretrain.main([*resume, "--model-args", "target=lowpass"]) == 0
    out_text = capsys.readouterr().out
    assert "changed settings" not in out_text, out_text


@pytest.mark.parametrize("model,kw,said", [
    ("maskfeat_vit_tiny_patch16", {"mask_exact": "false"}, "mask_exact must be true or false, got 'false'"),
    ("maskfeat_vit_tiny_patch16", {"hog_bins": 2.5}, "hog_bins must be an int >= 1, got 2.5"),
    ("maskfeat_vit_tiny_patch16", {"gaussian_window": True}, "gaussian_window must be an int >= 0, got True"),
    ("a2mim_vit_tiny_patch16", {"fft_weight": -1}, "fft_weight must be a finite number >= 0, got -1"),
    ("a2mim_vit_tiny_patch16", {"fft_weight": "0.2"}, "fft_weight must be a finite number"),
    ("a2mim_vit_tiny_patch16", {"fft_weight": float("nan")}, "fft_weight must be a finite number"),
])  # fmt: skip
def test_recipe_settings_of_the_wrong_kind_are_refused_by_name(model, kw, said):
    """From --model-args or a YAML file: mask_exact went through bool() ('false' was True), fft_weight through float()
    (-1 maximised the frequency loss, a string was taken), hog_bins failed deep in torch and gaussian_window only at
    the first step."""
    with pytest.raises(ValueError, match=said):
        fastmim.create_model(model, img_size=64, **kw)
