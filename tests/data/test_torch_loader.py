"""The torchvision/PIL loader: shapes and values, seeding, sharding, and the same view of a dataset as DALI's."""

from __future__ import annotations

import pytest
import torch

from fastmim.data import ImageFolderDataset, build_pretrain_loader, pretrain_transform
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tv"), n=24, size=(90, 70))


def batches(folder, seed=0, rank=0, world=1, workers=0, batch=4):
    ds = ImageFolderDataset(folder, pretrain_transform(32), seed=seed)
    loader, sampler = build_pretrain_loader(ds, batch, workers, rank, world, seed=seed)
    sampler.set_epoch(0)
    return [(x.clone(), i.clone()) for x, i in loader]


def test_shapes_dtypes_and_value_range(folder):
    got = batches(folder, batch=5)
    assert len(got) == 4  # 24 images, drop-last batches of 5
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    for x, idx in got:
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
        assert idx.shape == (5,) and idx.dtype == torch.int64
        assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4 and float(x.std()) > 0.05


def test_the_same_seed_gives_the_same_batches_whatever_the_workers(folder):
    a, b, c = batches(folder, seed=3), batches(folder, seed=3, workers=2), batches(folder, seed=4)
    assert all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a, b, strict=True))
    assert not all(torch.equal(i, j) for (_, i), (_, j) in zip(a, c, strict=True))


def test_ranks_split_the_dataset_without_overlap_or_loss(folder):
    seen = [set(torch.cat([i for _, i in batches(folder, rank=r, world=3)]).tolist()) for r in range(3)]
    assert all(not (seen[a] & seen[b]) for a in range(3) for b in range(a + 1, 3))
    assert set().union(*seen) == set(range(24))


def test_a_loader_refuses_a_dataset_smaller_than_one_global_batch(folder):
    ds = ImageFolderDataset(folder, pretrain_transform(32))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_pretrain_loader(ds, 16, 0, 0, 2)


def test_files_the_loader_does_not_read_are_counted_by_extension(tmp_path, capsys):
    """.jfif and .jpe (JPEGs under other names) are read; files of other extensions (a GIF, a HEIC, notes) are not,
    and the folder's note counts them by extension, once; a folder holding no image names what it holds."""
    from PIL import Image

    from fastmim.data.folder import list_images

    data = make_image_folder(tmp_path / "d", n=4)
    jpeg = (data / "class0" / "img000.jpg").read_bytes()
    (data / "class0" / "photo.jfif").write_bytes(jpeg)
    (data / "class0" / "photo.JPE").write_bytes(jpeg)
    Image.new("RGB", (8, 8)).save(data / "class1" / "anim.gif")
    (data / "class1" / "iphone.heic").write_bytes(b"\0" * 16)
    (data / "class1" / "more.gif").write_bytes(b"GIF89a")
    (data / "notes.txt").write_text("x")
    files = list_images(data)
    assert len(files) == 6 and str(data / "class0" / "photo.jfif") in files
    err = capsys.readouterr().err
    assert f"note: {data}: 4 file(s) without an image extension" in err and "not read: .gif 2, .heic 1, .txt 1" in err
    list_images(data)
    assert capsys.readouterr().err == ""  # said once
    only = tmp_path / "gifs"
    only.mkdir()
    Image.new("RGB", (8, 8)).save(only / "a.gif")
    with pytest.raises(ValueError, match=r"holds no images \(looked for .*\); it holds 1 other file\(s\): .gif 1"):
        list_images(only)


