"""The crop options. PixMIM's simple resized crop (``--crop simple``): the torch transform and the DALI pipeline each
give windows of the short-side-resized, reflect-padded image (checked against an independent PIL + NumPy
reconstruction, every window searched), reach into the padding on every side, and the CLI refuses what cannot run it.
The crop's filter (``--crop-interp``: SimMIM's and I-JEPA's bilinear random-resized crop) reaches every loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.data.dali import dali_problem
from fastmim.data.transforms import SIMPLE_CROP_PAD, pretrain_transform
from tests.data.crops import best_window, simple_crop_source

SIZES = [(50, 37), (37, 50), (64, 64), (90, 41), (33, 80)]  # (width, height): landscape, portrait, square, long ones


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth random images (upsampled noise: every window of one is distinct) of SIZES, as JPEGs."""
    root = tmp_path_factory.mktemp("simple_crop")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        coarse = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
        path = root / f"{i}.jpg"
        Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(path, quality=100)
        paths.append(str(path))
    return paths


def check_windows(samples, photos, size, tol, resample=Image.BILINEAR):
    """Every (sample, index) is a window of its photo's padded resize (with PIL's ``resample`` filter) within
    ``tol``; over all of them the windows reach into the padding at the top, bottom, left and right, the very first
    and last offsets on each axis occur (an off-by-one in the offset's range is caught), and both flips occur."""
    reach, flips = set(), set()
    for x, i in samples:
        source = simple_crop_source(photos[i], size, resample=resample)
        err, (top, left, flipped), (max_top, max_left) = best_window(x, source)
        assert err <= tol, (photos[i], err)
        flips.add(flipped)
        reach |= {side for side, hit in (("top", top < SIMPLE_CROP_PAD), ("bottom", top > max_top - SIMPLE_CROP_PAD),
                                         ("left", left < SIMPLE_CROP_PAD),
                                         ("right", left > max_left - SIMPLE_CROP_PAD), ("top 0", top == 0),
                                         ("last top", top == max_top), ("left 0", left == 0),
                                         ("last left", left == max_left)) if hit}  # fmt: skip
    assert reach == {"top", "bottom", "left", "right", "top 0", "last top", "left 0", "last left"}
    assert flips == {False, True}


