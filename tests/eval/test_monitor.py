"""The kNN monitor of python -m fastmim.pretrain (--eval-data, --eval-every) and the run's training.png."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fastmim
from fastmim import pretrain
from fastmim.eval import load_encoder
from fastmim.models.registry import RECIPE_PREFIXES
from fastmim.train.plot import plot_metrics, read_series
from tests.conftest import TINY_ARGS, make_image_folder


@pytest.mark.parametrize("name", [m for m in fastmim.list_models() if m.startswith(RECIPE_PREFIXES) and
                                  ("vit_tiny_patch16" in m or "convnextv2_atto" in m)])  # fmt: skip
def test_every_recipes_encoder_loads_into_the_evaluated_encoder(name):
    """The monitor and python -m fastmim.eval build the encoder from the recipe's name alone: its weights must fit."""
    size = 64
    model = fastmim.create_model(name, img_size=size)
    enc, info = load_encoder(None, name, size)
    enc.load_state_dict(model.encoder_state_dict(), strict=True)
    assert info["img_size"] == size


def _labelled(tmp_path):
    root = tmp_path / "labelled"
    make_image_folder(root / "train", n=12, classes=3)
    make_image_folder(root / "val", n=6, classes=3, seed=1)
    return root


def _knn_rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "knn_top1" in r]


def test_monitor_logs_knn_without_changing_the_run_and_plots_it(image_folder, tmp_path, capsys):
    """kNN at step 0 (the initial encoder) and after every epoch, logged and printed; the run's weights are those of
    the same run without the monitor (it draws no random numbers of the run's); training.png shows both series."""
    base = [*TINY_ARGS, "--data-path", str(image_folder), "--epochs", "2", "--log-interval", "1", "--loader", "torch"]
    pretrain.run([*base, "--output-dir", str(tmp_path / "plain")])
    out = tmp_path / "mon"
    pretrain.run([*base, "--output-dir", str(out), "--eval-data", str(_labelled(tmp_path))])
    rows = _knn_rows(out)
    steps_per_epoch = 24 // 4
    assert [r["step"] for r in rows] == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and r["knn_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "kNN at step 0 (epoch 0): top-1" in printed and "kNN monitor:" in printed
    a, b = load_file(tmp_path / "plain" / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with Image.open(out / "training.png") as im:
        assert im.size == (1040, 340)  # two panels: loss and kNN
    with Image.open(tmp_path / "plain" / "training.png") as im:
        assert im.size == (520, 340)  # the loss alone
    assert (tmp_path / "plain" / "training.png").stat().st_size > 2000


def test_monitor_under_one_rank_fsdp_sees_the_gathered_encoder(image_folder, tmp_path):
    root = _labelled(tmp_path)
    base = [*TINY_ARGS, "--data-path", str(image_folder), "--max-steps", "3", "--loader", "torch", "--eval-data",
            str(root), "--eval-every", "5"]  # fmt: skip
    pretrain.run([*base, "--output-dir", str(tmp_path / "plain")])
    pretrain.run([*base, "--output-dir", str(tmp_path / "sh"), "--fsdp"])
    plain, sh = _knn_rows(tmp_path / "plain"), _knn_rows(tmp_path / "sh")
    assert [r["step"] for r in plain] == [r["step"] for r in sh] == [0, 3]  # the start and the run's end
    for p, s in zip(plain, sh, strict=True):
        assert p["knn_top1"] == s["knn_top1"] and p["knn_top5"] == s["knn_top5"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval-data", "MISSING"], "expected ROOT/train/<class>/ and ROOT/val/<class>/"),
        (["--eval-data", "FLAT"], "has no class folders"),
        (["--eval-every", "0"], "eval_every must be >= 1"),
    ],
)
def test_bad_eval_data_is_refused_before_training(image_folder, tmp_path, capsys, flags, message):
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "train" / "a.png")
    flags = [{"MISSING": str(tmp_path / "nowhere"), "FLAT": str(flat)}.get(f, f) for f in flags]
    out = tmp_path / "out"
    rc = pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


