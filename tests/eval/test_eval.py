"""fastmim.eval: DINO's weighted kNN against a direct NumPy vote, LARS against its formula, encoders from fastmim runs
and timm checkpoints, the built-in labelled digits, the CLI and its errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmim
from fastmim.eval import LARS, knn_accuracy, knn_scores, load_encoder, pooled_features
from fastmim.eval.__main__ import main as eval_main
from fastmim.eval.encoder import LabelledFolder
from tests.conftest import make_image_folder


def numpy_weighted_knn(train, train_labels, test, num_classes, k, T):
    """DINO's vote written out sample by sample."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, f in enumerate(test):
        sim = train @ f
        for j in np.argsort(-sim, kind="stable")[:k]:
            scores[i, train_labels[j]] += np.exp(sim[j] / T)
    return scores


@pytest.mark.parametrize("k,chunk", [(20, 1024), (5, 7), (500, 16)])
def test_knn_scores_equal_the_weighted_vote_written_out(k, chunk):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32))
    train_labels = rng.integers(0, 6, size=300)
    test_labels = rng.integers(0, 6, size=45)
    train = centres[train_labels] + rng.normal(scale=1.5, size=(300, 32))
    test = centres[test_labels] + rng.normal(scale=1.5, size=(45, 32))
    want = numpy_weighted_knn(train, train_labels, test, 6, min(k, 300), 0.07)
    got = knn_scores(torch.tensor(train, dtype=torch.float32), torch.tensor(train_labels), torch.tensor(test,
                     dtype=torch.float32), 6, k=k, temperature=0.07, chunk=chunk)  # fmt: skip
    unit = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in (train, test)]
    nearest = (unit[1] @ unit[0].T).max(1, keepdims=True)  # each row scaled by exp(-nearest / T): no overflow
    np.testing.assert_allclose(got.numpy(), want * np.exp(-nearest / 0.07), rtol=2e-4)
    tensors = [torch.tensor(a) for a in (train, train_labels, test, test_labels)]
    acc = knn_accuracy(*tensors, 6, k=k)
    top1 = 100 * np.mean(want.argmax(1) == test_labels)
    top5 = 100 * np.mean([t in np.argsort(-s, kind="stable")[:5] for s, t in zip(want, test_labels, strict=True)])
    assert acc["top1"] == pytest.approx(top1) and acc["top5"] == pytest.approx(top5)
    assert 40 < acc["top1"] < 100  # the clusters overlap: neither trivial nor hopeless


