"""python -m fastmim.masking.show: a PNG of masks over a photo for every strategy."""

import numpy as np
import pytest
from PIL import Image

from fastmim import _ext
from fastmim.masking import show
from fastmim.masking.strategies import STRATEGIES, build_mask

GRID, NUM = 8, 3
# small enough for every strategy on an 8x8 grid; tube: 3 frames
EXTRA = {"tube": ["--param", "frames=3"]}


def args_for(strategy: str, out, *more: str) -> list[str]:
    return ["--strategy", strategy, "--grid", str(GRID), "--num", str(NUM), "--out", str(out),
            *EXTRA.get(strategy, []), *more]  # fmt: skip


def expected_masks(strategy: str, image: np.ndarray, **params):
    """What show draws: samples 0..NUM-1 of the torch implementation at seed 0."""
    if strategy == "tube":
        params.setdefault("frames", 3)
    s = build_mask(strategy, GRID, seed=0, impl="torch", **params)
    inputs = {k: show.demo_scores(image, (GRID, GRID)).expand(NUM, -1) for k in s.inputs}
    return s(NUM, **inputs)


def tile(png: np.ndarray, row: int, col: int) -> np.ndarray:
    t = GRID * show.PX
    y, x = show.GAP + row * (t + show.GAP), show.GAP + col * (t + show.GAP)
    return png[y : y + t, x : x + t].astype(np.float64)


def token_means(img: np.ndarray) -> np.ndarray:
    """[H*PX, W*PX, 3] -> [H, W] mean over each token's pixels and channels (sums of pixels, for ratios)."""
    return img.reshape(GRID, show.PX, GRID, show.PX, 3).mean(axis=(1, 3, 4))


def token_centres(img: np.ndarray) -> np.ndarray:
    """[H, W, 3]: each token's centre pixel (away from the target blocks' outlines)."""
    c = show.PX // 2
    return img[c :: show.PX, c :: show.PX]


def layout(strategy: str) -> tuple[int, int]:
    """(rows, cols) of tiles show draws for NUM masks."""
    return (NUM, 3) if strategy == "tube" else (1, NUM)