def test_read_series_keeps_a_resumed_runs_rows_over_the_old_ones_and_skips_a_cut_line(tmp_path):
    m = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}, {"step": 2, "loss": 2.5},
            {"step": 3, "loss": float("nan")}, {"step": 4, "knn_top1": 50.0}]  # fmt: skip
    m.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 5, "lo')
    assert read_series(m, "loss") == [(1, 3.0), (2, 2.5)]  # the resumed run's step 3 (not finite) replaced the old
    assert read_series(m, "knn_top1") == [(4, 50.0)]
    # a resume on more processes counts steps in larger units: the old run's later steps are not the new run's
    rows = [{"step": s, "loss": 2.0 - s / 10} for s in range(1, 10)] + [{"step": s, "loss": 1.0} for s in (5, 6, 7, 8)]
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_series(m, "loss") == [(s, 2.0 - s / 10) for s in range(1, 5)] + [(s, 1.0) for s in (5, 6, 7, 8)]
    assert plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png") is None and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_mae_pretrained_on_the_builtin_digits_beats_its_own_random_init(tmp_path):
    """The monitor's first and last kNN on the built-in digits: the encoder at step 0 (its random init) and after 10
    epochs of ViT-tiny MAE (one-block decoder, batch 32: 450 steps). Measured on 2 CPU cores (torch 2.14.1): top-1
    (patch-token mean) 77.46% -> 83.38% (+5.9 points on 355 images); asked: +3.0, half the measured margin. About
    45 s on 2 threads, 160 s on the one thread make test gives it (30 epochs at batch 64, 660 steps, gave +7.0 in
    100 s; 12 epochs at batch 64 were still below the init)."""
    out = tmp_path / "digits"
    pretrain.run([
        "--data-path", "builtin:digits", "--img-size", "64", "--epochs", "10", "--batch-size", "32",
        "--warmup-epochs", "3", "--decoder-depth", "1", "--decoder-embed-dim", "128", "--decoder-num-heads", "4",
        "--eval-data", "builtin:digits", "--eval-pool", "avg", "--eval-every", "10", "--vis-interval", "10",
        "--device", "cpu", "--amp", "none", "--loader", "torch", "--output-dir", str(out),
    ])  # fmt: skip
    rows = _knn_rows(out)
    assert [r["step"] for r in rows] == [0, 10 * (1442 // 32)]
    assert rows[-1]["knn_top1"] > rows[0]["knn_top1"] + 3.0, rows


def test_a_simmim_run_with_layer_scale_and_drop_path_is_monitored_evaluated_and_loads_into_timm(image_folder,
                                                                                              tmp_path):  # fmt: skip
    """SimMIM's ViT-B settings at tiny size (--layer-scale 0.1 --drop-path 0.1): the kNN monitor builds the encoder
    with layer scale, encoder.safetensors holds the learned gammas and loads into timm's
    VisionTransformer(init_values=...) and into python -m fastmim.eval's encoder with the same features; a resume
    that would change the layer scale is refused (the network's parameters)."""
    timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e '.[test]')")
    from fastmim.eval.finetune import finetune_network

    args = [
        *TINY_ARGS,
        "--model",
        "simmim_vit_tiny_patch16",
        "--data-path",
        str(image_folder),
        "--loader",
        "torch",
        "--layer-scale",
        "0.1",
        "--drop-path",
        "0.1",
        "--max-steps",
        "2",
        "--eval-data",
        str(_labelled(tmp_path)),
    ]
    for flag in ("--decoder-embed-dim", "--decoder-depth", "--decoder-num-heads"):
        i = args.index(flag)
        del args[i : i + 2]
    out = tmp_path / "run"
    pretrain.run([*args, "--output-dir", str(out)])
    assert [r["step"] for r in _knn_rows(out)] == [0, 2]  # at the start and at the end of the run
    state = load_file(out / "encoder.safetensors")
    gamma = state["blocks.0.ls1.gamma"]
    assert gamma.shape == (192,) and not torch.allclose(gamma, torch.full_like(gamma, 0.1))  # learned
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=0, init_values=1.0
    ).eval()
    theirs.load_state_dict(state, strict=True)
    enc, info = load_encoder(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)
    net, missing = finetune_network(enc, info, 3, 0.1)
    assert all(not k.startswith("blocks.") for k in missing)  # every gamma found its place
    torch.testing.assert_close(net.blocks[3].ls2.gamma, state["blocks.3.ls2.gamma"])
    with pytest.raises(pretrain.UsageError, match="trained with layer_scale 0.1; --layer-scale 0.2 would change"):
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3", "--layer-scale", "0.2"])
    with pytest.raises(pretrain.UsageError, match="trained with layer_scale 0.1; --layer-scale none would change"):
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3", "--layer-scale", "none"])
    # a run without layer scale (or from before the option) that a config's layer_scale would give one
    plain = tmp_path / "plain"
    i = args.index("--layer-scale")
    pretrain.run([*args[:i], *args[i + 2 :], "--output-dir", str(plain)])
    with pytest.raises(
        pretrain.UsageError,
        match=r"trained with no layer_scale; --layer-scale 0.1 would change the "
        r"network its checkpoint holds: drop them \(--layer-scale none\)",
    ):
        pretrain.run(["--resume", "--output-dir", str(plain), "--max-steps", "3", "--layer-scale", "0.1"])