def test_knn_at_a_small_temperature_votes_for_the_nearest_neighbour():
    """exp(s / T) overflowed fp32 at T < 0.0113 (cos / T > 88.7): every near neighbour voted inf, the classes tied and
    top-1 collapsed (99% -> 10%); at T = 0.001 the vote is the nearest neighbour's class (1-NN)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    train_labels, test_labels = rng.integers(0, 10, size=200), rng.integers(0, 10, size=50)
    train = torch.tensor(centres[train_labels] + rng.normal(scale=0.8, size=(200, 16)), dtype=torch.float32)
    test = torch.tensor(centres[test_labels] + rng.normal(scale=0.8, size=(50, 16)), dtype=torch.float32)
    scores = knn_scores(train, torch.tensor(train_labels), test, 10, k=20, temperature=0.001)
    assert torch.isfinite(scores).all()
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    one_nn = torch.tensor(train_labels)[sims.argmax(1)]
    assert torch.equal(scores.argmax(1), one_nn)
    acc = knn_accuracy(train, torch.tensor(train_labels), test, torch.tensor(test_labels), 10, k=20, temperature=0.001)
    assert acc["top1"] == pytest.approx(100 * float((one_nn == torch.tensor(test_labels)).float().mean()))
    assert acc["top1"] > 80
    # top-5: the other classes' votes underflow to 0 at this T, yet they are ranked by their nearest neighbour among
    # the k (log votes), not arbitrarily
    top, idx = sims.topk(20, dim=1)
    best = torch.full((50, 10), -math.inf).scatter_reduce(1, torch.tensor(train_labels)[idx], top, "amax")
    ranked = best.topk(5, dim=1).indices
    expected = (ranked == torch.tensor(test_labels).view(-1, 1)).any(1).float().mean()
    for t in (0.001, 0.0001):
        acc = knn_accuracy(train, torch.tensor(train_labels), test, torch.tensor(test_labels), 10, k=20, temperature=t)
        assert acc["top5"] == pytest.approx(100 * float(expected)), t


def test_knn_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same D"):
        knn_scores(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), torch.zeros(2, 9), 2)
    with pytest.raises(ValueError, match="labels"):
        knn_scores(torch.zeros(4, 8), torch.zeros(3, dtype=torch.long), torch.zeros(2, 8), 2)
    with pytest.raises(ValueError, match="k must be"):
        knn_scores(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), torch.zeros(2, 8), 2, k=0)


def test_lars_steps_as_its_formula():
    """Two steps with momentum: weights (ndim 2) scaled by trust * ||w|| / ||g + wd w||, the bias by nothing; a zero
    weight steps with the plain gradient."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    z = torch.nn.Parameter(torch.zeros(2, 2))
    lr, wd, mom, trust = 0.5, 0.01, 0.9, 0.001
    opt = LARS([w, b, z], lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=trust)
    ws, bs, zs = w.detach().double().numpy().copy(), b.detach().double().numpy().copy(), np.zeros((2, 2))
    mu_w, mu_b, mu_z = np.zeros_like(ws), np.zeros_like(bs), np.zeros_like(zs)
    for step in range(2):
        gw, gb, gz = (torch.randn(4, 3), torch.randn(4), torch.randn(2, 2))
        w.grad, b.grad, z.grad = gw.clone(), gb.clone(), gz.clone()
        opt.step()
        u = gw.double().numpy() + wd * ws
        mu_w = mom * mu_w + trust * np.linalg.norm(ws) / np.linalg.norm(u) * u
        ws = ws - lr * mu_w
        mu_b = mom * mu_b + gb.double().numpy()  # one dimension: no trust ratio, no weight decay
        bs = bs - lr * mu_b
        mu_z = mom * mu_z + (gz.double().numpy() + wd * zs) * (1.0 if step == 0 or not zs.any() else
                                                                trust * np.linalg.norm(zs) / np.linalg.norm(
                                                                    gz.double().numpy() + wd * zs))  # fmt: skip
        zs = zs - lr * mu_z
        np.testing.assert_allclose(w.detach().double().numpy(), ws, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.detach().double().numpy(), bs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(z.detach().double().numpy(), zs, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="LARS"):
        LARS([w], lr=0.1, momentum=1.5)


def _save_run_encoder(tmp_path, name="mae_vit_tiny_patch16", img_size=32):
    """An encoder.safetensors as a run writes it (the recipe's name, step and image size in its metadata)."""
    import fastmim
    from fastmim.train.checkpoint import save_encoder

    torch.manual_seed(1)
    model = fastmim.create_model(name, img_size=img_size)
    path = tmp_path / "run" / "encoder.safetensors"
    path.parent.mkdir(parents=True)
    save_encoder(path, model.encoder_state_dict(), {"model": name, "step": "12", "img_size": str(img_size)})
    return model, path


def test_a_vit_at_another_image_size_gets_its_position_embedding_interpolated(tmp_path, capsys):
    """--img-size other than the encoder's: the class token's embedding kept, the patch positions resampled
    bicubically as MAE's interpolate_pos_embed (checked against F.interpolate of the 2x2 grid), and the encoder runs
    at the new size; a size that is not a multiple of the patch is refused."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    _, path = _save_run_encoder(tmp_path)  # 32 px, patch 16: a 2x2 grid
    pe = load_file(path)["pos_embed"]
    enc, info = load_encoder(path, img_size=64)
    assert info["img_size"] == 64 and enc.pos_embed.shape == (1, 1 + 16, pe.shape[-1])
    assert "interpolated from 2x2 to 4x4 patches" in capsys.readouterr().out
    torch.testing.assert_close(enc.pos_embed[:, :1], pe[:, :1])
    want = F.interpolate(pe[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)  # fmt: skip
    torch.testing.assert_close(enc.pos_embed[:, 1:], want)
    assert pooled_features(enc, torch.randn(2, 3, 64, 64)).shape == (2, pe.shape[-1])
    with pytest.raises(ValueError, match="--img-size 40 is not a multiple of the encoder's patch size 16"):
        load_encoder(path, img_size=40)


def test_run_encoder_loads_with_its_size_and_weights(tmp_path):
    model, path = _save_run_encoder(tmp_path)
    enc, info = load_encoder(path.parent)  # the run directory
    assert info["encoder"] == "vit_tiny_patch16" and info["img_size"] == 32 and info["step"] == 12
    for k, v in model.encoder_state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)
    with pytest.raises(ValueError, match="--img-size 40 is not a multiple of the encoder's patch size 16"):
        load_encoder(path, img_size=40)  # (another multiple of 16 interpolates the position embedding)
    with pytest.raises(ValueError, match="says it holds 'mae_vit_tiny_patch16'; --model vit_small_patch16 contra"):
        load_encoder(path, model="vit_small_patch16")
    torch.save(model.encoder_state_dict(), tmp_path / "plain.pth")  # no metadata: --model decides, the weights judge
    with pytest.raises(ValueError, match="do not fit encoder 'vit_small_patch16'"):
        load_encoder(tmp_path / "plain.pth", model="vit_small_patch16")
    with pytest.raises(FileNotFoundError, match="no encoder.safetensors"):
        load_encoder(tmp_path)
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder(None, model="resnet50")


@pytest.mark.parametrize("timm_name,ours", [("vit_tiny_patch16_224", "vit_tiny_patch16"),
                                            ("convnextv2_atto", "convnextv2_atto")])  # fmt: skip
def test_timm_checkpoint_gives_timm_features(tmp_path, timm_name, ours):
    """A timm classifier's checkpoint (head included, as timm saves it) evaluates as that network's pre-logits."""
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, num_classes=7).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "timm.pth")
    with pytest.raises(ValueError, match=r"name it with --model \(model= in Python; "):
        load_encoder(tmp_path / "timm.pth")
    enc, info = load_encoder(tmp_path / "timm.pth", model=ours)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        got = pooled_features(enc, x, "cls" if ours.startswith("vit") else "auto")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_labelled_folder_errors_name_the_problem(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        LabelledFolder(flat)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LabelledFolder(tmp_path / "missing")
    train = make_image_folder(tmp_path / "train", n=8, classes=2)
    val = make_image_folder(tmp_path / "val", n=9, classes=3)
    with pytest.raises(ValueError, match=r"classes the training folder has not \(or has no images of\): class2"):
        LabelledFolder(val, classes=LabelledFolder(train).classes)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        LabelledFolder(tmp_path / "empty")
    (train / "zzz_empty").mkdir()  # an empty class folder beside real ones: not a class
    (train / "owl").mkdir()  # a class of a format not read: left out, and the note says what its files are
    Image.new("RGB", (8, 8)).save(train / "owl" / "o.gif")
    (train / "owl2").mkdir()
    Image.new("RGB", (8, 8)).save(train / "owl2" / "o.jfif", "JPEG")  # a JPEG under its other name: read
    capsys.readouterr()
    assert LabelledFolder(train).classes == ["class0", "class1", "owl2"]
    out = capsys.readouterr().out
    assert (
        "class folders without images (.jpg, .jpeg, .jpe, .jfif," in out and "left out: owl (.gif 1), zzz_empty" in out
    )


def test_a_link_in_a_class_folder_up_the_tree_or_into_another_class_labels_no_image_as_that_class(tmp_path, capsys):
    """A symlink in a class folder back to the data root (``ln -s .. D/train/10/loop``) labelled every other class's
    images as that class, silently: a class's walk enters neither the root, nor a folder above it, nor another class's
    folder, and says what it left out; a symlinked class folder and linked images are read."""
    from fastmim.data.folder import list_images

    root = make_image_folder(tmp_path / "train", n=6, classes=3)
    outside = make_image_folder(tmp_path / "elsewhere", n=2, classes=1, seed=1)
    (root / "class0" / "loop").symlink_to("..")  # the data root
    (root / "class0" / "top").symlink_to(tmp_path)  # above it
    (root / "class1" / "other").symlink_to(root / "class2")  # another class's folder
    (root / "class3").symlink_to(outside / "class0")  # a symlinked class folder
    (root / "class2" / "linked.jpg").symlink_to(outside / "class0" / "img000.jpg")  # a linked image
    (root / "class2" / "sub").mkdir()  # a link into a folder inside another class's
    shutil.copy(root / "class2" / "img002.jpg", root / "class2" / "sub" / "deep.jpg")
    (root / "class1" / "deeper").symlink_to(root / "class2" / "sub")
    folder = LabelledFolder(root)
    assert folder.classes == ["class0", "class1", "class2", "class3"]
    assert sorted((os.path.relpath(p, root), y) for p, y in folder.samples) == [
        ("class0/img000.jpg", 0), ("class0/img003.jpg", 0), ("class1/img001.jpg", 1), ("class1/img004.jpg", 1),
        ("class2/img002.jpg", 2), ("class2/img005.jpg", 2), ("class2/linked.jpg", 2), ("class2/sub/deep.jpg", 2),
        ("class3/img000.jpg", 3), ("class3/img001.jpg", 3)]  # fmt: skip
    err = capsys.readouterr().err
    assert "2 linked folder(s) lead to a folder already read or holding it" in err
    assert "2 folder(s) in a class folder lead into another class's folder (a link, or class folders inside one " \
        "another): not read there" in err  # fmt: skip
    assert not any("/top/" in f for f in list_images(root))  # the pretraining's walk does not go above its root
    (root / "up").symlink_to("..")  # a "class folder" linking back up: not a class (it read every other's images)
    folder = LabelledFolder(root)
    assert folder.classes == ["class0", "class1", "class2", "class3"] and len(folder.samples) == 10
    assert "folder(s) linking back up the tree are not classes: up" in capsys.readouterr().out


def test_a_validation_class_differing_only_in_unicode_normalisation_is_named_so(tmp_path):
    """A validation class 'cafe\\u0301' (NFD, as macOS can write it) beside the training folder's 'caf\\xe9' (NFC) was
    refused as a class the training folder has not, which looked impossible (both print café): the message says
    how they differ. They are not merged."""
    train = make_image_folder(tmp_path / "train", n=4, classes=2)
    val = make_image_folder(tmp_path / "val", n=4, classes=2, seed=1)
    try:
        (train / "class1").rename(train / "caf\u00e9")
        (val / "class1").rename(val / "cafe\u0301")
    except OSError as e:
        pytest.skip(f"the file system refuses the names ({e})")
    if sorted(os.listdir(val)) == sorted(os.listdir(train)):
        pytest.skip("the file system normalises names itself (both are one class here)")
    said = r"has classes the training folder has not \(or has no images of\): cafe\u0301 \(it differs from the " \
        r"training folder's 'caf\u00e9' only in its Unicode normalisation, 'cafe\\u0301' vs 'caf\\xe9', as a copy " \
        r"from macOS can leave it: rename one\)$"  # fmt: skip
    with pytest.raises(ValueError, match=said):
        LabelledFolder(val, classes=LabelledFolder(train).classes)


def test_builtin_digits_are_real_labelled_class_folders():
    from fastmim.data.samples import builtin_digits, resolve_data_path

    train, val = builtin_digits()
    t, v = LabelledFolder(train), LabelledFolder(val, classes=LabelledFolder(train).classes)
    assert t.classes == [str(d) for d in range(10)] and len(t) + len(v) == 1797 and len(v) == 355
    assert not {p for p, _ in t.samples} & {p for p, _ in v.samples}
    img, label = t[0]
    assert img.size == (64, 64) and label == 0 and len(np.unique(np.asarray(img))) > 5  # a grey-level scan, not blank
    assert resolve_data_path("builtin:digits-val") == str(val) and resolve_data_path("/x") == "/x"
    with pytest.raises(ValueError, match="unknown built-in"):
        resolve_data_path("builtin:cifar")


def test_cli_knn_and_linprobe_write_json_and_reuse_features(tmp_path, capsys, monkeypatch):
    import fastmim.eval.encoder as encoder_module

    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=12, classes=3)
    val = make_image_folder(tmp_path / "val", n=6, classes=3, seed=1)
    common = ["--encoder", str(path), "--data-path", str(train), "--val-path", str(val), "--batch-size", "5"]
    assert eval_main(["knn", *common]) == 0
    assert eval_main(["knn", *common]) == 0
    extracted, real = [], encoder_module.cached_features
    monkeypatch.setattr(encoder_module, "cached_features", lambda enc, info, ds, *a: extracted.append(ds.root)
                        or real(enc, info, ds, *a))  # fmt: skip
    assert eval_main(["linprobe", *common, "--epochs", "3", "--warmup-epochs", "1"]) == 0
    assert extracted == [val]  # the augmented probe trains on views: no centre-crop features of the training set
    monkeypatch.setattr(encoder_module, "cached_features", real)
    assert eval_main(["linprobe", *common, "--epochs", "2", "--no-augment"]) == 0
    lines = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in lines] == ["knn", "knn", "linprobe", "linprobe"]
    first, second = lines[0], lines[1]
    assert not first["features_cached"] and second["features_cached"]  # the second read them from the cache
    assert first["top1"] == second["top1"] and first["train_images"] == 12 and first["classes"] == 3
    # the protocol's settings as they were resolved: auto pooling of a ViT with a class token is its class token
    assert first["pool"] == "cls" and first["pool_arg"] == "auto" and first["seed"] == 0 and first["batch_size"] == 5
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in lines) and lines[2]["augment"] and not lines[3]["augment"]
    assert (lines[2]["warmup_epochs"], lines[2]["min_lr"], lines[3]["warmup_epochs"]) == (1, 0.0, 10)  # the schedule
    assert (lines[2]["probe_batch"], lines[2]["steps_per_epoch"]) == (5, 2)  # --batch-size 5 of 12 images
    assert "kNN (k=20, T=0.07) of mae_vit_tiny_patch16 step 12: top-1" in capsys.readouterr().out
    # what reproduces it: the weights' digest (whatever the file is called later), the versions, the view
    assert first["encoder_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["versions"]["fastmim"] == fastmim.__version__ and first["versions"]["torch"] == torch.__version__
    assert first["view"] == {"crop_pct": 0.875, "interpolation": "bicubic"}


def test_cli_knn_of_an_fcmae_convnext_at_its_training_size(tmp_path):
    model, path = _save_run_encoder(tmp_path, "fcmae_convnextv2_atto", img_size=64)
    enc, info = load_encoder(path)
    assert info["encoder"] == "convnextv2_atto" and info["img_size"] == 64
    for k, v in model.encoder_state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)
    train = make_image_folder(tmp_path / "train", n=8, classes=2)
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(train), "--val-path", str(train)]) == 0
    row = json.loads((path.parent / "eval.jsonl").read_text())
    assert row["img_size"] == 64 and row["feature_dim"] == 320 and row["model"] == "fcmae_convnextv2_atto"


def test_a_write_the_file_system_refuses_is_one_line_and_an_uncached_evaluation_goes_on(tmp_path, capsys,
                                                                                        monkeypatch):  # fmt: skip
    """torch.save's "unexpected pos" with space to spare (a file size limit, an I/O error): the feature cache not
    written is a note, the kNN still reported; a fine-tuning checkpoint not written stops it in one line naming the
    file (a traceback, exit 1, since such failures became WriteError, an OSError eval did not catch)."""
    import shutil

    _, path = _save_run_encoder(tmp_path)
    data = tmp_path / "d"
    make_image_folder(data / "train", n=8, classes=2)
    make_image_folder(data / "val", n=4, classes=2, seed=1)
    real = torch.save

    def refused(obj, f, *a, **k):
        if isinstance(obj, dict) and ("features" in obj or "opt" in obj):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 50")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", refused)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**9, 10**12 - 10**9))
    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(data), "--k", "3"]) == 0
    err = capsys.readouterr().err
    assert "note: the features were not cached (cannot write " in err and "; the evaluation goes on" in err, err
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    tune = ["finetune", "--encoder", str(path), "--data-path", str(data), "--epochs", "1", "--batch-size", "4",
            "--aa", "none", "--mixup", "0", "--cutmix", "0", "--finetune-dir", str(tmp_path / "ft")]  # fmt: skip
    assert eval_main(tune) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path / 'ft' / 'checkpoint.pt'} (")
    assert "Traceback" not in err


def test_cli_errors(tmp_path, capsys):
    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=6, classes=2)
    val = make_image_folder(tmp_path / "val", n=6, classes=3)
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(train), "--val-path", str(val)]) == 2
    assert "classes the training folder has not" in capsys.readouterr().err
    assert eval_main(["knn", "--encoder", str(path), "--model", "vit_small_patch16", "--data-path", str(train),
                      "--val-path", str(train)]) == 2  # fmt: skip
    assert "contradicts it" in capsys.readouterr().err
    # --data-path alone: ROOT/{train,val} or builtin:digits, as --eval-data; a folder of classes is not that
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(train)]) == 2
    assert "--data-path " in (err := capsys.readouterr().err) and "ROOT/train/<class>/" in err and "--val-path" in err
    with pytest.raises(SystemExit):
        eval_main(["knn", "--encoder", str(path), "--val-path", str(train)])
    assert "--val-path needs --data-path" in capsys.readouterr().err
    split = tmp_path / "split"
    split.mkdir()
    (split / "train").symlink_to(train)
    (split / "val").symlink_to(train)
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(split), "--no-cache"]) == 0
    assert eval_main(["knn", "--encoder", str(path), "--data-path", "builtin:digits", "--no-cache"]) == 0
    rows = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert rows[-2]["train"].endswith("split/train") and rows[-2]["train_images"] == 6
    assert rows[-1]["classes"] == 10  # the digits
    bad = sorted(train.rglob("*.jpg"))[0]
    bad.write_bytes(b"junk")  # read in a loader worker: one line naming it, not the worker's traceback
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(split), "--no-cache", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image '{split}/train/{bad.parent.name}/{bad.name}'") and \
        "Traceback" not in err and "fastmim.data.scan" in err, err  # fmt: skip


def test_finetune_network_holds_the_encoder_and_mae_layer_decay():
    """The ViT's weights in timm's network (MAE's global pool: a fresh fc_norm in place of the final norm; or the
    class token after the final norm), and the optimizer's lr scales as MAE's ``param_groups_lrd``."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import build_optimizer, finetune_network

    enc, info = load_encoder(None, "vit_tiny_patch16", 32)
    net, fresh = finetune_network(enc, info, 5, drop_path=0.1, pool="avg")
    assert sorted(fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    ours = enc.state_dict()
    for k, v in net.state_dict().items():
        if k in ours:
            torch.testing.assert_close(v, ours[k])
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    token, fresh = finetune_network(enc, info, 5, drop_path=0.0, pool="cls")
    assert sorted(fresh) == ["head.bias", "head.weight"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(token.forward_head(token.forward_features(x), pre_logits=True),
                                   pooled_features(enc, x, "cls"), rtol=1e-4, atol=1e-4)  # fmt: skip
    depth, decay = len(enc.blocks), 0.65
    opt = build_optimizer(net, lr=1.0, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in net.named_parameters()}
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            layer = (0 if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed") else
                     int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1)  # fmt: skip
            assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), name
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen += 1
    assert seen == len(names)
    # the class token's network: its final norm is outside the blocks, at the head's rate (timm's groups put it one
    # layer down: 0.65 of the lr)
    scales = {n: g["lr_scale"] for g in build_optimizer(token, 1.0, 0.05, decay).param_groups for n in g["names"]}
    assert scales["norm.weight"] == scales["head.weight"] == 1.0 and scales["blocks.11.norm1.weight"] == decay


def _official_convnext_layer(name: str, depths: list[int], group: bool) -> int:
    """ConvNeXt V2's optim_factory.py numbering (get_num_layer_for_convnext_single / _convnext), on its own names:
    downsample_layers.i (timm: the stem, stages.i.downsample), stages.i.j (timm: stages.i.blocks.j)."""
    p = name.split(".")
    if p[0] == "stem" or p[0] == "stages" and p[2] == "downsample":
        s = 0 if p[0] == "stem" else int(p[1])
        return ({0: 0, 1: 2, 2: 3, 3: 12}[s]) if group else sum(depths[:s]) + 1
    if p[0] == "stages":
        s, j = int(p[1]), int(p[3])
        if group:
            return s + 1 if s < 2 else 3 + j // 3 if s == 2 else 12
        return sum(depths[:s]) + j + 1
    return 13 if group else sum(depths) + 1


@pytest.mark.parametrize("layer_decay_type", ["single", "group"])
def test_convnext_finetuning_numbers_its_layers_as_the_official_code(layer_decay_type):
    # timm's groups put the stem at layer 0 (one more decay than ConvNeXt V2's), and had no 12-group mode: at the
    # Base recipe's 0.6 the first stages trained at ~1e-7 of the lr
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import build_optimizer, finetune_network

    enc, info = load_encoder(None, "convnextv2_atto", 64)
    net, _ = finetune_network(enc, info, 5, drop_path=0.0)
    depths, decay, group = [2, 2, 6, 2], 0.6, layer_decay_type == "group"
    top = 13 if group else sum(depths) + 1
    opt = build_optimizer(net, 1.0, 0.05, decay, layer_decay_type)
    seen = set()
    for g in opt.param_groups:
        for name, p in zip(g["names"], g["params"], strict=True):
            want = decay ** (top - _official_convnext_layer(name, depths, group))
            assert g["lr_scale"] == pytest.approx(want), name
            assert g["weight_decay"] == (0.0 if p.ndim == 1 or name.endswith(".bias") else 0.05), name
            seen.add(name)
    assert seen == {n for n, _ in net.named_parameters()}
    assert net.head.fc.weight.std() < 1e-4  # ConvNeXt V2's head_init_scale 0.001 (timm's init: std 0.02)


def test_finetuning_defaults_are_the_encoders_official_recipe():
    from fastmim.eval.finetune import finetune_recipe

    assert finetune_recipe("vit_base_patch16")[1] == dict(epochs=100, warmup_epochs=5, blr=5e-4, layer_decay=0.65,
                                                          layer_decay_type="single", drop_path=0.1, weight_decay=0.05,
                                                          mixup=0.8, cutmix=1.0, smoothing=0.1,
                                                          model_ema=0.0, min_lr=1e-6)  # fmt: skip
    large, huge = finetune_recipe("vit_large_patch16")[1], finetune_recipe("vit_huge_patch14")[1]
    assert (large["epochs"], large["blr"], large["layer_decay"], large["drop_path"]) == (50, 1e-3, 0.75, 0.2)
    assert huge["drop_path"] == 0.3 and finetune_recipe("vit_tiny_patch16")[0].endswith("nearest published one)")
    base = finetune_recipe("convnextv2_base")[1]
    assert (base["layer_decay_type"], base["layer_decay"], base["warmup_epochs"], base["blr"]) == ("group", 0.6, 20,
                                                                                                   6.25e-4)  # fmt: skip
    atto = finetune_recipe("convnextv2_atto")[1]
    assert [atto[k] for k in ("epochs", "mixup", "cutmix", "smoothing", "weight_decay")] == [600, 0, 0, 0.2, 0.3]
    assert finetune_recipe("convnextv2_large")[1] == base and finetune_recipe("convnextv2_nano")[1] == atto
    assert base["model_ema"] == atto["model_ema"] == 0.9999  # ConvNeXt V2 reports its EMA's accuracy


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_a_finetuned_vit_loads_as_an_encoder_with_its_pooled_features(tmp_path, pool):
    """finetuned.safetensors (timm's network without its classifier) is an encoder for kNN, the probe and another
    fine-tuning: its features are the network's pre-logits (MAE's global pool: fc_norm on the patch tokens' mean)."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import finetune_network
    from fastmim.train.checkpoint import save_encoder

    enc, info = load_encoder(None, "vit_tiny_patch16", 32)
    net, _ = finetune_network(enc, info, 5, drop_path=0.0, pool=pool)
    with torch.no_grad():
        for p in net.parameters():  # fine-tuned: no norm or fc_norm at its initial values
            p.add_(torch.randn_like(p), alpha=0.1)
    save_encoder(tmp_path / "finetuned.safetensors", net.state_dict(), {"model": "vit_tiny_patch16", "pool": pool})
    loaded, _ = load_encoder(tmp_path / "finetuned.safetensors")
    assert (loaded.fc_norm is not None) == (pool == "avg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net.eval().forward_head(net.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled_features(loaded, x, "auto"), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4)
    timm_vit = net.eval()  # timm's own network: fc_norm is an Identity there when it has none
    if pool == "cls":
        with torch.no_grad():
            torch.testing.assert_close(pooled_features(timm_vit, x, "auto"), timm_vit.forward_features(x)[:, 0])
    if pool == "avg":
        with pytest.raises(ValueError, match="fine-tuned with MAE's global pool"):
            pooled_features(loaded, x, "cls")
        again, fresh = finetune_network(loaded, info, 5, drop_path=0.0, pool="auto")
        assert sorted(fresh) == ["head.bias", "head.weight"]  # fc_norm comes from the file
        torch.testing.assert_close(again.fc_norm.weight, net.fc_norm.weight)


def test_finetune_network_takes_a_convnext_and_refuses_a_class_token_it_lacks():
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import finetune_network

    enc, info = load_encoder(None, "convnextv2_atto", 64)
    net, fresh = finetune_network(enc, info, 3, drop_path=0.1)
    assert sorted(fresh) == ["head.fc.bias", "head.fc.weight"]
    torch.testing.assert_close(net.stem[0].weight, enc.stem[0].weight)
    enc, info = load_encoder(None, "ijepa_vit_tiny_patch16", 32)
    with pytest.raises(ValueError, match="no class token"):
        finetune_network(enc, info, 3, drop_path=0.1, pool="cls")


def test_cli_finetune_trains_saves_and_never_overwrites(tmp_path, capsys, monkeypatch):
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from safetensors.torch import load_file

    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=12, classes=3)
    val = make_image_folder(tmp_path / "val", n=6, classes=3, seed=1)
    args = ["finetune", "--encoder", str(path), "--data-path", str(train), "--val-path", str(val), "--batch-size",
            "4", "--epochs", "2", "--warmup-epochs", "1"]  # fmt: skip
    assert eval_main(args) == 0
    assert eval_main([*args, "--mixup", "0", "--cutmix", "0", "--aa", "none", "--pool", "cls"]) == 0
    rows = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["finetune", "finetune"] and len(rows[0]["history"]) == 2
    assert all(np.isfinite(h["loss"]) and 0 <= h["top1"] <= 100 for r in rows for h in r["history"])
    assert rows[0]["saved"] == str(path.parent / "finetune" / "finetuned.safetensors")
    assert rows[1]["saved"] == str(path.parent / "finetune-2" / "finetuned.safetensors")
    history = [json.loads(s) for s in (path.parent / "finetune" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["top1"] == rows[0]["top1"]
    first = load_file(rows[0]["saved"])
    assert first["head.weight"].shape == (3, 192) and "fc_norm.weight" in first
    from safetensors import safe_open

    with safe_open(rows[0]["saved"], "pt") as f:
        assert f.metadata()["format"] == "timm VisionTransformer"  # what it loads into
        assert f.metadata()["pool"] == "avg"  # (as resolved: the command said auto)
    import timm  # the README's way to load it

    timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, global_pool="avg",
                      fc_norm=True).load_state_dict(first)  # fmt: skip
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], load_file(path)["blocks.0.attn.qkv.weight"])  # trained
    out = capsys.readouterr().out
    assert "fine-tuning (2 epochs, best top-1" in out
    # the settings the command left out are the encoder's official recipe (ViT-tiny: MAE's ViT-B), named and recorded
    assert "finetune: vit_tiny_patch16 takes the recipe of MAE's ViT-B (FINETUNE.md; the nearest published one): " \
           "blr 0.0005, layer decay 0.65, layer decay type single, drop path 0.1" in out  # fmt: skip
    assert rows[0]["recipe"].startswith("MAE's ViT-B") and (rows[0]["layer_decay"], rows[0]["drop_path"],
                                                            rows[0]["blr"]) == (0.65, 0.1, 5e-4)  # fmt: skip
    assert rows[1]["mixup"] == 0 and rows[0]["mixup"] == 0.8
    done = str(path.parent / "finetune")
    assert eval_main([*args, "--finetune-dir", done]) == 2
    assert "holds a fine-tuning already: --resume" in capsys.readouterr().err
    assert eval_main([*args, "--resume", done]) == 2
    assert "it has done 2 of --epochs 2" in capsys.readouterr().err
    assert eval_main([*args, "--resume", done, "--epochs", "3"]) == 0  # one more epoch, in the same folder
    assert [json.loads(s)["epoch"] for s in (path.parent / "finetune" / "history.jsonl").read_text().splitlines()] \
        == [1, 2, 3]  # fmt: skip
    # --resume DIR alone (from another folder): the settings args.json kept, paths included; --epochs may grow, a
    # changed setting is refused by name
    saved = json.loads((path.parent / "finetune" / "args.json").read_text())
    assert saved["encoder"] == str(path.resolve()) and saved["batch_size"] == 4 and saved["warmup_epochs"] == 1
    monkeypatch.chdir(tmp_path / "train")
    assert eval_main(["finetune", "--resume", done, "--epochs", "4"]) == 0
    rows = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert rows[-1]["resumed"] and rows[-1]["epochs"] == 4 and rows[-1]["batch_size"] == 4
    assert rows[-1]["train"] == str(train.resolve()) and len(rows) == 4  # the same eval.jsonl (--out kept too)
    assert eval_main(["finetune", "--resume", done, "--epochs", "5", "--blr", "1e-2"]) == 2
    assert "started with other settings (blr: 0.0005 then, 0.01 now)" in capsys.readouterr().err
    (path.parent / "finetune-2" / "args.json").unlink()  # a folder from before args.json: the command names all
    with pytest.raises(SystemExit):
        eval_main(["finetune", "--resume", str(path.parent / "finetune-2"), "--epochs", "5"])
    err = capsys.readouterr().err
    assert "--encoder --random is required" in err and "args.json' is missing" in err, err
    with pytest.raises(SystemExit):
        eval_main([*args, "--layer-decay", "0"])
    assert "--layer-decay must be in (0, 1]" in capsys.readouterr().err
    assert eval_main([*args, "--layer-decay-type", "group"]) == 2
    assert "--layer-decay-type group is ConvNeXt V2's" in capsys.readouterr().err
    # a fine-tuning an earlier fastmim started (timm's parameter groups): its optimizer state does not fit
    ckpt = Path(done) / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["settings"]["param_groups"]
    torch.save(state, ckpt)
    assert eval_main(["finetune", "--resume", done, "--epochs", "6"]) == 2
    assert "started by an earlier fastmim" in capsys.readouterr().err


def test_finetune_views_survive_randaugments_zero_bit_posterize():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10, where posterize keeps 0 bits: a black image (old Pillow's answer),
    not Pillow 13's error. Drawn through the whole view with the magnitude pinned at the top."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from PIL import Image

    from fastmim.eval.finetune import finetune_transform, posterize_keeping

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert np.asarray(posterize_keeping(img, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize_keeping(img, 1)), np.asarray(img) & 0x80)
    tf = finetune_transform(32)
    ra = next(t for t in tf.transforms if hasattr(t, "ops"))
    poster = [op for op in ra.ops if "Posterize" in op.name]
    assert poster and all(op.aug_fn is posterize_keeping for op in poster)
    ra.ops = poster
    for op in poster:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
    out = tf(img)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


class _SignalAt(torch.utils.data.Dataset):
    """A dataset that sends this process ``signum`` when its ``at``-th item is read (a scheduler's stop mid-step)."""

    def __init__(self, ds, at, signum=signal.SIGUSR1):
        self.ds, self.at, self.n, self.signum = ds, at, 0, signum

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), self.signum)
        return self.ds[i]


def _finetune_run(tmp_path, run_dir, epochs=2, stop_after=None, resume=False, signal_at=None, signum=signal.SIGUSR1,
                  **kw):  # fmt: skip
    from fastmim.eval.encoder import LabelledFolder, eval_transform
    from fastmim.eval.finetune import finetune, finetune_transform

    train = make_image_folder(tmp_path / "train", n=16, classes=2) if not (tmp_path / "train").exists() else \
        tmp_path / "train"  # fmt: skip
    torch.manual_seed(0)  # the same encoder in every call
    enc, info = load_encoder(None, "vit_tiny_patch16", 32)
    train_set = LabelledFolder(train, finetune_transform(32))
    train_set = _SignalAt(train_set, signal_at, signum) if signal_at else train_set
    val_set = LabelledFolder(train, eval_transform(32))

    def log(row):
        if stop_after is not None and row["epoch"] == stop_after:
            raise KeyboardInterrupt  # a stop between two epochs, after the checkpoint

    settings = dict(epochs=epochs, warmup_epochs=1, batch_size=4, blr=1e-3, workers=0,
                    data_settings=dict(auto_augment=None, reprob=0.0))  # fmt: skip
    settings.update(kw)
    return finetune(enc, info, train_set, val_set, 2, torch.device("cpu"), run_dir=run_dir, resume=resume, log=log,
                    **settings)  # fmt: skip


def test_finetune_shows_each_epochs_progress(tmp_path, capsys):
    """An epoch of fine-tuning (minutes on ImageNet) printed nothing until its end: a bar of its steps now, on stderr,
    where a log is kept (the CLI) or asked for; none where it is turned off (progress=False)."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    _finetune_run(tmp_path, None, epochs=1)
    err = capsys.readouterr().err
    assert "finetune epoch 1/1: 0/4 [" in err  # 16 images, batches of 4 (a captured stderr: the log's lines)
    _finetune_run(tmp_path, None, epochs=1, progress=False)
    assert "finetune epoch" not in capsys.readouterr().err


def test_finetune_resumes_exactly_and_refuses_other_settings(tmp_path):
    """Two epochs straight equal one epoch, a stop, and a resume (augmentation, mixup and drop path draws included);
    a resume with other settings, or one with nothing left to do, is refused by name."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    straight = _finetune_run(tmp_path, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _finetune_run(tmp_path, tmp_path / "b", stop_after=1)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # (torch's default reads it)
    resumed = _finetune_run(tmp_path, tmp_path / "b", resume=True)
    for k, v in straight["network"].state_dict().items():
        torch.testing.assert_close(resumed["network"].state_dict()[k], v, rtol=0, atol=0)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    with pytest.raises(ValueError, match=r"blr: 0.001 then, 0.002 now"):
        _finetune_run(tmp_path, tmp_path / "b", epochs=3, resume=True, blr=2e-3)
    # what the caller decided (the CLI: --aa, --reprob, the data and encoder files) is held to as well
    with pytest.raises(ValueError, match=r"reprob: 0.0 then, 0.25 now"):
        _finetune_run(tmp_path, tmp_path / "b", epochs=3, resume=True,
                      data_settings=dict(auto_augment=None, reprob=0.25))  # fmt: skip
    with pytest.raises(ValueError, match="has done 2 of --epochs 2"):
        _finetune_run(tmp_path, tmp_path / "b", resume=True)
    with pytest.raises(FileNotFoundError, match="no fine-tuning checkpoint"):
        _finetune_run(tmp_path, tmp_path / "c", resume=True)


def test_finetune_resume_refuses_a_training_folder_whose_classes_changed(tmp_path):
    """A class folder renamed between a stop and its resume (the sorted order, so the labels, changed) was resumed,
    training the old head under the new labels: refused, naming the change; so is a resume inside an epoch whose
    folder holds another number of images now. A checkpoint from before the classes were saved still resumes."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    with pytest.raises(KeyboardInterrupt):
        _finetune_run(tmp_path, tmp_path / "b", stop_after=1)
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    (tmp_path / "train" / "class1").rename(tmp_path / "train" / "aaa")  # sorted first now: label 0
    with pytest.raises(ValueError, match=r"classes have changed since the fine-tuning started \('class1' gone; "
                                         r"'aaa' new \(2 classes then, 2 now\)\)"):  # fmt: skip
        _finetune_run(tmp_path, tmp_path / "b", resume=True)
    (tmp_path / "train" / "aaa").rename(tmp_path / "train" / "class1")
    assert saved["settings"]["classes"] == ["class0", "class1"] and saved["settings"]["train_images"] == 16
    mid = dict(saved, batch=2, settings=dict(saved["settings"], train_images=20))  # stopped inside epoch 2, 20 images
    torch.save(mid, tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ValueError, match="inside epoch 2 with 20 training images; the training folder holds 16"):
        _finetune_run(tmp_path, tmp_path / "b", resume=True)
    old = dict(saved, settings={k: v for k, v in saved["settings"].items() if k not in ("classes", "train_images")})
    torch.save(old, tmp_path / "b" / "checkpoint.pt")  # from before the classes were saved: resumed
    assert len(_finetune_run(tmp_path, tmp_path / "b", resume=True)["history"]) == 2


def _sigusr1_on_second_batch(monkeypatch, train):
    """SIGUSR1 to this process while the second training batch (batch size 4) of ``train`` loads; returns the
    unpatched ``LabelledFolder.__getitem__``."""
    reads, item = {"n": 0}, LabelledFolder.__getitem__

    def signalling(self, i):
        reads["n"] += 1
        if reads["n"] == 6 and self.root == train:
            os.kill(os.getpid(), signal.SIGUSR1)
        return item(self, i)

    monkeypatch.setattr(LabelledFolder, "__getitem__", signalling)
    return item


@pytest.fixture
def noted_sigusr1():
    """SIGUSR1 noted, not fatal, outside what the test runs (were the fine-tuning not to take it, the test fails
    rather than the signal ending pytest)."""
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda *a: seen.append(a[0]))
    yield seen
    signal.signal(signal.SIGUSR1, before)


def test_a_stop_signal_inside_a_finetuning_epoch_checkpoints_that_step_and_resumes_exactly(tmp_path, noted_sigusr1):
    """SIGUSR1 while the second batch of the first epoch loads: that step ends, the checkpoint holds the place in the
    epoch (its loss sums too), the previous handler is back; the resume from batch 2 ends as a run never stopped:
    the same weights and the same per-epoch history."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import FinetuneStopped

    straight = _finetune_run(tmp_path, tmp_path / "a")
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(FinetuneStopped) as stop:
        _finetune_run(tmp_path, tmp_path / "b", signal_at=6)  # item 6: the second batch of 4
    assert signal.getsignal(signal.SIGUSR1) == before and not noted_sigusr1
    assert (stop.value.epoch, stop.value.batch, stop.value.saved) == (0, 2, True)
    assert "SIGUSR1: checkpointed at epoch 1, batch 2 of 4" in str(stop.value)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["batch"], ck["history"], ck["partial"][0]["count"]) == (0, 2, [], 8)
    resumed = _finetune_run(tmp_path, tmp_path / "b", resume=True)
    for k, v in straight["network"].state_dict().items():
        torch.testing.assert_close(resumed["network"].state_dict()[k], v, rtol=0, atol=0, msg=k)
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed["history"]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in straight["history"]]  # fmt: skip