def frames(strategy: str, masks, sample: int) -> list:
    m = masks.mask[sample]
    return list(m) if strategy == "tube" else [m]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_draws_its_masks_over_the_default_photo(strategy, tmp_path, capsys):
    pytest.importorskip("skimage")
    out = tmp_path / f"{strategy}.png"
    assert show.main(args_for(strategy, out)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    png = np.asarray(Image.open(out).convert("RGB"))
    rows, cols = layout(strategy)
    assert Image.open(out).size == show.canvas_size((GRID * show.PX, GRID * show.PX), rows, cols)
    orig = show.load_image(None, (GRID * show.PX, GRID * show.PX)).astype(np.float64)
    masks = expected_masks(strategy, orig.astype(np.uint8))
    darkened = 0
    for sample in range(NUM):
        for t, m in enumerate(frames(strategy, masks, sample)):
            r, c = (sample, t) if strategy == "tube" else divmod(sample, cols)
            drawn, base = token_means(tile(png, r, c)), token_means(orig)
            m = m.numpy()
            special = np.zeros_like(m)
            if masks.targets is not None:
                special |= masks.targets[sample].any(0).numpy()
            if masks.secondary is not None:
                special |= masks.secondary[sample].numpy()
            hidden, visible = m & ~special, ~m & ~special
            # hidden tokens keep HIDDEN_GAIN of their brightness; plain visible ones all of it
            darkened += int(hidden.sum())
            if hidden.any():  # multiblock: the context can cover every non-target token
                assert drawn[hidden].sum() / base[hidden].sum() == pytest.approx(show.HIDDEN_GAIN, abs=0.02)
            if visible.any() and masks.targets is None:
                assert drawn[visible].sum() / base[visible].sum() == pytest.approx(1.0, abs=0.01)
            if masks.targets is not None:  # the context (tinted, visible) and the targets are not darkened
                assert (drawn[~m] / base[~m]).mean() > 0.7
    assert darkened > 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_dark_tokens_are_exactly_the_hidden_ones_on_a_flat_image(strategy, tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("RGB", (50, 40), (160, 160, 160)).save(grey)
    out = tmp_path / "m.png"
    assert show.main(args_for(strategy, out, "--image", str(grey), "--cols", "2")) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    flat = np.full((GRID * show.PX, GRID * show.PX, 3), 160, np.uint8)
    masks = expected_masks(strategy, flat)
    cols = 3 if strategy == "tube" else 2
    assert Image.open(out).size == show.canvas_size((GRID * show.PX,) * 2, NUM if strategy == "tube" else 2, cols)
    for sample in range(NUM):
        for t, m in enumerate(frames(strategy, masks, sample)):
            r, c = (sample, t) if strategy == "tube" else divmod(sample, cols)
            centres = token_centres(tile(png, r, c))
            dark = centres.mean(-1) < 100  # hidden: 160 * 0.3 = 48; visible 160; tinted tokens brighter than 100
            expect = m.numpy()
            if masks.targets is not None:
                expect = expect & ~masks.targets[sample].any(0).numpy()
            np.testing.assert_array_equal(dark, expect, err_msg=f"{strategy} sample {sample} frame {t}")
            if masks.secondary is not None:  # secondary tokens are orange: red well above blue
                sec = masks.secondary[sample].numpy()
                assert sec.any() and (centres[sec][:, 0] - centres[sec][:, 2] > 80).all()
                assert (np.abs(centres[~expect & ~sec] - 160) <= 1).all()
            if masks.targets is not None:  # each target block in its own colour
                for k in range(masks.targets.shape[1]):
                    only_k = masks.targets[sample, k].numpy() & (masks.targets[sample].sum(0) == 1).numpy()
                    colour = 0.5 * 160 + 0.5 * np.asarray(show.TARGETS[k])
                    assert (np.abs(centres[only_k] - colour) <= 1.5).all()


def test_ratio_goes_to_the_strategy(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (200, 200, 200)).save(grey)
    out = tmp_path / "r.png"
    assert show.main(["--strategy", "random", "--ratio", "0.25", "--grid", "4", "--num", "1", "--image", str(grey),
                      "--out", str(out)]) == 0  # fmt: skip
    centres = np.asarray(Image.open(out).convert("RGB"))[show.GAP + 8 :: 16, show.GAP + 8 :: 16][:4, :4]
    assert int((centres.mean(-1) < 100).sum()) == 4  # 16 - int(16 * 0.75) hidden


def test_demo_score_is_high_where_the_image_is_textured():
    rng = np.random.default_rng(0)
    img = np.full((32, 64, 3), 120, np.uint8)
    img[:, 32:] = rng.integers(0, 255, (32, 32, 3))  # right half textured
    scores = show.demo_scores(img, (2, 4)).view(2, 4)
    assert (scores[:, :2] < 1e-12).all() and (scores[:, 2:] > 0.01).all()
    m = build_mask("attention", (2, 4), ratio=0.5, impl="torch")(1, scores=scores.view(1, 8)).mask[0]
    assert m[:, 2:].all() and not m[:, :2].any()  # attention hides the highest-scoring (textured) tokens


def test_params_are_python_literals(tmp_path):
    out = tmp_path / "mb.png"
    args = ["--strategy", "multiblock", "--grid", "8", "--num", "2", "--param", "num_targets=2", "--param",
            "target_scale=(0.1, 0.15)", "--out", str(out), "--image", str(tmp_path / "g.png")]  # fmt: skip
    Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / "g.png")
    assert show.main(args) == 0 and out.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "blocky"], "unknown strategy 'blocky'; choose from random, block, simmim, uniform"),
        (["--strategy", "uniform", "--ratio", "0.5"], "uniform strategy has no ratio parameter"),
        (["--strategy", "multiblock", "--ratio", "0.5"], "--param KEY=VALUE"),
        (["--strategy", "block", "--ratio", "1.5"], "ratio must be in (0, 1)"),
        (["--strategy", "block", "--param", "ratio"], "expected KEY=VALUE"),
        (["--strategy", "block", "--param", "min_patches=3"], "min_patches"),
        (["--strategy", "block", "--ratio", "0.5", "--param", "ratio=0.4"], "both given"),
        (["--strategy", "block", "--param", "seed=3"], "use --seed"),
        (["--strategy", "uniform", "--grid", "7"], "even token grid"),
        (["--strategy", "block", "--grid", "0"], "--grid"),
        (["--strategy", "block", "--num", "0"], "--num must be at least 1"),
        (["--strategy", "random", "--impl", "cpp"], "no C++ implementation"),
        (["--strategy", "block", "--image", "/nonexistent/cat.jpg"], "does not exist"),
        (["--ratio", "0.4"], "--strategy"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        show.main([*args, "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_bad_output_path_exits_with_a_message(tmp_path, capsys):
    """A folder, a name without an image extension or a folder that cannot be made: one line, not PIL's traceback."""
    for out, message in ((tmp_path, "name an image file"), (tmp_path / "noext", "name an image file"),
                         (tmp_path / "file.png" / "x.png", "cannot write it")):  # fmt: skip
        if out.name == "x.png":
            (tmp_path / "file.png").write_text("a file, not a folder")
        with pytest.raises(SystemExit) as e:
            show.main(["--strategy", "block", "--grid", "4", "--num", "1", "--out", str(out)])
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not _ext.available(), reason="fastmim._C not built")
@pytest.mark.parametrize("strategy", ["block", "uniform", "multiblock"])
def test_cpp_impl_draws_with_a_cpp_generator(strategy, tmp_path):
    """impl=cpp for a strategy with a C++ generator: the PNG, nothing else."""
    out = tmp_path / f"{strategy}.png"
    rc = show.main(["--strategy", strategy, "--impl", "cpp", "--grid", "8", "--num", "2", "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert Image.open(out).size[0] > 0


def test_cpp_impl_without_a_cpp_generator_says_why(tmp_path, capsys):
    """impl=cpp for a strategy without one (random): a clean argument error saying so, and no file."""
    out = tmp_path / "random.png"
    with pytest.raises(SystemExit) as e:
        show.main(["--strategy", "random", "--impl", "cpp", "--grid", "8", "--num", "2", "--out", str(out)])
    assert e.value.code == 2 and "'random' has no C++ implementation" in capsys.readouterr().err
    assert not out.exists()


def test_runs_as_a_module(tmp_path):
    from tests.conftest import run_cli

    grey = tmp_path / "g.png"
    Image.new("RGB", (16, 16), (90, 90, 90)).save(grey)
    out = tmp_path / "sub" / "block.png"
    proc = run_cli(["--strategy", "block", "--ratio", "0.4", "--grid", "6", "--num", "2", "--image", str(grey),
                    "--out", str(out)], module=["-m", "fastmim.masking.show"], timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.is_file()
    assert Image.open(out).size == show.canvas_size((6 * show.PX, 6 * show.PX), 1, 2)