def test_simmims_vit_b_encoder_shared_bias_no_abs_pos_trains_evaluates_fine_tunes_and_resumes(
    image_folder, tmp_path, capsys, monkeypatch
):
    """SimMIM's ViT-B encoder at tiny size (--rel-pos-bias shared --abs-pos none): the kNN monitor builds it,
    encoder.safetensors holds the learned table and no pos_embed, loads into timm's Beit and into python -m
    fastmim.eval's encoder with the same features; a fine-tuning network (timm's Beit) saved as finetuned.safetensors
    loads back as an encoder; a resume that would change either setting is refused, naming the way back."""
    timm_beit = pytest.importorskip("timm.models.beit", reason="timm is a test dependency (pip install -e '.[test]')")
    from fastmim.eval.finetune import finetune_network
    from fastmim.models.vit import beit_kwargs, to_beit_state_dict
    from fastmim.train.checkpoint import save_encoder
    from tests.conftest import tiny_args_for

    args = [*tiny_args_for("simmim_vit_tiny_patch16"), "--data-path", str(image_folder), "--loader", "torch",
            "--rel-pos-bias", "shared", "--abs-pos", "none", "--max-steps", "2",
            "--eval-data", str(_labelled(tmp_path)), "--vit-init", "beit"]  # fmt: skip
    out = tmp_path / "run"
    pretrain.run([*args, "--output-dir", str(out)])
    assert [r["step"] for r in _knn_rows(out)] == [0, 2]
    state = load_file(out / "encoder.safetensors")
    assert "pos_embed" not in state and state["rel_pos_bias.relative_position_bias_table"].abs().sum() > 0  # learned
    enc, info = load_encoder(out)
    assert enc.rel_pos_mode == "shared" and enc.pos_embed is None and info["img_size"] == 64
    theirs = timm_beit.Beit(**beit_kwargs(enc)).eval()
    theirs.load_state_dict(to_beit_state_dict(state), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="resampling its table is not supported, evaluate at 64"):
        load_encoder(out, img_size=96)
    from safetensors import safe_open

    with safe_open(str(out / "encoder.safetensors"), "pt") as f:
        assert f.metadata()["format"].startswith("timm Beit after fastmim.models.vit.to_beit_state_dict")
    net, missing = finetune_network(enc, info, 3, 0.1)
    assert isinstance(net, timm_beit.Beit) and sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                                                   "head.weight"]  # fmt: skip
    # SimMIM's and BEiT's fine-tuning: the shared table copied into every block, each at its block's layer-decayed lr
    assert net.rel_pos_bias is None
    for blk in net.blocks:
        torch.testing.assert_close(
            blk.attn.relative_position_bias_table, state["rel_pos_bias.relative_position_bias_table"]
        )
    from fastmim.eval.finetune import build_optimizer

    names = {id(p): n for n, p in net.named_parameters()}
    scales = {
        names[id(p)]: g["lr_scale"] for g in build_optimizer(net, 1.0, 0.05, 0.65).param_groups for p in g["params"]
    }
    assert scales["blocks.0.attn.relative_position_bias_table"] == pytest.approx(0.65**12)
    assert scales["blocks.11.attn.relative_position_bias_table"] == pytest.approx(0.65)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    save_encoder(tmp_path / "finetuned.safetensors", net.state_dict(), {"model": "vit_tiny_patch16", "pool": "avg"})
    tuned, _ = load_encoder(tmp_path / "finetuned.safetensors")
    assert tuned.rel_pos_mode == "block" and tuned.fc_norm is not None
    again = timm_beit.Beit(**beit_kwargs(tuned)).eval()  # a fine-tuned encoder (global pool) exports as well
    again.load_state_dict(to_beit_state_dict(tuned.state_dict()), strict=True)
    with torch.no_grad():
        want = net.eval().forward_head(net.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tuned(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(pretrain.UsageError, match=r"trained with rel_pos_bias shared; --rel-pos-bias block would"):
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3", "--rel-pos-bias", "block"])
    with pytest.raises(pretrain.UsageError, match=r"trained with abs_pos none; --abs-pos sincos would change"):
        pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3", "--abs-pos", "sincos"])
    # a run without a bias (or from before the option) that a config's rel_pos_bias would give one
    plain = tmp_path / "plain"
    i = args.index("--rel-pos-bias")
    pretrain.run([*args[:i], *args[i + 4 :], "--output-dir", str(plain)])
    with pytest.raises(pretrain.UsageError, match=r"drop them \(--rel-pos-bias none\)"):
        pretrain.run(["--resume", "--output-dir", str(plain), "--max-steps", "3", "--rel-pos-bias", "shared"])
    with pytest.raises(pretrain.UsageError, match="applies to SimMIM, A2MIM and MaskFeat"):
        pretrain.run([*TINY_ARGS, "--rel-pos-bias", "shared", "--output-dir", str(tmp_path / "mae")])
    with pytest.raises(pretrain.UsageError, match="--vit-init beit applies to SimMIM, A2MIM and MaskFeat"):
        pretrain.run([*TINY_ARGS, "--vit-init", "beit", "--output-dir", str(tmp_path / "mae")])
    said = r"fft_weight must be a finite number >= 0, got 'abc' \(with --model-args fft_weight='abc'\)"
    with pytest.raises(pretrain.UsageError, match=said):
        pretrain.run([*tiny_args_for("a2mim_vit_tiny_patch16"), "--model-args", "fft_weight=abc", "--output-dir",
                      str(tmp_path / "a2")])  # fmt: skip
    # another initialisation on resume changes nothing in the run: said, and the run keeps (and records) its own
    capsys.readouterr()
    pretrain.run(["--resume", "--output-dir", str(out), "--max-steps", "3", "--vit-init", "mae"])
    assert "--vit-init mae changes nothing in a resumed run (its weights come from the checkpoint): it keeps " \
        "vit_init beit" in capsys.readouterr().out  # fmt: skip
    assert "vit_init: beit" in (out / "config.yaml").read_text()
    record = out / "resumes.jsonl"
    assert not record.exists() or all(
        "vit_init" not in json.loads(x)["changed"] for x in record.read_text().splitlines()
    )
    # python -m fastmim.eval --random RUN: the baseline of the run's own encoder (its options and initialisation)
    from fastmim.eval.__main__ import _run_encoder

    model, vit, size = _run_encoder(out, None)
    fresh, info = load_encoder(None, model, size, vit=vit)
    assert info["random_init"] and size == 64 and fresh.rel_pos_mode == "shared" and fresh.pos_embed is None
    assert fresh.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.0108, rel=0.1)  # BEiT's (cut at 1 std)
    assert not fresh.rel_pos_bias.relative_position_bias_table.any()
    from fastmim.eval.__main__ import main as eval_main

    monkeypatch.chdir(tmp_path)  # a relative run folder, named in the result as an absolute one
    eval_main(["knn", "--random", "run", "--data-path", "labelled", "--device", "cpu", "--out", "ev.jsonl"])
    row = json.loads((tmp_path / "ev.jsonl").read_text())
    assert row["random_from"] == str(out.resolve()) and row["random_options"]["rel_pos_bias"] == "shared"
    eval_main(["knn", "--random", "run", "--data-path", "labelled", "--device", "cpu"])  # no --out: in the run's folder
    row = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert row["random_init"] and row["random_from"] == str(out.resolve()) and not (tmp_path / "eval.jsonl").exists()


def test_settings_a_run_does_not_read_are_said(image_folder, tmp_path, capsys):
    """--eval-every / --eval-pool without --eval-data, --dali-device / --allow-unscanned with the torch loader: each
    said in a note (a config file may hold them for other runs), none for their defaults."""
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "torch", "--max-steps", "1"]
    pretrain.run([*args, "--eval-every", "3", "--eval-pool", "avg", "--dali-device", "cpu", "--allow-unscanned",
                  "--output-dir", str(tmp_path / "a")])  # fmt: skip
    out = capsys.readouterr().out
    assert "note: --eval-every 3 and --eval-pool avg apply with --eval-data (the kNN monitor)" in out
    assert "note: --dali-device cpu and --allow-unscanned apply to the DALI loader; this run reads with torch" in out
    pretrain.run([*args, "--output-dir", str(tmp_path / "b")])
    assert "--eval-data (the kNN monitor)" not in capsys.readouterr().out