def test_finetune_accumulation_equals_the_larger_batch_and_stops_at_a_step(tmp_path, noted_sigusr1):
    """--accum-iter 2 at batch 2 trains as batch 4 (MAE's accum_iter: the gradients summed, the lr at the step's
    start, lr = blr x 2 x 2 / 256); a stop signal inside a step ends that step, not the batch, so the checkpoint is at
    a step boundary and the resume ends as a run never stopped."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import FinetuneStopped

    plain = dict(mixup=0.0, cutmix=0.0, drop_path=0.0, epochs=1)  # (mixup pairs within a batch: not the same pairs)
    whole = _finetune_run(tmp_path, None, **plain)
    accum = _finetune_run(tmp_path, None, batch_size=2, accum_iter=2, **plain)
    assert accum["lr"] == whole["lr"] == 1e-3 * 4 / 256
    for k, v in whole["network"].state_dict().items():
        torch.testing.assert_close(accum["network"].state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert accum["history"][0]["loss"] == pytest.approx(whole["history"][0]["loss"], rel=1e-5)
    straight = _finetune_run(tmp_path, tmp_path / "a", batch_size=2, accum_iter=2)
    with pytest.raises(FinetuneStopped) as stop:
        _finetune_run(tmp_path, tmp_path / "b", batch_size=2, accum_iter=2, signal_at=1)  # in the first batch
    assert (stop.value.epoch, stop.value.batch) == (0, 2)  # the step's second batch done too: batch 2 of 8
    with pytest.raises(ValueError, match="accum_iter"):  # another accumulation is another run
        _finetune_run(tmp_path, tmp_path / "b", batch_size=2, accum_iter=1, resume=True)
    resumed = _finetune_run(tmp_path, tmp_path / "b", batch_size=2, accum_iter=2, resume=True)
    for k, v in straight["network"].state_dict().items():
        torch.testing.assert_close(resumed["network"].state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_a_second_ctrl_c_while_the_finetuning_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch):
    """Ctrl-C from a terminal (Python's own handler): the first stops after the step with a checkpoint; a second one
    while that checkpoint is written lets the writing finish (before, it raised KeyboardInterrupt inside it, and the
    first epoch's only checkpoint was lost)."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import FinetuneStopped

    real, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "opt" in obj:  # the fine-tuning's checkpoint
            saves.append(obj["batch"])
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while it is written
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(FinetuneStopped) as stop:
            _finetune_run(tmp_path, tmp_path / "b", signal_at=6, signum=signal.SIGINT)  # the second batch of 4
    finally:
        signal.signal(signal.SIGINT, before)
    assert saves == [2] and (stop.value.signame, stop.value.batch, stop.value.saved) == ("SIGINT", 2, True)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["batch"] == 2


def test_a_stop_signal_while_a_stopped_finetuning_tears_down_changes_nothing(tmp_path, noted_sigusr1):
    """torchrun's agent sends SIGTERM to every rank as one exits: a fine-tuning stopped (and checkpointed) by a first
    signal took a second one during its teardown for a new stop "outside the fine-tuning's steps, nothing new to
    save", replacing the first stop's message; the pretraining's trainer already ignored it."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import FinetuneStopped
    from fastmim.train.preempt import stop_outside_training

    with stop_outside_training():
        with pytest.raises(FinetuneStopped) as stop:
            _finetune_run(tmp_path, tmp_path / "b", signal_at=6)  # the second batch of 4
        os.kill(os.getpid(), signal.SIGUSR1)  # (the agent's, while the command tears down)
    assert stop.value.batch == 2 and stop.value.saved and not noted_sigusr1


def test_a_stop_signal_at_or_after_the_last_step_lets_the_fine_tuning_finish(tmp_path, noted_sigusr1):
    """SIGUSR1 during the last batch (no step follows to stop at) and again after finetune() returned, inside the
    CLI's stop handling: the fine-tuning ends normally and the caller can write its outputs (a requeue then would
    restart a finished run that never wrote them)."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.train.preempt import stop_outside_training

    with stop_outside_training():
        out = _finetune_run(tmp_path, tmp_path / "a", epochs=1, signal_at=16)  # the last of 16 items
        os.kill(os.getpid(), signal.SIGUSR1)  # while the outputs would be written
    assert [h["epoch"] for h in out["history"]] == [1] and not noted_sigusr1


def test_cli_finetune_stopped_by_a_signal_exits_for_a_requeue_and_resumes(tmp_path, capsys, monkeypatch,
                                                                          noted_sigusr1):  # fmt: skip
    """A job script's one command (--resume if-exists --finetune-dir F): the first start is stopped by SIGUSR1
    inside the first epoch and exits 75 (requeue) naming the place; the same command run again continues it and
    finishes, removing the temporary file of a save killed mid-write; a later --resume F --epochs 3 trains one more
    epoch and keeps --epochs 3 in args.json, so that the next resume does not ask for fewer."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from safetensors import safe_open

    from fastmim.train.checkpoint import save_encoder

    model, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=12, classes=3)
    val = make_image_folder(tmp_path / "val", n=6, classes=3, seed=1)
    _sigusr1_on_second_batch(monkeypatch, train)
    folder = tmp_path / "ft"
    job = ["finetune", "--encoder", str(path), "--data-path", str(train), "--val-path", str(val), "--batch-size", "4",
           "--epochs", "2", "--warmup-epochs", "1", "--resume", "if-exists", "--finetune-dir", str(folder)]  # fmt: skip
    assert eval_main(job) == 75
    err = capsys.readouterr().err
    assert f"stopped on SIGUSR1: checkpointed at epoch 1, batch 2 of 3; continue with python -m fastmim.eval " \
        f"finetune --resume {folder}" in err, err  # fmt: skip
    # the pretraining run goes on meanwhile and rewrites its encoder file: the fine-tuning is still of step 12's
    started = hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # (other weights)
    save_encoder(path, model.encoder_state_dict(), {"model": "mae_vit_tiny_patch16", "step": "20", "img_size": "32"})
    assert hashlib.sha256(path.read_bytes()).hexdigest() != started
    stale = folder / ".checkpoint.pt.k9x2.tmp"  # a save killed mid-write (kill -9) left its temporary file
    stale.write_bytes(bytes(2 * 2**20))
    inner = folder / ".finetuned.safetensors.b7q1.tmp.d"  # and the network's save, safetensors' own file in its folder
    inner.mkdir()
    (inner / "tmpa1b2c3").write_bytes(bytes(2**20))
    assert eval_main(job) == 0  # the same command: it continues in the folder
    out = capsys.readouterr().out
    assert "has changed (now step 20) since this fine-tuning started from it (step 12)" in out
    assert f"removed 3.0 MiB of temporary files an interrupted save left in {folder}" in out
    assert not stale.exists() and not inner.exists()
    row = json.loads((path.parent / "eval.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 12 and row["encoder_sha256"] == started  # the weights it fine-tuned, not the file's now
    assert [json.loads(s)["epoch"] for s in (folder / "history.jsonl").read_text().splitlines()] == [1, 2]
    assert (folder / "finetuned.safetensors").exists()
    assert eval_main(["finetune", "--resume", str(folder), "--epochs", "3"]) == 0
    assert json.loads((folder / "args.json").read_text())["epochs"] == 3
    assert eval_main(["finetune", "--resume", str(folder)]) == 2  # nothing left: refused as done, with 3 epochs
    assert "it has done 3 of --epochs 3" in capsys.readouterr().err
    kept = (folder / "args.json").read_text()
    assert eval_main(["finetune", "--resume", str(folder), "--epochs", "4", "--blr", "1"]) == 2
    assert "blr: 0.0005 then, 1.0 now" in capsys.readouterr().err
    assert (folder / "args.json").read_text() == kept  # a refused resume leaves the folder's settings as they were
    meta = safe_open(str(folder / "finetuned.safetensors"), "pt").metadata()
    assert meta["img_size"] == "32" and meta["step"] == "12" and meta["source"] == str(path)
    assert meta["abs_pos"] == "learned"  # the fine-tuning trained the position embedding: loaded trainable
    assert load_encoder(folder / "finetuned.safetensors")[0].pos_embed.requires_grad
    typo = tmp_path / "nested" / "ft-typo"
    assert eval_main(["finetune", "--resume", str(typo), "--encoder", str(path), "--data-path", str(train),
                      "--val-path", str(val)]) == 2  # fmt: skip
    assert "no fine-tuning checkpoint" in capsys.readouterr().err and not typo.parent.exists()
    with pytest.raises(SystemExit):
        eval_main(["finetune", "--encoder", str(path), "--resume", "if-exists"])
    assert "--resume if-exists needs --finetune-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_under_torchrun_shares_the_epochs_and_counts_every_val_image(tmp_path):
    """Two processes (gloo): lr scaled by the processes and the accumulation (DDP's all-reduce at a step's last batch
    only), a checkpoint and the network saved once, and the validation accuracy summed from both shares equal to one
    process's evaluation of the saved network."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from safetensors.torch import load_file

    from fastmim.eval.encoder import LabelledFolder, eval_transform
    from fastmim.eval.finetune import evaluate, finetune_network
    from tests.conftest import run_cli

    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=16, classes=3)
    val = make_image_folder(tmp_path / "val", n=9, classes=3, seed=1)  # odd: the shares differ in size
    r = run_cli(["--standalone", "--nproc_per_node", "2", "-m", "fastmim.eval", "finetune", "--encoder", str(path),
                 "--data-path", str(train), "--val-path", str(val), "--batch-size", "2", "--accum-iter", "2",
                 "--epochs", "2", "--warmup-epochs", "1", "--device", "cpu"],
                module=["-m", "torch.distributed.run"], timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["processes"] == 2 and rows[0]["lr"] == pytest.approx(5e-4 * 2 * 2 * 2 / 256)
    assert rows[0]["accum_iter"] == 2
    assert r.stdout.count("finetune epoch 2/2") == 1  # printed by rank 0 only
    assert r.stdout.count("note: effective batch 8 (--batch-size 2 x --accum-iter 2 x 2 processes)") == 1
    enc, info = load_encoder(path)
    net, _ = finetune_network(enc, info, 3, drop_path=0.0)
    net.load_state_dict(load_file(rows[0]["saved"]))
    loader = torch.utils.data.DataLoader(LabelledFolder(val, eval_transform(32)), batch_size=4)
    assert evaluate(net, loader, 3, torch.device("cpu"))["top1"] == pytest.approx(rows[0]["top1"])


def test_encoder_files_that_are_not_encoders_are_named_in_one_line(tmp_path):
    """A training checkpoint (optimizer and RNG states: torch's weights_only refuses it) and a file of another kind."""
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "config": argparse.Namespace(model="x")}, ckpt)  # not weights only
    with pytest.raises(ValueError, match=r"is a fastmim checkpoint \(a run's whole state\), not an encoder: pass"):
        load_encoder(ckpt)
    for state in (
        {"model": {}, "optimizer": {}, "rng": [], "step": 3},  # a pretraining's and a fine-tuning's, which
        {"net": {}, "opt": {}, "rng": [], "settings": {}},
    ):  # fmt: skip (weights_only reads now)
        torch.save(state, ckpt)
        with pytest.raises(ValueError, match=r"is a fastmim checkpoint \(a run's whole state\), not an encoder"):
            load_encoder(ckpt)
    other = tmp_path / "notes.pth"
    other.write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"is neither safetensors nor a plain torch state dict \([^\n]*\); a fastmim"):
        load_encoder(other)