def test_what_is_wrong_with_a_file_is_said_in_words(tmp_path, monkeypatch):
    """A bad image's line says what is wrong, with no object address (PIL's own text for bytes names a BytesIO at
    an address that changes every run): empty, not an image, too large for Pillow's guard (which
    FASTMIM_MAX_IMAGE_PIXELS sets); an image above Pillow's warning size is read without its warning."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from fastmim.data.folder import BadImageError, open_rgb
    from tests.conftest import ROOT

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for src in (tmp_path / "empty.jpg", b""):
        with pytest.raises(BadImageError, match=r"cannot read image '.*': empty file \(0 bytes\)$"):
            open_rgb(src, str(tmp_path / "empty.jpg"))
    for src in (tmp_path / "text.jpg", b"hello"):
        with pytest.raises(BadImageError, match=r"': not an image \(PIL cannot identify its format\)$"):
            open_rgb(src, "text.jpg")
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit
    with pytest.raises(BadImageError, match="decompression bomb.*FASTMIM_MAX_IMAGE_PIXELS=N raises it, 0 removes it"):
        open_rgb(tmp_path / "big.png", "big.png")
    # over the limit, under twice it: PIL warns; fastmim's filter (set at import, for the process: pytest resets
    # filters per test, so in a process of its own) reads it quietly, even where warnings are errors
    quiet = ("from PIL import Image; from fastmim.data.folder import open_rgb; Image.MAX_IMAGE_PIXELS = 3000; "
             f"print(open_rgb({str(tmp_path / 'big.png')!r}, 'big.png').size)")  # fmt: skip
    run = subprocess.run([sys.executable, "-W", "error", "-c", quiet], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "(64, 64)", run.stderr
    code = "from PIL import Image; import fastmim.data.folder; print(Image.MAX_IMAGE_PIXELS)"
    for value, want in (("0", "None"), ("500000000", "500000000")):
        env = {**os.environ, "FASTMIM_MAX_IMAGE_PIXELS": value, "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert run.stdout.strip() == want
    # a value that is not a count: imports still work (--help, the benchmarks); reading data says what is wrong
    from fastmim.data import folder

    monkeypatch.setenv("FASTMIM_MAX_IMAGE_PIXELS", "\u00b2")  # a digit to str.isdigit, not to int()
    assert folder._pixel_limit() == "FASTMIM_MAX_IMAGE_PIXELS must be a pixel count >= 0 (0: no limit), got '\u00b2'"
    monkeypatch.setenv("FASTMIM_MAX_IMAGE_PIXELS", "lots")
    problem = folder._pixel_limit()
    assert problem == "FASTMIM_MAX_IMAGE_PIXELS must be a pixel count >= 0 (0: no limit), got 'lots'"
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with warnings.catch_warnings():  # warnings made errors in the user's process: the image is still read
        warnings.simplefilter("error")
        assert open_rgb(tmp_path / "big.png", "big.png").size == (64, 64)
    monkeypatch.setattr(folder, "_PIXEL_LIMIT_PROBLEM", problem)
    with pytest.raises(ValueError, match="FASTMIM_MAX_IMAGE_PIXELS must be a pixel count"):
        folder.ImageFolderDataset(tmp_path)


def test_augmentation_seeds_never_repeat_across_epochs_however_large_the_data_set():
    """Sample i + 10,000,019 of epoch e had sample i's seed of epoch e + 1 (an affine mix; ImageNet-22k has 14M
    images): the seeds are a hash of (seed, epoch, index) now, with 63 random bits (no collision among 600,000)."""
    from fastmim.data.folder import ImageFolderDataset

    ds = ImageFolderDataset.__new__(ImageFolderDataset)  # the seeding alone: no files needed
    ds.seed = 0
    seeds = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in (*range(200_000), 10_000_019, 10_000_020, 20_000_038):
            seeds.setdefault(ds._sample_seed(i), []).append((epoch, i))
    assert all(len(v) == 1 for v in seeds.values()), [v for v in seeds.values() if len(v) > 1][:3]
    assert all(0 <= s < 2**63 for s in seeds)


def test_a_folder_holding_train_and_val_splits_is_said_to_be_read_whole(tmp_path, capsys):
    """A download's root with train/ and val/ was pretrained on whole, its validation images too, unsaid: a note
    names the splits and the training folder to pass; a folder of classes, or a train/ alone, gets none."""
    root = tmp_path / "imagenet"
    make_image_folder(root / "train", n=8, classes=2)
    make_image_folder(root / "val", n=4, classes=2, seed=1)
    assert len(ImageFolderDataset(root)) == 12
    err = capsys.readouterr().err
    assert f"note: {root} holds the splits train/ (8 images), val/ (4 images), all read" in err, err
    assert err.rstrip().endswith(f"pass --data-path {root / 'train'}")
    ImageFolderDataset(root)
    assert "holds the splits" not in capsys.readouterr().err  # (once)
    from fastmim.data import folder
    from fastmim.data.scan import scan

    folder._NOTED.clear()  # (a scanned folder is read through its scan list, as DALI reads it: said too)
    ImageFolderDataset(scan(root, workers=1, progress=False).list_path)
    assert f"note: {root} holds the splits train/ (8 images), val/ (4 images)" in capsys.readouterr().err
    ImageFolderDataset(root / "train")
    (root / "val").rename(root / "extra")
    ImageFolderDataset(str(root) + "/")
    assert "holds the splits" not in capsys.readouterr().err


def test_hidden_images_and_folders_left_out_are_said(tmp_path, capfd):
    """Hidden files and folders are not read (.DS_Store, .ipynb_checkpoints): an image named with a leading '.', or
    inside a hidden folder, was left out without a word. macOS's "._*" AppleDouble files carry no image: not counted."""
    from fastmim.data.folder import list_images
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", n=4, classes=1)
    jpeg = next(root.rglob("*.jpg")).read_bytes()
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "t.jpg").write_bytes(jpeg)
    (root / "class0" / ".again.jpg").write_bytes(jpeg)
    (root / "class0" / "._img000.jpg").write_bytes(b"\0" * 82)
    (root / ".DS_Store").write_bytes(b"\0")
    capfd.readouterr()
    assert len(list_images(root)) == 4
    err = capfd.readouterr().err
    assert f"note: {root}: hidden files and folders (names starting with '.') are not read: 1 image(s) and 1 " \
        "folder(s) left out" in err, err  # fmt: skip