def test_an_unreadable_eval_data_image_stops_the_run_unless_it_skips_bad_files(image_folder, tmp_path, capfd):
    """The monitor's images are decoded before training: an unreadable one is refused by name, or, with the run's
    --skip-bad-files, left out (named; the monitor counts the readable ones)."""
    from fastmim.eval.monitor import KnnMonitor

    labelled = _labelled(tmp_path)
    bad = sorted((labelled / "val").rglob("*.jpg"))[2]
    bad.write_bytes(b"junk")
    base = [*TINY_ARGS, "--data-path", str(image_folder), "--max-steps", "1", "--loader", "torch", "--eval-data",
            str(labelled)]  # fmt: skip
    with pytest.raises(pretrain.UsageError, match="cannot read image") as e:
        pretrain.run([*base, "--output-dir", str(tmp_path / "a"), "--num-workers", "1"])
    assert "Traceback" not in str(e.value) and "or run with --skip-bad-files" in str(e.value)
    pretrain.run([*base, "--output-dir", str(tmp_path / "b"), "--skip-bad-files"])
    assert f"skipped: cannot read image {str(bad)!r}" in capfd.readouterr().err
    assert len(_knn_rows(tmp_path / "b")) == 2  # (step 0 and the end)
    monitor = KnnMonitor(str(labelled), "mae_vit_tiny_patch16", 32, torch.device("cpu"), skip_bad=True)
    assert (monitor.train_images, monitor.val_images) == (12, 5)