def test_images_and_folders_users_have(tmp_path):
    """16-bit PNGs are scaled to 8 bits (PIL's convert("RGB") clipped them white), hidden folders are skipped, and an
    empty class folder in a folder indexed by another's classes adds nothing instead of being refused."""
    from PIL import Image

    from fastmim.data.folder import ImageFolderDataset, to_rgb

    root = make_image_folder(tmp_path / "train", n=4, classes=2)
    ramp = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0 .. 61,380 of 65,535
    Image.fromarray(ramp).save(root / "class0" / "deep.png")
    (root / "class0" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "class0" / ".ipynb_checkpoints" / "copy.png")
    (root / "empty").mkdir()
    with Image.open(root / "class0" / "deep.png") as im:
        rgb = np.asarray(to_rgb(im))
    want = np.rint(ramp / 65535 * 255)
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 0] - want).max() <= 1 and rgb.min() == 0
    folder = LabelledFolder(root)
    assert len(folder) == 5 and folder.classes == ["class0", "class1"]  # the copy in the hidden folder is left out
    assert np.asarray(folder[[p for p, _ in folder.samples].index(str(root / "class0" / "deep.png"))][0]).mean() < 200
    again = LabelledFolder(root, classes=folder.classes)  # the empty folder is not an unknown class
    assert len(again) == 5
    data = ImageFolderDataset(str(root))
    assert np.asarray(data.load(data.files.index(str(root / "class0" / "deep.png")))).max() < 255