@pytest.mark.parametrize(("interp", "resample"), [(None, Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_the_torch_transform_is_a_window_of_the_reflect_padded_resize(photos, interp, resample):
    size = 32
    tf = pretrain_transform(size, hflip=0.5, crop="simple", interp=interp)
    samples = []
    for seed in range(12):
        torch.manual_seed(seed)
        for i, path in enumerate(photos):
            with Image.open(path) as im:
                x = tf(im.convert("RGB"))
            assert x.shape == (3, size, size) and x.dtype == torch.float32
            samples.append((x, i))
    check_windows(samples, photos, size, tol=1e-5, resample=resample)  # the same PIL resize: float rounding differs


def test_an_unknown_crop_or_filter_is_refused_and_the_random_resized_bicubic_crop_stays_the_default():
    from torchvision import transforms as T

    with pytest.raises(ValueError, match="crop must be one of random-resized, simple, got 'center'"):
        pretrain_transform(32, crop="center")
    with pytest.raises(ValueError, match="crop_interp must be one of bicubic, bilinear .*, got 'nearest'"):
        pretrain_transform(32, interp="nearest")
    crop = pretrain_transform(32).transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert crop.scale == (0.2, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))  # MAE's, not torchvision's 0.08
    crop = pretrain_transform(32, interp="bilinear").transforms[0]  # SimMIM's, I-JEPA's
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BILINEAR


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_the_dali_pipeline_gives_the_same_windows_and_resumes_from_a_checkpoint(photos):
    from fastmim.data.dali import DaliLoader

    def make():
        return DaliLoader(photos, 5, 32, num_threads=1, seed=2, crop="simple", initial_fill=1)

    ld = make()
    samples = []
    for epoch in range(8):
        ld.set_epoch(epoch)
        samples += [(x, i) for xs, idx in ld for x, i in zip(xs, idx.tolist(), strict=True)]
    # DALI decodes with libjpeg-turbo and resizes with its own linear filter: a few levels of 255 apart (a
    # neighbouring window is tens of levels away)
    check_windows(samples, photos, 32, tol=3.5 / 255)
    # bicubic (--crop-interp bicubic): the same windows (the same draws), through DALI's cubic filter
    cubic = DaliLoader(
        photos, 5, 32, num_threads=1, seed=2, crop="simple", initial_fill=1, crop_interp="bicubic", interp="cubic"
    )  # auto: a linear shrink on CPU threads
    assert cubic.filters == ("cubic", "cubic")
    for x, i in zip(*next(iter(cubic)), strict=True):
        err = best_window(x, simple_crop_source(photos[int(i)], 32, resample=Image.BICUBIC))[0]
        assert err <= 3.5 / 255, (photos[int(i)], err * 255)
    # its random placement is part of the pipeline's checkpoint: a restored loader continues with the same windows
    ld = make()
    ld.set_epoch(0)
    next(iter(ld))
    state = ld.state_dict()
    ld.set_epoch(1)
    want = [x.clone() for x, _ in ld]
    again = make()
    again.load_state_dict(state)
    again.set_epoch(1)
    got = [x.clone() for x, _ in again]
    assert len(got) == len(want) == 1 and torch.equal(got[0], want[0])


def test_dali_refuses_an_unknown_crop(photos):
    if dali_problem() is not None:
        pytest.skip(f"optional dependency absent: {dali_problem()}")
    from fastmim.data.dali import DaliLoader

    with pytest.raises(ValueError, match="crop must be one of"):
        DaliLoader(photos, 2, 32, num_threads=1, crop="centre")


def test_pretrain_runs_pixmim_with_the_simple_crop_and_records_it(image_folder, tmp_path, capsys):
    import yaml

    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    args = [*TINY_ARGS, "--model", "pixmim_vit_tiny_patch16", "--data-path", str(image_folder), "--loader", "torch",
            "--crop", "simple", "--max-steps", "2", "--vis-interval", "100"]  # fmt: skip
    out = tmp_path / "run"
    assert pretrain.main([*args, "--output-dir", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["crop"] == "simple"
    capsys.readouterr()
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "3"]) == 0  # the crop comes back
    assert "changed settings" not in capsys.readouterr().out
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "4", "--crop", "random-resized"]) == 0
    said = "changed settings: crop simple -> random-resized (and with it the filter, bilinear -> bicubic)"
    assert said in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--crop", "center"], "crop must be one of random-resized, simple, got 'center'"),
        (["--crop-interp", "nearest"], "crop_interp must be one of bicubic, bilinear"),
    ],
)
def test_pretrain_refuses_what_the_simple_crop_cannot_take(image_folder, tmp_path, capsys, flags, message):
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    assert pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_crop_and_flip_draws_the_simple_crops_windows_and_flips(photos):
    """What the GPU loader's workers send for the simple crop (crop_and_flip: the window's place in the padded resize,
    the resized size, the flip) is what the CPU transform draws from the same generator state."""
    import torch.nn.functional as F
    from torchvision.transforms import functional as TF

    from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_and_flip

    tf = pretrain_transform(32, crop="simple")
    flips = set()
    for path in photos:
        with Image.open(path) as im:
            im = im.convert("RGB")
            for seed in range(6):
                torch.manual_seed(seed)
                got = tf(im)
                (top, left, h, w), flip = crop_and_flip(tf, im, torch.Generator().manual_seed(seed))
                small = TF.to_tensor(TF.resize(im, 32, interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
                assert small.shape[1:] == (h, w)
                window = F.pad(small[None], (SIMPLE_CROP_PAD,) * 4, mode="reflect")[
                    0, :, top : top + 32, left : left + 32
                ]
                want = TF.normalize(window.flip(-1) if flip else window, IMAGENET_MEAN, IMAGENET_STD)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
                flips.add(flip)
    assert flips == {False, True}


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_pretrain_hands_the_crop_and_its_filter_to_dali_and_says_a_linear_shrink(image_folder, monkeypatch, capsys):
    """The simple crop reaches DALI's pipeline at --img-size; on CPU threads a bicubic crop is shrunk with the linear
    filter (about 1.2x faster) unless --crop-interp bicubic asks for bicubic, and the banner says which."""
    import inspect

    from fastmim import pretrain
    from fastmim.data import dali
    from tests.conftest import TINY_ARGS

    seen, filters = [], []
    monkeypatch.setattr(dali, "_simple_crop", lambda *a, real=dali._simple_crop: seen.append(a) or real(*a))
    real_pipeline = dali._pipeline

    def spy(*args, **kwargs):
        filters.append(inspect.signature(real_pipeline).bind(*args, **kwargs).arguments["filters"])
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(dali, "_pipeline", spy)
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "dali", "--allow-unscanned", "--max-steps", "1",
            "--vis-interval", "100"]  # fmt: skip
    assert pretrain.main([*args, "--crop", "simple", "--output-dir", str(image_folder.parent / "a")]) == 0
    assert seen and seen[0][2] == 64 and filters[-1] == ("linear", "linear")  # simple: bilinear
    assert pretrain.main([*args, "--output-dir", str(image_folder.parent / "b")]) == 0
    assert filters[-1] == ("linear", "cubic")
    assert "bicubic crops shrunk with the linear filter on CPU threads" in capsys.readouterr().out
    assert pretrain.main([*args, "--crop-interp", "bicubic", "--output-dir", str(image_folder.parent / "c")]) == 0
    assert filters[-1] == ("cubic", "cubic") and "shrunk with the linear filter" not in capsys.readouterr().out


def test_a_crop_min_under_the_simple_crop_is_said_to_be_unused(image_folder, tmp_path, capsys):
    """A recipe config's crop_min (SimMIM's 0.67) with --crop simple: the run goes on and says it is not used."""
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "torch", "--max-steps", "1", "--vis-interval",
            "100", "--crop", "simple", "--crop-min", "0.67", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert pretrain.main(args) == 0
    assert "note: crop_min 0.67 is not used: --crop simple takes the whole short side" in capsys.readouterr().out


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_dali_resizes_a_bilinear_random_resized_crop_linearly_both_ways(photos):
    from fastmim.data.dali import DaliLoader

    def first(**kw):
        ld = DaliLoader(photos, 5, 32, num_threads=1, seed=3, initial_fill=1, interp="cubic", **kw)
        return ld, next(iter(ld))

    cubic, (a, ia) = first()
    linear, (b, ib) = first(crop_interp="bilinear")
    assert cubic.filters == ("cubic", "cubic") and linear.filters == ("linear", "linear")
    # the same draws (the same windows), another filter: close, not equal
    assert torch.equal(ia, ib) and not torch.equal(a, b)
    levels = ((a - b).abs() * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).mean()
    assert 0 < float(levels) < 4


def test_pretrain_builds_the_crop_with_the_filter_asked_for(image_folder):
    from torchvision import transforms as T

    from fastmim.config import PretrainConfig
    from fastmim.pretrain import build_dataset

    def first_step(**kw):
        return build_dataset(PretrainConfig(data_path=str(image_folder), **kw)).transform.transforms[0]

    assert first_step().interpolation == T.InterpolationMode.BICUBIC
    assert first_step(crop_interp="bilinear").interpolation == T.InterpolationMode.BILINEAR
    assert first_step(crop="simple").interpolation == T.InterpolationMode.BILINEAR
    assert first_step(crop="simple", crop_interp="bicubic").interpolation == T.InterpolationMode.BICUBIC
    with pytest.raises(ValueError, match="crop_interp must be one of bicubic, bilinear"):
        PretrainConfig(crop_interp="area").validate()


def test_an_old_run_without_a_crop_setting_resumed_with_one_says_the_change(image_folder, tmp_path, capsys):
    """A run from before --crop (its config has no such key) ran the random-resized crop: --crop simple on resume
    is a change, said and recorded like any other."""
    import json

    import yaml

    from fastmim import pretrain
    from fastmim.train.checkpoint import load_checkpoint
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "torch", "--max-steps", "1", "--vis-interval",
            "100", "--output-dir", str(out)]  # fmt: skip
    assert pretrain.main(args) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    new = ("crop", "crop_interp")  # the settings an older fastmim did not have
    state["config"] = {k: v for k, v in state["config"].items() if k not in new}
    torch.save(state, out / "checkpoint.pt")
    text = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in text.items() if k not in new}))
    capsys.readouterr()
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "2", "--crop", "simple"]) == 0
    assert "changed settings: crop random-resized -> simple" in capsys.readouterr().out
    assert json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])["changed"]["crop"] == [
        "random-resized", "simple"]  # fmt: skip


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_a_dali_run_changes_its_crop_at_an_epoch_end_and_is_told_how_mid_epoch(image_folder, tmp_path, capsys):
    """DALI restores only the pipeline its state came from, and the crop changes the pipeline: mid-epoch the resume
    is refused with the step where the epoch ends; at an epoch's end the new crop starts the next epoch."""
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-path", str(image_folder), "--loader", "dali", "--allow-unscanned", "--vis-interval",
            "100", "--output-dir", str(out)]  # fmt: skip
    assert pretrain.main([*args, "--max-steps", "2"]) == 0  # 24 images / 4: 6 steps an epoch
    capsys.readouterr()
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "8", "--crop", "simple"]) == 2
    err = capsys.readouterr().err
    assert "its DALI state is for --crop random-resized" in err and "--max-steps 6 stops at its end" in err
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "6"]) == 0
    assert pretrain.main(["--resume", "--output-dir", str(out), "--max-steps", "8", "--crop", "simple"]) == 0
    assert "changed settings: crop random-resized -> simple" in capsys.readouterr().out