def test_the_monitor_refuses_a_split_it_can_read_no_image_of(tmp_path):
    """Every validation image unreadable and skipped: an accuracy of nothing (0%, every evaluation) was logged."""
    from fastmim.eval.monitor import KnnMonitor

    labelled = _labelled(tmp_path)
    for f in (labelled / "val").rglob("*.jpg"):
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match="no image of the validation folder .* can be read"):
        KnnMonitor(str(labelled), "mae_vit_tiny_patch16", 32, torch.device("cpu"), skip_bad=True)


def test_a_labelled_folder_says_the_files_it_does_not_read(tmp_path, capfd):
    """GIFs and other non-image files inside class folders were left out of the kNN in silence (the pretraining's
    folder says them): the evaluation says them too, by extension."""
    from PIL import Image

    from fastmim.eval.encoder import LabelledFolder
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "train", n=6, classes=2)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(root / "class0" / f"g{i}.gif")
    (root / "class1" / "readme.txt").write_text("x")
    capfd.readouterr()
    folder = LabelledFolder(root)
    assert len(folder) == 6
    err = capfd.readouterr().err
    assert f"note: {root}: 4 file(s) without an image extension" in err and ".gif" in err and ".txt" in err, err


def test_monitor_takes_the_feature_the_evaluation_takes_for_data2vec2(tmp_path):
    """--eval-pool auto was the class token in the monitor but the token mean in python -m fastmim.eval for a
    data2vec 2.0 encoder (its own evaluation's), so metrics.jsonl's knn_top1 and the evaluation's were of two
    features; both now read one rule. Other recipes keep the class token."""
    from fastmim.eval.monitor import KnnMonitor

    labelled = _labelled(tmp_path)
    d2v = KnnMonitor(str(labelled), "data2vec2_vit_tiny_patch16", 32, torch.device("cpu"))
    assert d2v.pool == "avg"
    assert KnnMonitor(str(labelled), "mae_vit_tiny_patch16", 32, torch.device("cpu")).pool == "auto"
    assert KnnMonitor(str(labelled), "data2vec2_vit_tiny_patch16", 32, torch.device("cpu"), pool="cls").pool == "cls"