def test_knn_and_linprobe_read_folders_whose_names_are_not_utf8(tmp_path, capsys):
    """A folder named in Latin-1 (b'gr\\xe9en', not UTF-8) crashed kNN and the probe with "surrogates not allowed" (exit
    2, no path named) when its features were fingerprinted for the cache: its bytes are hashed as they are."""
    _, path = _save_run_encoder(tmp_path)
    try:
        odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xe9j\xe0"))  # the data root
        os.mkdir(os.fsencode(odd))
        train = make_image_folder(Path(odd) / "train", n=6, classes=2)
        os.rename(os.fsencode(train / "class1"), os.path.join(os.fsencode(train), b"gr\xe9en"))
    except (OSError, UnicodeError) as e:
        pytest.skip(f"the file system refuses a name that is not UTF-8 ({e})")
    folder = LabelledFolder(train)
    assert folder.classes == ["class0", os.fsdecode(b"gr\xe9en")] and len(folder.fingerprint()) == 16
    data = ["--encoder", str(path), "--data-path", str(train), "--val-path", str(train), "--batch-size", "4"]
    assert eval_main(["knn", *data]) == 0, capsys.readouterr().err
    assert eval_main(["knn", *data]) == 0  # from the cache
    assert eval_main(["linprobe", *data, "--epochs", "1", "--no-augment"]) == 0, capsys.readouterr().err
    rows = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["knn", "knn", "linprobe"] and rows[1]["features_cached"]
    assert os.fsencode(rows[0]["train"]) == os.fsencode(train)


def test_eval_cli_refuses_contradictions_before_it_runs(tmp_path, capsys):
    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=6, classes=2)
    val = make_image_folder(tmp_path / "val", n=4, classes=2, seed=1)
    data = ["--data-path", str(train), "--val-path", str(val)]
    assert eval_main(["knn", "--encoder", str(path), *data, "--model", "simmim_vit_tiny_patch16"]) == 2
    err = capsys.readouterr().err
    assert "says it holds 'mae_vit_tiny_patch16'; --model simmim_vit_tiny_patch16 contradicts it" in err
    assert eval_main(["knn", "--encoder", str(path), *data, "--model", "vit_tiny_patch16", "--k", "2"]) == 0
    assert json.loads((path.parent / "eval.jsonl").read_text().splitlines()[-1])["model"] == "mae_vit_tiny_patch16"
    capsys.readouterr()
    assert eval_main(["knn", "--encoder", str(path), *data, "--out", str(tmp_path)]) == 2
    assert "is a folder: name the JSON-lines file" in capsys.readouterr().err
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "history.jsonl").write_text("{}\n")
    assert eval_main(["finetune", "--encoder", str(path), *data, "--finetune-dir", str(tmp_path / "ft")]) == 2
    assert "holds files but no checkpoint" in capsys.readouterr().err
    for bad, message in [(["--img-size", "0"], "--img-size must be a positive"), (["--blr", "0"], "--blr and")]:
        with pytest.raises(SystemExit):
            eval_main(["linprobe", "--encoder", str(path), *data, *bad])
        assert message in capsys.readouterr().err


def test_linprobe_refuses_a_batch_of_one_by_its_option(tmp_path, capsys):
    """linprobe --batch-size 1 failed with PyTorch's "Expected more than 1 value per channel when training" (the
    probe's BatchNorm): refused up front, naming --batch-size; the API names the batch size too."""
    from fastmim.eval.linprobe import train_linear_probe

    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=6, classes=2)
    with pytest.raises(SystemExit):
        eval_main(["linprobe", "--encoder", str(path), "--data-path", str(train), "--val-path", str(train),
                   "--batch-size", "1", "--epochs", "1"])  # fmt: skip
    assert "--batch-size must be at least 2 for linprobe, got 1" in capsys.readouterr().err
    feats, labels = torch.randn(5, 8), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="a batch size of at least 2 and as many training images, got 1 and 5"):
        train_linear_probe(None, None, feats, labels, 2, torch.device("cpu"), train_feats=feats, train_labels=labels,
                           batch_size=1, epochs=1)  # fmt: skip
    for n, batch in ((5, 2), (3, 4)):  # the last incomplete batch dropped (one of 1 left); all 3 in one batch
        out = train_linear_probe(torch.nn.Identity(), None, feats, labels, 2, torch.device("cpu"), epochs=1,
                                 train_feats=feats[:n], train_labels=labels[:n], batch_size=batch)  # fmt: skip
        assert len(out["history"]) == 1


def test_the_probe_is_maes_batchnorm_without_affine_then_the_linear_layer():
    """MAE's head: BatchNorm1d(affine=False, eps=1e-6) then the linear layer, whose weight and bias are the only
    parameters LARS steps; and the kNN defaults are DINO's (k=20, T=0.07) for a caller of the functions."""
    import inspect

    from fastmim.eval import knn_accuracy, knn_scores
    from fastmim.eval.linprobe import LinearProbe

    head = LinearProbe(8, 3)
    assert not head.norm.affine and head.norm.eps == 1e-6
    assert {name for name, _ in head.named_parameters()} == {"fc.weight", "fc.bias"}
    for fn in (knn_scores, knn_accuracy):
        params = inspect.signature(fn).parameters
        assert params["k"].default == 20 and params["temperature"].default == 0.07, fn.__name__


def test_linprobe_gathers_its_batch_from_feature_passes(monkeypatch):
    """MAE's probe batch (16384) is far more images than one forward pass holds: the encoder runs --feature-batch
    images at a time and a step takes exactly the probe's batch of their features; an epoch takes n // batch steps
    (the rest, too few for one, is not even read), and the chunking does not change the result."""
    from fastmim.eval import linprobe

    steps, rows = [], []

    class Counting(linprobe.LARS):
        def step(self, *a, **k):
            steps.append(1)
            return super().step(*a, **k)

    monkeypatch.setattr(linprobe, "LARS", Counting)
    g = torch.Generator().manual_seed(0)
    imgs, labels = torch.randn(10, 3, 4, 4, generator=g), torch.arange(10) % 2
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 6))
    encoder.register_forward_hook(lambda m, i, o: rows.append(len(o)))
    train_set = torch.utils.data.TensorDataset(imgs, labels)
    val = torch.randn(4, 6, generator=g), torch.tensor([0, 1, 0, 1])

    def probe(feature_batch):
        steps.clear(), rows.clear()
        return linprobe.train_linear_probe(encoder, train_set, *val, 2, torch.device("cpu"), epochs=2,
                                           warmup_epochs=0, batch_size=4, blr=5.0,
                                           feature_batch=feature_batch)  # fmt: skip

    out = probe(3)
    assert len(steps) == 4 and rows == [3, 3, 3] * 2  # 2 steps of 4 per epoch from 3 chunks; the 10th image unread
    assert out["lr"] == 5.0 * 4 / 256
    whole = probe(4)
    assert len(steps) == 4 and rows == [4, 4] * 2
    assert out["history"][-1]["loss"] == pytest.approx(whole["history"][-1]["loss"], rel=1e-5)
    assert probe(64)["lr"] == 5.0 * 4 / 256 and rows == [4, 4] * 2  # (chunks never larger than the probe's batch)
    small = linprobe.train_linear_probe(encoder, train_set, *val, 2, torch.device("cpu"), epochs=1, batch_size=16384,
                                        blr=0.1)  # fmt: skip
    assert small["lr"] == 0.1 * 10 / 256  # fewer images than a batch: one step of all 10, its lr from 10