def test_an_old_runs_missing_settings_compare_as_what_that_run_did():
    """Settings an old run's config lacks ran as their defaults, except --loader (the torch loader before it existed)
    and --compile-mode (torch.compile's default mode): resumed with those, nothing changed; with auto, it did."""
    from fastmim.config import PretrainConfig
    from fastmim.pretrain import _check_resumed_settings

    saved = PretrainConfig().to_dict()
    for k in ("loader", "dali_device", "allow_unscanned", "compile_mode", "crop", "crop_interp"):
        saved.pop(k)
    assert _check_resumed_settings(PretrainConfig(loader="torch", compile_mode="default"), saved) == {}
    changed = _check_resumed_settings(PretrainConfig(crop="simple"), saved)
    assert changed == {"loader": ["torch", "auto"], "crop": ["random-resized", "simple"]}  # no --compile: no mode
    changed = _check_resumed_settings(PretrainConfig(loader="torch", compile=True), {**saved, "compile": True})
    assert changed == {"compile_mode": ["default", "auto"]}


def test_the_gpu_loader_augments_an_extreme_strip_in_the_worker_for_the_simple_crop(tmp_path):
    """The simple crop resizes the whole image on the GPU before cutting: a strip over 32:1 would take gigabytes
    there, so its worker augments it with PIL (the CPU pipeline's pixels); ordinary images, and any image under the
    random-resized crop, go to the GPU as JPEG bytes."""
    from fastmim.data import ImageFolderDataset
    from fastmim.data.gpu_decode import EncodedImages, EncodedSample

    root = tmp_path / "d"
    root.mkdir()
    Image.new("RGB", (400, 10), (200, 40, 40)).save(root / "strip.jpg")
    Image.new("RGB", (60, 40), (40, 200, 40)).save(root / "photo.jpg")
    simple = EncodedImages(ImageFolderDataset(root, pretrain_transform(32, crop="simple"), seed=0))
    rrc = EncodedImages(ImageFolderDataset(root, pretrain_transform(32), seed=0))
    names = [p.rsplit("/", 1)[-1] for p in simple.base.files]
    kinds = {n: (type(simple[i]), type(rrc[i])) for i, n in enumerate(names)}
    assert kinds["photo.jpg"] == (EncodedSample, EncodedSample)
    assert kinds["strip.jpg"][0] is torch.Tensor and kinds["strip.jpg"][1] is EncodedSample
    assert simple[names.index("strip.jpg")].shape == (3, 32, 32)