def test_a_data2vec2_run_monitored_before_the_token_mean_says_so_at_its_resume(image_folder, tmp_path, capsys):
    """A data2vec 2.0 run's monitor took the class token before it took the evaluation's feature (the token mean):
    resumed from such a checkpoint (no monitor_pool in it), knn_top1 changes feature at that step, and the run says
    so; a checkpoint that records the feature resumes without the note."""
    from tests.conftest import tiny_args_for

    out = tmp_path / "run"
    args = [*tiny_args_for("data2vec2_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
            "--eval-data", str(_labelled(tmp_path)), "--epochs", "2", "--vis-interval", "0"]  # fmt: skip
    assert pretrain.main([*args, "--max-steps", "2"]) == 0
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["monitor_pool"] == "avg"
    capsys.readouterr()
    assert pretrain.main([*args, "--max-steps", "3", "--resume"]) == 0
    assert "token mean of a data2vec 2.0 encoder" not in capsys.readouterr().out
    state = torch.load(ckpt, weights_only=False)
    del state["monitor_pool"]  # as an earlier fastmim wrote it
    torch.save(state, ckpt)
    assert pretrain.main([*args, "--max-steps", "4", "--resume"]) == 0
    assert "this run's earlier knn_top1 rows are of the class token" in capsys.readouterr().out


def test_the_monitor_votes_as_dino_by_default():
    """The pretraining run builds its monitor with the defaults: DINO's k=20 and T=0.07, as python -m fastmim.eval knn
    (a monitor's knn_top1 and the evaluation's are the same number for the same encoder)."""
    import inspect

    from fastmim.eval.monitor import KnnMonitor

    params = inspect.signature(KnnMonitor).parameters
    assert (params["k"].default, params["temperature"].default) == (20, 0.07)