def test_options_a_mode_does_not_read_are_refused_and_a_convnext_takes_no_pool(capsys):
    """knn --epochs, linprobe --mixup: refused by name rather than ignored; --pool cls on a ConvNeXt (its own pooled
    features) is refused before any data is read; a warm-up as long as the run is noted."""
    with pytest.raises(SystemExit):
        eval_main(["knn", "--random", "vit_tiny_patch16", "--epochs", "3", "--mixup", "0.2"])
    assert "--epochs is for linprobe and finetune; --mixup is for finetune: knn does not use them" in \
        capsys.readouterr().err  # fmt: skip
    with pytest.raises(SystemExit):
        eval_main(["linprobe", "--random", "vit_tiny_patch16", "--min-lr", "0.1"])
    assert "--min-lr is for finetune: linprobe does not use it" in capsys.readouterr().err
    assert eval_main(["linprobe", "--random", "convnextv2_atto", "--pool", "cls", "--epochs", "2",
                      "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--warmup-epochs 10 is not shorter than --epochs 2" in err, err
    assert "--pool cls applies to ViT encoders; convnextv2_atto has no class token" in err, err


class _ConfigLike(dict):
    """Stands for yacs' CfgNode, which SimMIM's save_checkpoint stores beside the weights."""


def test_a_simmim_pretraining_checkpoint_of_the_official_layout_loads_as_its_encoder(tmp_path):
    """microsoft/SimMIM's checkpoint layout ({"model": {"encoder.*", "encoder.mask_token", "decoder.*"}}, BEiT's keys:
    q_bias / v_bias, gamma_1 / gamma_2, the relative position index saved as a buffer): python -m fastmim.eval reads
    its encoder, the same function (written here from timm's Beit, an independent implementation)."""
    timm_beit = pytest.importorskip("timm.models.beit", reason="timm is a test dependency (pip install -e '.[test]')")
    from fastmim.models.vit import VisionTransformer, beit_kwargs

    shape = dict(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    probe = VisionTransformer(**shape, init_values=0.1, abs_pos_embed=False, rel_pos_bias="shared")
    beit = timm_beit.Beit(**beit_kwargs(probe)).eval()
    with torch.no_grad():
        for p in beit.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    state = {f"encoder.{k}": v for k, v in beit.state_dict().items()}
    state["encoder.rel_pos_bias.relative_position_index"] = beit.rel_pos_bias.relative_position_index.clone()
    state["encoder.mask_token"] = torch.zeros(1, 1, 192)
    state["decoder.0.weight"], state["decoder.0.bias"] = torch.zeros(768, 192, 1, 1), torch.zeros(768)
    torch.save({"model": state, "epoch": 799}, tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth")
    enc, info = load_encoder(tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth", "vit_tiny_patch16")
    assert info["img_size"] == 32 and enc.rel_pos_mode == "shared" and enc.pos_embed is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), beit.forward_features(x), rtol=1e-5, atol=1e-5)
    # SimMIM's own save_checkpoint keeps its config object beside the weights: not unpickled, the way out said
    torch.save({"model": state, "config": _ConfigLike(a=1)}, tmp_path / "with_config.pth")
    with pytest.raises(ValueError, match=r"holds an object of tests\.eval\.test_eval\._ConfigLike, which fastmim "
                                         r"does not unpickle") as refused:  # fmt: skip
        load_encoder(tmp_path / "with_config.pth", "vit_tiny_patch16")
    import subprocess
    import sys

    command = str(refused.value).split('python -c "', 1)[1].rstrip('"')  # the way out it gives, followed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}  # (where the stand-in's module is)
    subprocess.run([sys.executable, "-c", command], cwd=tmp_path, check=True, env=env)
    again, _ = load_encoder(tmp_path / "weights.pth", "vit_tiny_patch16")
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), beit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_the_evaluation_view_is_maes():
    """MAE's util/datasets.py: resize the short side to int(size / crop_pct), crop_pct 224/256 up to 224 px and 1.0
    above (fastmim resized 448 to 512 then cropped, and rounded 32 / 0.875 up to 37)."""
    import torchvision.transforms as T

    from fastmim.eval.encoder import eval_transform

    for size, resize in ((224, 256), (32, 36), (96, 109), (384, 384), (448, 448)):
        tf = eval_transform(size)
        r = next(t for t in tf.transforms if isinstance(t, T.Resize))
        c = next(t for t in tf.transforms if isinstance(t, T.CenterCrop))
        assert (r.size, tuple(c.size)) == (resize, (size, size)), size
        assert r.interpolation == T.InterpolationMode.BICUBIC, size
    warped = next(t for t in eval_transform(448, "convnextv2_atto").transforms if isinstance(t, T.Resize))
    assert warped.size == (448, 448) and warped.interpolation == T.InterpolationMode.BICUBIC


def test_finetune_model_ema_is_evaluated_saved_and_resumed_exactly(tmp_path, capsys, monkeypatch, noted_sigusr1):
    """--model-ema (ConvNeXt V2's recipes): the EMA of the weights after every step, its accuracy in every epoch's
    row and the result, its weights in finetuned_ema.safetensors; a run stopped inside an epoch (SIGUSR1) resumes
    its EMA exactly: the same EMA weights as a run never stopped."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from safetensors.torch import load_file

    train = make_image_folder(tmp_path / "train", n=12, classes=3)
    val = make_image_folder(tmp_path / "val", n=6, classes=3, seed=1)
    common = ["finetune", "--random", "convnextv2_atto", "--img-size", "32", "--data-path", str(train), "--val-path",
              str(val), "--batch-size", "4", "--model-ema", "0.5", "--epochs", "2", "--out",
              str(tmp_path / "eval.jsonl")]  # fmt: skip
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    from timm.utils import ModelEmaV2

    updates, smoothing, ema_update, ce = [], [], ModelEmaV2.update, torch.nn.functional.cross_entropy
    monkeypatch.setattr(ModelEmaV2, "update", lambda self, model: updates.append(1) or ema_update(self, model))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **kw: (
        smoothing.append(kw.get("label_smoothing")) if torch.is_grad_enabled() else None) or ce(*a, **kw))  # fmt: skip
    assert eval_main([*common, "--finetune-dir", str(straight)]) == 0
    assert len(updates) == 6  # after each of the 2 x 3 steps
    assert smoothing == [0.2] * 6  # the atto recipe's smoothing, without mixup (timm's soft targets carry it there)
    monkeypatch.setattr(ModelEmaV2, "update", ema_update)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    item = _sigusr1_on_second_batch(monkeypatch, train)
    assert eval_main([*common, "--finetune-dir", str(cut)]) == 75
    assert "ema" in torch.load(cut / "checkpoint.pt", weights_only=False)
    monkeypatch.setattr(LabelledFolder, "__getitem__", item)
    assert eval_main(["finetune", "--resume", str(cut)]) == 0
    rows = [json.loads(s) for s in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows[0]["model_ema"] == 0.5 and all("top1_ema" in h for h in rows[0]["history"])
    assert 0 <= rows[0]["best_top1_ema"] <= 100 and rows[0]["saved_ema"].endswith("finetuned_ema.safetensors")
    assert [h["top1_ema"] for h in rows[-1]["history"]] == [h["top1_ema"] for h in rows[0]["history"]]
    a, b = load_file(straight / "finetuned_ema.safetensors"), load_file(cut / "finetuned_ema.safetensors")
    weights = load_file(straight / "finetuned.safetensors")
    assert a.keys() == b.keys() == weights.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)  # resumed: the same EMA
    assert any(not torch.equal(a[k], weights[k]) for k in a if a[k].is_floating_point())  # an average, not a copy
    assert "(EMA " in capsys.readouterr().out


def test_a_data2vec2_encoder_is_finetuned_with_fairsecs_recipe():
    """fairseq's mae_image_classification for a data2vec 2.0 run's ViT: layer decay over the blocks only (the patch
    embedding, tokens and head at the full lr), AdamW betas (0.9, 0.95), mixup 0.7 on 90% of the batches, 6.4
    warm-up epochs (16k updates), a head initialised with std 0.02; MAE's recipe for every other ViT."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.eval.finetune import build_optimizer, finetune_network, finetune_recipe, recipe_extras

    where, recipe = finetune_recipe("vit_base_patch16", "data2vec2_vit_base_patch16")
    assert where.startswith("data2vec 2.0's") and recipe["layer_decay_type"] == "blocks"
    assert (recipe["warmup_epochs"], recipe["mixup"], recipe["cutmix"], recipe["layer_decay"]) == (6.4, 0.7, 1.0, 0.65)
    assert finetune_recipe("vit_base_patch16", "mae_vit_base_patch16")[1]["layer_decay_type"] == "single"
    extras = recipe_extras("data2vec2_vit_tiny_patch16")
    assert extras == {"betas": (0.9, 0.95), "mixup_prob": 0.9, "head_init_std": 0.02, "clip_grad": None}
    assert recipe_extras("mae_vit_tiny_patch16")["betas"] == (0.9, 0.999)
    enc, info = load_encoder(None, "vit_tiny_patch16", 32)
    net, _ = finetune_network(enc, info, 5, drop_path=0.0, head_init_std=extras["head_init_std"])
    assert net.head.weight.std() > 0.01  # (MAE's 2e-5: 1000x smaller)
    opt = build_optimizer(net, 1.0, 0.05, 0.65, "blocks", extras["betas"])
    scales = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    depth = len(enc.blocks)
    assert scales["patch_embed.proj.weight"] == scales["cls_token"] == scales["head.weight"] == 1.0
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.65**depth)
    assert scales[f"blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx(0.65)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    # ViT-L and ViT-H: fairseq's own large and huge configs, not ViT-B's
    where, large = finetune_recipe("vit_large_patch16", "data2vec2_vit_large_patch16")
    assert "mae_imagenet_large_clean.yaml" in where
    assert [large[k] for k in ("epochs", "blr", "layer_decay", "drop_path", "min_lr")] == [50, 2.5e-4, 0.75, 0.2, 1e-7]
    assert finetune_recipe("vit_huge_patch14", "data2vec2_vit_huge_patch14")[1]["min_lr"] == 1e-20
    assert recipe_extras("data2vec2_vit_large_patch16")["clip_grad"] == 4.0 and extras["clip_grad"] is None
    with pytest.raises(ValueError, match="layer_decay_type 'group' is for a ConvNeXt"):
        build_optimizer(net, 1.0, 0.05, 0.65, "group")
    cnx, cinfo = load_encoder(None, "convnextv2_atto", 64)
    with pytest.raises(ValueError, match="layer_decay_type 'blocks' is for a ViT"):
        build_optimizer(finetune_network(cnx, cinfo, 3, drop_path=0.0)[0], 1.0, 0.05, 0.65, "blocks")


def test_the_recipes_gradient_clipping_and_betas_reach_the_training(tmp_path, monkeypatch):
    """A data2vec 2.0 encoder (here a random one of that recipe) fine-tunes with its recipe's extras: AdamW's betas,
    mixup on 90% of the batches, and the gradient clipping of fairseq's ViT-L/H configs (switched on here for the
    tiny model)."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    import fastmim.eval.finetune as ft

    monkeypatch.setitem(ft.RECIPE_EXTRAS, "data2vec2", ft.RECIPE_EXTRAS["data2vec2"] | {"clip_grad": 1.0})
    clipped, betas = [], []
    real_clip, real_adamw = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm)
                        or real_clip(params, norm))  # fmt: skip
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **kw: betas.append(kw["betas"])
                        or real_adamw(groups, **kw))  # fmt: skip
    import timm.data

    mixes, real_mixup = [], timm.data.Mixup
    monkeypatch.setattr(timm.data, "Mixup", lambda **kw: mixes.append(kw) or real_mixup(**kw))
    train = make_image_folder(tmp_path / "train", n=12, classes=3)
    val = make_image_folder(tmp_path / "val", n=6, classes=3, seed=1)
    assert eval_main(["finetune", "--random", "data2vec2_vit_tiny_patch16", "--img-size", "32", "--data-path",
                      str(train), "--val-path", str(val), "--batch-size", "4", "--epochs", "1", "--out",
                      str(tmp_path / "eval.jsonl")]) == 0  # fmt: skip
    assert clipped == [1.0] * 3 and betas == [(0.9, 0.95)]
    assert len(mixes) == 1 and (
        mixes[0]["prob"],
        mixes[0]["mixup_alpha"],
        mixes[0]["cutmix_alpha"],
        mixes[0]["label_smoothing"],
    ) == (0.9, 0.7, 1.0, 0.1)  # (mixing 90% of the batches)
    row = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[-1])
    assert row["recipe"].startswith("data2vec 2.0's") and row["clip_grad"] == 1.0 and row["betas"] == [0.9, 0.95]


def test_a_finetuning_folder_another_process_writes_in_is_refused(tmp_path, capsys):
    """Two fine-tunings in one --finetune-dir (or a requeued job while the old one drains) would write over each
    other's checkpoint and history: the second is refused while the first holds the folder's lock."""
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    from fastmim.train.runlock import LOCK_NAME, RunLock

    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "train", n=6, classes=2)
    folder = tmp_path / "ft"
    folder.mkdir()
    held = RunLock(folder, "a fine-tuning")
    assert held.acquire() is None
    job = ["finetune", "--encoder", str(path), "--data-path", str(train), "--val-path", str(train), "--batch-size", "2",
           "--epochs", "1", "--warmup-epochs", "0", "--finetune-dir", str(folder)]  # fmt: skip
    assert eval_main(job) == 2
    assert f"{folder} is in use: a fine-tuning (pid {os.getpid()} on" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == [LOCK_NAME]  # nothing written
    held.release()
    assert eval_main(job) == 0, capsys.readouterr().err
    assert (folder / "finetuned.safetensors").exists() and not (folder / LOCK_NAME).exists()


def test_what_users_pass_that_gave_misleading_results(tmp_path, capsys):
    """One class folder (every accuracy 100%, appended like a real result) is refused; a data2vec 2.0 encoder's auto
    pool is the token mean (its evaluation's); a fine-tuning's folder is an encoder (its finetuned.safetensors); a
    mistyped --resume folder says so (it asked for --encoder)."""
    from safetensors.torch import save_file

    _, path = _save_run_encoder(tmp_path)
    one = make_image_folder(tmp_path / "one", n=4, classes=1)
    assert eval_main(["knn", "--encoder", str(path), "--data-path", str(one), "--val-path", str(one)]) == 2
    assert "holds 1 class folder: a classification needs at least 2" in capsys.readouterr().err
    two = make_image_folder(tmp_path / "two", n=6, classes=2)
    enc, info = load_encoder(path)
    d2v = tmp_path / "d2v" / "encoder.safetensors"
    d2v.parent.mkdir()
    save_file(enc.state_dict(), str(d2v), metadata={"model": "data2vec2_vit_tiny_patch16", "img_size": "32"})
    tuned = tmp_path / "ft" / "finetuned.safetensors"
    tuned.parent.mkdir()
    save_file(enc.state_dict(), str(tuned), metadata={"model": "vit_tiny_patch16", "img_size": "32"})
    for encoder, pool in ((d2v, "avg"), (path, "cls"), (tuned.parent, "cls")):
        assert eval_main(["knn", "--encoder", str(encoder), "--data-path", str(two), "--val-path", str(two),
                          "--no-cache", "--out", str(tmp_path / "rows.jsonl")]) == 0  # fmt: skip
        row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[-1])
        assert (row["pool"], row["pool_arg"]) == (pool, "auto"), encoder
    assert row["encoder_sha256"] == hashlib.sha256(tuned.read_bytes()).hexdigest()  # (the folder's file, in full)
    with pytest.raises(SystemExit):
        eval_main(["finetune", "--resume", str(tmp_path / "nope")])
    assert "--resume: no fine-tuning checkpoint at" in capsys.readouterr().err


def test_each_modes_help_lists_its_own_options(capsys):
    """``knn --help`` listed the fine-tuning's 17 options too: MODE --help lists that mode's alone."""
    from fastmim.eval.__main__ import main as eval_main

    said = {}
    for mode in ("knn", "linprobe", "finetune"):
        with pytest.raises(SystemExit) as stop:
            eval_main([mode, "--help"])
        assert stop.value.code == 0
        said[mode] = capsys.readouterr().out
    assert "--temperature" in said["knn"] and "--layer-decay" not in said["knn"] and "--epochs" not in said["knn"]
    assert "--no-augment" in said["linprobe"] and "--epochs" in said["linprobe"] and "--k " not in said["linprobe"]
    assert "--layer-decay" in said["finetune"] and "--resume" in said["finetune"] and "--no-augment" not in \
        said["finetune"]  # fmt: skip
    assert all("--encoder" in text and "--data-path" in text for text in said.values())  # (every mode's)
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    every = capsys.readouterr().out  # no mode: all of them
    assert "--layer-decay" in every and "--temperature" in every and "--no-augment" in every


@pytest.mark.parametrize("command", [["fastmim.eval", "knn", "--help"], ["fastmim.eval", "--help"],
                                     ["fastmim.train.convert", "--help"]])  # fmt: skip
def test_help_is_printed_without_importing_torch(command):
    """``python -m fastmim.eval --help`` took 3-4 s (the package imported torch and the encoders first), convert's
    1.5 s: both print their options before torch's import, the same text as the full command's parse."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", *command], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and f"usage: python -m {command[0]}" in r.stdout, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "fastmim" in imported
    if command[0] == "fastmim.eval":
        from fastmim.eval.__main__ import build_parser

        assert r.stdout == build_parser(command[1] if len(command) == 3 else None).format_help()


def test_a_class_renamed_only_in_its_unicode_normalisation_is_told_apart_in_the_resume_refusal():
    """A fine-tuning resumed on re-normalised class folders is refused (its labels could differ); the message showed
    "'café' gone; 'café' new": a name that is not NFC is spelled out."""
    from fastmim.eval.finetune import _class_change

    assert _class_change(["a", "caf\u00e9"], ["a", "cafe\u0301"]) == \
        "'café' gone; 'cafe\\u0301' new (2 classes then, 2 now)"  # fmt: skip


@pytest.mark.parametrize("mode", ["knn", "finetune"])
def test_out_of_memory_says_the_batch_that_would_fit(tmp_path, capsys, monkeypatch, mode):
    """CUDA's OutOfMemoryError (a RuntimeError) was printed whole as any other error, exit 2: now its first line and
    the batch size that would fit, exit 1."""
    import fastmim.eval.__main__ as eval_cli

    def runs_out(args):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 1.50 GiB. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=x"
        )

    monkeypatch.setattr(eval_cli, "run", runs_out)
    train = make_image_folder(tmp_path / "train", n=4, classes=2)
    common = ["--random", "vit_tiny_patch16", "--data-path", str(train), "--batch-size", "6"]
    assert eval_main([mode, *common]) == 1
    err = capsys.readouterr().err
    half = 2 if mode == "finetune" else 3  # (fine-tuning's mixup pairs the images: an even batch)
    said = "error: out of memory: CUDA out of memory. Tried to allocate 1.50 GiB."
    assert f"{said}\nto fit: --batch-size {half} (was 6)" in err
    assert "If reserved" not in err
    assert ("with --accum-iter 3 (was 1): the same effective batch" in err) == (mode == "finetune")
    assert ("the smaller batch starts a new fine-tuning" in err) == (mode == "finetune")
    assert eval_main([mode, *common[:-1], "2"]) == 1  # nothing smaller to take
    err = capsys.readouterr().err
    assert "a smaller --img-size or encoder" in err if mode == "finetune" else "--batch-size 1 (was 2)" in err


def test_linprobe_out_of_memory_names_the_feature_batch(tmp_path, capsys, monkeypatch):
    """The probe's own batch (16384 by default, MAE's) holds only features: what runs out is the encoder's forward
    pass, so the advice halves --feature-batch, not --batch-size."""
    import fastmim.eval.__main__ as eval_cli

    def runs_out(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(eval_cli, "run", runs_out)
    train = make_image_folder(tmp_path / "train", n=4, classes=2)
    common = ["linprobe", "--random", "vit_tiny_patch16", "--data-path", str(train)]
    assert eval_main(common) == 1
    assert "to fit: --feature-batch 128 (was 256: images per forward pass of the encoder)" in capsys.readouterr().err
    assert eval_main([*common, "--feature-batch", "1"]) == 1
    assert "a smaller --img-size or encoder (--feature-batch is 1)" in capsys.readouterr().err


def test_the_same_encoder_is_the_same_file_from_any_process(tmp_path):
    """safetensors writes its metadata in a Rust hash map's order, which differs from process to process: the same
    weights gave other bytes, so eval.jsonl's encoder_sha256 differed between a resumed and an uninterrupted run."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = (
        "import sys, torch\n"
        "from fastmim.train.checkpoint import save_encoder\n"
        "t = {'pos_embed': torch.zeros(1, 2), 'a.weight': torch.arange(6.).view(2, 3), 'b': torch.ones(3).bfloat16()}\n"
        "save_encoder(sys.argv[1], t, {f'k{i}': f'v{i}' for i in range(16)})\n"
    )
    digests = set()
    for i in range(3):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {f"k{i}": f"v{i}" for i in range(16)} and f.get_tensor("a.weight")[1, 2] == 5


def test_skip_bad_files_leaves_unreadable_images_out_of_measures_and_replaces_them_in_training(tmp_path, capfd):
    """--skip-bad-files: the kNN of folders holding an unreadable image equals the kNN of the same folders without
    it (features and votes over the readable images, counted in left_out); features it cached are not taken by a
    run without the flag (which names the file); the probe's and the fine-tuning's training sets get a stand-in."""
    _, path = _save_run_encoder(tmp_path)
    train = make_image_folder(tmp_path / "d" / "train", n=10, classes=2)
    val = make_image_folder(tmp_path / "d" / "val", n=6, classes=2, seed=1)
    bad = [sorted(train.rglob("*.jpg"))[3], sorted(val.rglob("*.jpg"))[1]]
    clean = tmp_path / "clean"
    shutil.copytree(tmp_path / "d", clean)
    for f in bad:
        (clean / f.relative_to(tmp_path / "d")).unlink()
        f.write_bytes(b"junk")
    knn = ["knn", "--encoder", str(path), "--k", "3", "--out", str(tmp_path / "r.jsonl")]
    assert eval_main([*knn, "--data-path", str(clean), "--no-cache"]) == 0
    assert eval_main([*knn, "--data-path", str(tmp_path / "d"), "--no-cache"]) == 2
    assert "or run with --skip-bad-files" in capfd.readouterr().err
    assert eval_main([*knn, "--data-path", str(tmp_path / "d"), "--skip-bad-files", "--workers", "1"]) == 0
    err = capfd.readouterr().err
    assert all(f"skipped: cannot read image {str(f)!r}" in err for f in bad), err
    want, got = [json.loads(s) for s in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
    assert got["left_out"] == {"train": 1, "val": 1} and (got["train_images"], got["val_images"]) == (9, 5)
    assert (want["train_images"], want["val_images"]) == (9, 5) and "left_out" not in want
    assert eval_main([*knn, "--data-path", str(tmp_path / "d")]) == 2  # (its cache holds 9 of the 10: not taken)
    assert "cannot read image" in capfd.readouterr().err
    assert eval_main([*knn, "--data-path", str(tmp_path / "d"), "--skip-bad-files"]) == 0  # (from the cache)
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])["features_cached"] is True
    probe = ["linprobe", "--encoder", str(path), "--data-path", str(tmp_path / "d"), "--epochs", "1",
             "--batch-size", "4", "--skip-bad-files", "--out", str(tmp_path / "r.jsonl")]  # fmt: skip
    assert eval_main(probe) == 0
    assert "stands in for it (--skip-bad-files" in capfd.readouterr().err
    pytest.importorskip("timm", reason="fine-tuning builds on timm")
    tune = ["finetune", "--encoder", str(path), "--data-path", str(tmp_path / "d"), "--epochs", "2", "--batch-size",
            "4", "--aa", "none", "--mixup", "0", "--cutmix", "0", "--finetune-dir", str(tmp_path / "ft"),
            "--skip-bad-files", "--out", str(tmp_path / "r.jsonl")]  # fmt: skip
    assert eval_main(tune) == 0
    err = capfd.readouterr().err
    assert "stands in for it (--skip-bad-files" in err and "left out (--skip-bad-files" in err
    # each named once, not at each of the 2 epochs (its training and its evaluation)
    assert [err.count(f"skipped: cannot read image {str(f)!r}") for f in bad] == [1, 1], err
    row = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    assert row["left_out"] == {"val": 1} and row["val_images"] == 5 and "images" not in row["history"][0]
    assert json.loads((tmp_path / "ft" / "args.json").read_text())["skip_bad_files"] is True  # (a resume keeps it)


def test_finetune_evaluation_leaves_out_the_images_a_folder_skipped():
    """evaluate(): the rows labelled LEFT_OUT count neither as hits nor as images."""
    from fastmim.eval.encoder import LEFT_OUT
    from fastmim.eval.finetune import evaluate

    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    net = torch.nn.Identity()
    y_out = y.clone()
    y_out[[1, 6]] = LEFT_OUT
    keep = y_out != LEFT_OUT
    got = evaluate(net, [(x[:4], y_out[:4]), (x[4:], y_out[4:])], 5, torch.device("cpu"))
    assert got == evaluate(net, [(x[keep], y[keep])], 5, torch.device("cpu")) and got["images"] == 6
    whole = evaluate(net, [(x, y)], 5, torch.device("cpu"))
    assert (got["top1"], got["top5"]) != (whole["top1"], whole["top5"])  # (the two rows change the accuracy)


def test_cached_features_that_left_an_image_out_are_extracted_again_once_it_reads(tmp_path, capfd, monkeypatch):
    """An image left out as unreadable by a passing error (an NFS hiccup; its size and time unchanged, so the cache's
    key too) is not left out of every later evaluation: a hit whose left-out images now read is extracted again."""
    import fastmim.eval.encoder as enc
    from fastmim.data.folder import BadImageError

    _, path = _save_run_encoder(tmp_path)
    make_image_folder(tmp_path / "d" / "train", n=8, classes=2)
    make_image_folder(tmp_path / "d" / "val", n=4, classes=2, seed=1)
    sorted((tmp_path / "d" / "val").rglob("*.jpg"))[0].write_bytes(b"junk")
    flaky = str(sorted((tmp_path / "d" / "train").rglob("*.jpg"))[2])
    real = enc.open_rgb

    def hiccup(source, name):
        if name == flaky:
            raise BadImageError(f"cannot read image {name!r}: [Errno 5] Input/output error", name)
        return real(source, name)

    knn = ["knn", "--encoder", str(path), "--k", "3", "--data-path", str(tmp_path / "d"), "--skip-bad-files"]
    monkeypatch.setattr(enc, "open_rgb", hiccup)
    assert eval_main(knn) == 0
    monkeypatch.undo()
    assert eval_main(knn) == 0
    assert eval_main(knn) == 0
    rows = [json.loads(s) for s in (path.parent / "eval.jsonl").read_text().splitlines()]
    assert [r["left_out"] for r in rows] == [{"train": 1, "val": 1}, {"train": 0, "val": 1}, {"train": 0, "val": 1}]
    assert [r["features_cached"] for r in rows] == [False, False, True]
    assert "note: 1 unreadable image(s) left out of the cached features" in capfd.readouterr().err


def test_an_encoder_of_another_patch_size_or_a_users_own_model_name_is_evaluated(tmp_path, capsys):
    """A run with --model-args patch_size=8 wrote mae_vit_tiny_patch16's name: its encoder did not load (position
    embedding 5 against 17), its --eval-data monitor stopped the run, and --random RUN built a patch-16 ViT as that
    run's random baseline. A model registered by the user's own script (mae_sobel_vit_tiny_patch16) was an unknown
    encoder, and --model was refused as contradicting the file."""
    from safetensors.torch import load_file

    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    data = make_image_folder(tmp_path / "d", n=8)
    labelled = tmp_path / "labelled"
    make_image_folder(labelled / "train", n=4)
    make_image_folder(labelled / "val", n=2, seed=1)
    run = tmp_path / "p8"
    pretrain.run([*TINY_ARGS, "--img-size", "32", "--data-path", str(data), "--output-dir", str(run), "--max-steps",
                  "2", "--model-args", "patch_size=8", "--eval-data", str(labelled)])  # fmt: skip
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [0, 2]  # the monitor's encoder too
    enc, info = load_encoder(run)
    assert enc.patch_embed.patch_size == (8, 8) and info["img_size"] == 32
    state = load_file(run / "encoder.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in enc.state_dict().items())
    assert enc(torch.randn(2, 3, 32, 32)).shape[0] == 2
    assert eval_main(["knn", "--random", str(run), "--data-path", str(data), "--val-path", str(data), "--k", "2",
                      "--batch-size", "4", "--device", "cpu"]) == 0  # fmt: skip
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["random_options"]["patch_size"] == 8  # the random baseline has the run's patches
    capsys.readouterr()
    # a name only the user's script registers: read as the encoder its name ends in, or named with --model
    _, path = _save_run_encoder(tmp_path, img_size=32)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), "model": "mae_sobel_vit_tiny_patch16"}
    save_file(load_file(path), path, metadata=meta)
    assert load_encoder(path)[1]["encoder"] == "vit_tiny_patch16"
    assert load_encoder(path, model="vit_tiny_patch16")[1]["encoder"] == "vit_tiny_patch16"  # (was "contradicts")
    save_file(load_file(path), path, metadata={**meta, "model": "my_method"})
    with pytest.raises(ValueError, match="unknown encoder 'my_method'.*name its encoder's architecture with --model"):
        load_encoder(path)
    assert load_encoder(path, model="vit_tiny_patch16")[1]["encoder"] == "vit_tiny_patch16"
    # SimMIM's paper setting (no absolute position embedding, a shared relative bias) at patch 8: the patch from the
    # weights too (it was taken only beside a position embedding)
    from fastmim.train.checkpoint import save_encoder

    simmim = fastmim.create_model("simmim_vit_tiny_patch16", img_size=32, patch_size=8, rel_pos_bias="shared",
                                  abs_pos_embed=False)  # fmt: skip
    save_encoder(tmp_path / "s8.safetensors", simmim.encoder_state_dict(),
                 {"model": "simmim_vit_tiny_patch16", "step": "1", "img_size": "32"})  # fmt: skip
    enc, info = load_encoder(tmp_path / "s8.safetensors")
    assert enc.patch_embed.patch_size == (8, 8) and info["encoder"] == "vit_tiny_patch8" and info["img_size"] == 32
    with pytest.raises(ValueError, match="contradicts it"):  # a name it knows is still the file's word
        save_file(load_file(path), path, metadata={**meta, "model": "mae_vit_tiny_patch16"})
        load_encoder(path, model="vit_small_patch16")


def test_official_mae_and_ijepa_checkpoints_and_ddp_prefixes_load_as_their_encoders(tmp_path, capsys):
    """MAE's pretraining checkpoint ({"model": encoder + decoder_* + mask_token}) was refused for its decoder keys;
    a DDP ("module.") or torch.compile ("_orig_mod.") prefix failed on the position embedding it could not find;
    I-JEPA's checkpoint (encoder, predictor, target_encoder, opt, ...) "does not hold a state dict of tensors"; a
    --model of another patch size than the weights' was recorded as the encoder."""
    torch.manual_seed(0)
    mae = fastmim.create_model("mae_vit_tiny_patch16", img_size=32)  # the official layout (strict-loads MAE's own)
    state = mae.state_dict()
    assert "decoder_embed.weight" in state and "mask_token" in state
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = mae.forward_features(x) if hasattr(mae, "forward_features") else None
    for name, saved in (("mae_pretrain.pth", {"model": state}),
                        ("ddp.pth", {"model": {f"module.{k}": v for k, v in state.items()}}),
                        ("compiled.pth", {f"_orig_mod.{k}": v for k, v in state.items()})):  # fmt: skip
        torch.save(saved, tmp_path / name)
        enc, info = load_encoder(tmp_path / name, "vit_tiny_patch16")
        assert info["img_size"] == 32, name
        own = {k: v for k, v in state.items() if not k.startswith("decoder_") and k != "mask_token"}
        assert all(torch.equal(v, own[k]) for k, v in enc.state_dict().items()), name
        if want is not None:
            with torch.no_grad():
                torch.testing.assert_close(enc.forward_features(x), want)
    capsys.readouterr()  # --model naming another patch than the weights': built, and recorded, as the weights are
    enc, info = load_encoder(tmp_path / "mae_pretrain.pth", "vit_tiny_patch14")
    assert info["encoder"] == "vit_tiny_patch16" and enc.patch_embed.patch_size == (16, 16)
    assert "--model vit_tiny_patch14 is read as vit_tiny_patch16" in capsys.readouterr().out
    jepa = fastmim.create_model("ijepa_vit_tiny_patch16", img_size=64)
    target = jepa.encoder_state_dict()  # what fastmim exports for I-JEPA: its target encoder
    official = {
        "encoder": {f"module.{k}": torch.zeros_like(v) for k, v in target.items()},
        "predictor": {"module.predictor_embed.weight": torch.zeros(4, 4)},
        "target_encoder": {f"module.{k}": v for k, v in target.items()},
        "opt": {"state": {}},
        "epoch": 3,
        "loss": 0.5,
        "batch_size": 64,
        "world_size": 1,
        "lr": 1e-3,
    }
    torch.save(official, tmp_path / "ijepa-latest.pth.tar")
    capsys.readouterr()
    enc, info = load_encoder(tmp_path / "ijepa-latest.pth.tar", "vit_tiny_patch16")
    assert info["img_size"] == 64 and "an I-JEPA checkpoint; its target_encoder is read" in capsys.readouterr().out
    assert all(torch.equal(v, target[k]) for k, v in enc.state_dict().items())


def test_a_convnextv2_fcmae_encoder_without_timms_head_norm_loads(tmp_path):
    """ConvNeXt V2's pretraining has no final norm: its encoder in timm's keys (after timm's checkpoint filter) was
    refused for the missing head.norm; it loads with the norm at its initial values, as fastmim's own export holds."""
    model = fastmim.create_model("fcmae_convnextv2_atto", img_size=64)
    exported = model.encoder_state_dict()
    torch.save({k: v for k, v in exported.items() if not k.startswith("head.norm.")}, tmp_path / "fcmae.pth")
    enc, info = load_encoder(tmp_path / "fcmae.pth", "convnextv2_atto")
    assert info["encoder"] == "convnextv2_atto"
    assert all(torch.equal(v, exported[k]) for k, v in enc.state_dict().items())
    torch.save({k: v for k, v in exported.items() if k != "stem.0.bias"}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="do not fit encoder 'convnextv2_atto'.*stem.0.bias"):  # the rest: strict
        load_encoder(tmp_path / "cut.pth", "convnextv2_atto")


def test_probe_crop_is_maes_single_draw_not_torchvisions_retry_loop():
    """MAE's linear probe crops with its util/crop.py (one draw of area and log-aspect, each side rounded and clipped
    to the image, placed uniformly), not torchvision's 10-try loop with a centre-crop fallback, which gives smaller
    crops. The box matches that rule draw for draw (written out here from MAE's code), and on a 4:3 photo its mean area
    share is MAE's ~0.52, not torchvision's ~0.44; the probe's transform uses it and pickles (spawned workers)."""
    import pickle

    import torchvision.transforms as T
    from PIL import Image

    from fastmim.eval.encoder import SingleDrawResizedCrop, single_draw_crop_box, train_transform

    def mae_box(width, height):
        area = width * height * torch.empty(1).uniform_(0.08, 1.0).item()
        log_r = torch.log(torch.tensor((3 / 4, 4 / 3)))
        aspect = torch.exp(torch.empty(1).uniform_(log_r[0], log_r[1])).item()
        w, h = min(int(round(math.sqrt(area * aspect))), width), min(int(round(math.sqrt(area / aspect))), height)
        top = torch.randint(0, height - h + 1, size=(1,)).item()
        return top, torch.randint(0, width - w + 1, size=(1,)).item(), h, w

    for size in ((500, 375), (64, 300), (7, 7)):
        torch.manual_seed(1)
        want = [mae_box(*size) for _ in range(300)]
        torch.manual_seed(1)
        assert [single_draw_crop_box(*size) for _ in range(300)] == want
    img = Image.new("RGB", (500, 375))
    torch.manual_seed(0)
    ours = np.mean([h * w for _, _, h, w in (single_draw_crop_box(500, 375) for _ in range(4000))]) / (500 * 375)
    tv = np.mean([h * w for _, _, h, w in (T.RandomResizedCrop.get_params(img, (0.08, 1), (3 / 4, 4 / 3))
                                           for _ in range(4000))]) / (500 * 375)  # fmt: skip
    assert abs(ours - 0.52) < 0.02 and abs(tv - 0.44) < 0.02
    transform = pickle.loads(pickle.dumps(train_transform(32)))
    assert isinstance(transform.transforms[0], SingleDrawResizedCrop)
    assert transform(img).shape == (3, 32, 32)


def test_convnext_is_evaluated_in_convnext_v2s_view_above_224():
    """MAE's view (224 / 256 up to 224 px, a centre crop without margin above) was used for every encoder; ConvNeXt
    V2's datasets.py crops 224 / 256 below 384 and squashes the whole image to S x S from 384 (no crop)."""
    from PIL import Image

    from fastmim.eval.encoder import eval_transform, eval_view

    assert eval_view(224, "vit_base_patch16") == eval_view(224, "convnextv2_atto") == {"crop_pct": 0.875}
    assert eval_view(288, "vit_base_patch16") == {"crop_pct": 1.0}
    assert eval_view(288, "convnextv2_atto") == {"crop_pct": 0.875}
    assert eval_view(384, "convnextv2_atto") == {"warp": True}
    img = Image.new("RGB", (400, 200))
    img.paste((255, 0, 0), (0, 0, 40, 200))  # a red band on the left tenth: cropped away by a centre crop
    squashed = eval_transform(384, "convnextv2_atto")(img)
    cropped = eval_transform(384, "vit_base_patch16")(img)
    assert squashed.shape == cropped.shape == (3, 384, 384)
    assert squashed[0, :, :20].mean() > 2 and cropped[0, :, :20].mean() < 0  # red (normalised) only when squashed


def test_finetune_notes_an_effective_batch_other_than_the_recipes(capsys):
    """The blr scales to the batch, but the steps, the warm-up and the EMA's horizon do not: a fine-tuning at another
    effective batch than its recipe's is noted with the --accum-iter that gives the recipe's."""
    from fastmim.eval.__main__ import _note_effective_batch
    from fastmim.train.distributed import DistInfo

    def note(batch, accum, encoder="vit_base_patch16", model=None):
        args = argparse.Namespace(batch_size=batch, accum_iter=accum, dist_info=DistInfo())
        _note_effective_batch(args, {"encoder": encoder, "model": model})
        return capsys.readouterr().out

    assert note(64, 1) == ("note: effective batch 64 (--batch-size 64 x --accum-iter 1 x 1 process); the recipe's is "
                           "1024: --accum-iter 16 gives it\n")  # fmt: skip
    assert note(64, 16) == note(32, 32, "convnextv2_atto") == ""
    assert "the recipe's is 512: --accum-iter 8 gives it" in note(64, 1, model="data2vec2_vit_base_patch16")
    assert note(48, 1).endswith("the recipe's is 1024\n")  # (no whole --accum-iter gives it)


def _official_names(state: dict, sparse: bool) -> dict:
    """fastmim's (timm's) ConvNeXt V2 keys as ConvNeXt V2's own code names them, written out here from its models:
    the dense model (downsample_layers, stages.i.j, dwconv, pwconv, grn gamma/beta [1, 1, 1, C], norm, head), or with
    ``sparse`` FCMAE's encoder, whose MinkowskiEngine modules keep kernels [K*K, in, out] / [K*K, C] (offsets
    column-major: ``utils.remap_checkpoint_keys`` swaps the last two axes), (1, C) biases, ``.ln.`` / ``.linear.``
    wrappers and GRN parameters (1, C)."""
    import re

    def kernel(w):  # the inverse of remap_checkpoint_keys's reshape
        k = w.shape[-1]
        if w.shape[1] == 1 and "conv_dw" in name:
            return w.transpose(3, 2).reshape(w.shape[0], k * k).permute(1, 0)
        return w.transpose(3, 2).reshape(w.shape[0], w.shape[1], k * k).permute(2, 1, 0)

    out = {}
    for name, v in state.items():
        pre = "encoder." if name.startswith("encoder.") else ""
        key = name.removeprefix(pre)
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("mlp.grn.weight", "grn.gamma")
        key = key.replace("mlp.grn.bias", "grn.beta").replace("head.norm.", "norm.").replace("head.fc.", "head.")
        if "pwconv" in key and key.endswith("weight"):
            v = v.reshape(v.shape[0], v.shape[1])  # nn.Linear (timm's 1x1 conv for atto)
        sparse_here = sparse and pre and not key.startswith("downsample_layers.0.")  # (the stem stays dense)
        if "grn" in key:
            v = v.reshape(1, -1) if sparse_here else v.reshape(1, 1, 1, -1)
        if sparse_here:
            layer = key.split(".")
            if key.startswith("downsample_layers.") and layer[2] == "0" or ".norm." in key:
                key = key.rsplit(".", 1)[0] + ".ln." + layer[-1]  # MinkowskiLayerNorm wraps nn.LayerNorm
            elif "pwconv" in key:
                key = key.rsplit(".", 1)[0] + ".linear." + layer[-1]  # MinkowskiLinear wraps nn.Linear
            elif (key.startswith("downsample_layers.") or "dwconv" in key) and layer[-1] == "weight":
                key, v = key[: -len("weight")] + "kernel", kernel(v)
            elif (key.startswith("downsample_layers.") or "dwconv" in key) and layer[-1] == "bias":
                v = v.reshape(1, -1)
        out[pre + key] = v
    return out


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_convnextv2_own_code_checkpoints_load_in_fastmims_names(tmp_path, size):
    """ConvNeXt V2's own checkpoints were refused with a hint to timm's filter: a fine-tuned model's (dense,
    classifier and final norm included) and an FCMAE pretraining's (the sparse encoder's MinkowskiEngine layouts beside
    the decoder) now load, the encoder in python -m fastmim.eval and the whole FCMAE model with --init-weights.
    Both sizes: atto's pointwise layers are 1x1 convolutions in timm's layout, tiny's linear."""
    from fastmim.train.checkpoint import init_model_weights, read_init_weights

    torch.manual_seed(0)
    dense = fastmim.create_model(f"convnextv2_{size}", num_classes=5)
    torch.save({"model": _official_names(dense.state_dict(), sparse=False)}, tmp_path / "finetuned.pth")
    enc, info = load_encoder(tmp_path / "finetuned.pth", f"convnextv2_{size}")
    want = {k: v for k, v in dense.state_dict().items() if not k.startswith("head.fc.")}
    assert enc.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in enc.state_dict().items())

    fcmae = fastmim.create_model(f"fcmae_convnextv2_{size}", img_size=64)
    with torch.no_grad():  # (not the initial zeros and ones: a layout mistake must show)
        for p in fcmae.parameters():
            p.normal_()
    official = _official_names(fcmae.state_dict(), sparse=True)
    assert "encoder.stages.0.0.dwconv.kernel" in official and "decoder.0.grn.gamma" in official
    torch.save({"model": official, "epoch": 1599}, tmp_path / "fcmae.pt")
    fresh = fastmim.create_model(f"fcmae_convnextv2_{size}", img_size=64)
    said = init_model_weights(fresh, read_init_weights(tmp_path / "fcmae.pt"), "fcmae.pt")
    assert "whole" in said or "model" in said, said
    for k, v in fcmae.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    enc, _ = load_encoder(tmp_path / "fcmae.pt", f"convnextv2_{size}")
    exported = fcmae.encoder_state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in enc.state_dict().items() if not k.startswith("head.norm."))
