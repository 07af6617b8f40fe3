"""The C++ mask strategies (impl="cpp": fastmim._C's block / uniform / multiblock_mask_keys) against the batched torch
ones. The two draw from different random streams, so they are compared in distribution: every statistic below is a
mean over N independent samples, and two implementations agree when no difference of means exceeds Z standard errors
(per position for the frequency maps). Each comparison is also shown to reject a deliberately different setting."""

import functools

import numpy as np
import pytest
import torch

from fastmim import _ext
from fastmim.masking.rng import sample_keys
from fastmim.masking.strategies import build_mask

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastmim._C not built: no C++ mask strategies to test")

N = 2000  # samples per distribution comparison
# Largest allowed |difference of means| / standard error. Per-position maps take the max over up to 288 positions:
# for identical distributions P(max > 4.5) is about 288 * 6.8e-6 = 0.002 (and the draws are fixed by their keys).
Z = 4.5

CONFIGS = [
    ("block", (14, 14), {}),
    ("block", (10, 18), {"ratio": 0.5, "min_aspect": 0.5}),  # not square: a swapped height / width shows
    ("uniform", (14, 14), {}),
    ("uniform", (8, 16), {"secondary_ratio": 0.5}),
    ("multiblock", (14, 14), {}),
    # a quarter of the first contexts keep min_keep tokens or fewer and are redrawn
    (
        "multiblock",
        (10, 18),
        {"target_scale": (0.05, 0.1), "context_scale": (0.3, 1.0), "min_keep": 60, "max_tries": 60},
    ),
]


@functools.cache
def draw(name, grid, impl, params=(), n=N, epoch=1):
    return build_mask(name, grid, impl=impl, seed=7, **dict(params))(indices=torch.arange(n), epoch=epoch)


def max_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """a [Na, ...], b [Nb, ...]: per-sample values -> the largest |mean difference| / standard error over the
    trailing positions (0 where both are constant and equal, huge where they are constant and differ)."""
    a, b = a.double(), b.double()
    se = (a.var(0, correction=0) / a.shape[0] + b.var(0, correction=0) / b.shape[0]).sqrt()
    diff = (a.mean(0) - b.mean(0)).abs()
    return float((diff / se.clamp_min(1e-12)).max())


def neighbour_fraction(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> per sample, the fraction of hidden tokens with a hidden 4-neighbour (blockiness)."""
    p = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    nb = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    return ((nb > 0) & mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def cell_offsets(visible: torch.Tensor) -> torch.Tensor:
    """[B, H, W] one visible token per 2x2 cell -> [B, 4]: per sample, the share of cells showing offset dy*2+dx."""
    b, h, w = visible.shape
    return visible.view(b, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, -1, 4).double().mean(1)


def statistics(name, m):
    """Per-sample values whose means must agree between implementations."""
    if name == "block":
        return {"position": m.mask, "hidden": m.mask.flatten(1).sum(1), "neighbour": neighbour_fraction(m.mask)}
    if name == "uniform":
        return {
            "position": m.mask,
            "secondary_position": m.secondary,
            "offset": cell_offsets(~m.mask),
            "secondary_count": m.secondary.flatten(1).sum(1),
        }
    t = m.targets  # [B, K, H, W]
    rows, cols = t.any(3).sum(2).double(), t.any(2).sum(2).double()  # each target's height and width
    return {
        "position": m.mask,
        "target_position": t.any(1),
        "target_height": rows,
        "target_width": cols,
        "target_log_aspect": (rows / cols).log(),
        "context": (~m.mask).flatten(1).sum(1),
    }


def mismatches(name, a, b) -> dict[str, float]:
    sa, sb = statistics(name, a), statistics(name, b)
    zs = {k: max_z(sa[k], sb[k]) for k in sa}
    return {k: z for k, z in zs.items() if z >= Z}


@pytest.mark.parametrize("name,grid,params", CONFIGS)
def test_cpp_matches_torch_in_distribution(name, grid, params):
    key = tuple(sorted(params.items()))
    cpp, ref = draw(name, grid, "cpp", key), draw(name, grid, "torch", key)
    for f in ("mask", "targets", "secondary"):
        a, b = getattr(cpp, f), getattr(ref, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype == torch.bool, f
    bad = mismatches(name, cpp, ref)
    freq_gap = float((cpp.mask.float().mean(0) - ref.mask.float().mean(0)).abs().max())
    assert not bad, f"{name} {grid} {params}: z >= {Z} for {bad} (max per-position frequency gap {freq_gap:.3f})"


@pytest.mark.parametrize(
    "name,wrong,expect",
    [
        ("block", {"max_num_patches": 20}, {"position", "neighbour"}),  # smaller blocks, the same count
        ("block", {"min_num_patches": 16}, {"position", "neighbour"}),  # larger first blocks
        ("uniform", {"secondary_ratio": 0.5}, {"secondary_position", "secondary_count"}),
        ("multiblock", {"aspect_range": (0.5, 2.0)}, {"target_log_aspect"}),
        ("multiblock", {"target_scale": (0.12, 0.17)}, {"position", "target_height", "target_width"}),
        ("multiblock", {"context_scale": (0.75, 0.9)}, {"position", "context"}),
    ],
)
def test_comparison_rejects_a_different_setting(name, wrong, expect):
    """The distribution test above has power: the torch strategy with one parameter changed fails it."""
    cpp = draw(name, (14, 14), "cpp")
    other = draw(name, (14, 14), "torch", tuple(sorted(wrong.items())))
    bad = mismatches(name, cpp, other)
    assert expect & set(bad), f"{name} with {wrong}: expected a mismatch in {expect}, got z {bad}"


def test_comparison_rejects_flat_and_biased_masks():
    """Spatially flat masks of the block count, and a uniform mask whose visible offset is biased, are told apart."""
    block = draw("block", (14, 14), "cpp")
    flat = draw("random", (14, 14), "torch", (("ratio", 0.4),))
    assert block.mask.flatten(1).sum(1).eq(flat.mask.flatten(1).sum(1)).all()  # same count, different layout
    assert {"position", "neighbour"} <= set(mismatches("block", block, flat))

    uni = draw("uniform", (14, 14), "cpp")
    s = build_mask("uniform", 14)
    g = torch.Generator().manual_seed(0)
    biased = torch.multinomial(torch.tensor([0.28, 0.24, 0.24, 0.24]), N * 49, True, generator=g).view(N, 7, 7)
    fake = s._from_choice(biased, uni.secondary.view(N, 7, 2, 7, 2).any(4).any(2))
    assert "offset" in mismatches("uniform", uni, fake)


# ---------------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((10, 18), 0.75), ((5, 3), 0.9), ((1, 9), 0.5)])
def test_block_exact_count(grid, ratio):
    s = build_mask("block", grid, ratio=ratio, impl="cpp")
    m = s(300).mask
    assert m.shape == (300, *grid) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == s.num_hidden).all()


@pytest.mark.parametrize("grid,secondary_ratio", [((14, 14), 0.25), ((8, 16), 0.5), ((2, 2), 0.0), ((4, 6), 0.99)])
def test_uniform_one_visible_per_cell_and_exact_secondary(grid, secondary_ratio):
    s = build_mask("uniform", grid, secondary_ratio=secondary_ratio, impl="cpp")
    m = s(300)
    h, w = grid
    visible = (~m.mask).view(300, h // 2, 2, w // 2, 2)
    assert (visible.sum((2, 4)) == 1).all()  # exactly one visible token per 2x2 cell
    assert (m.secondary.flatten(1).sum(1) == s.num_secondary).all()
    assert not (m.secondary & m.mask).any()  # secondary tokens are visible ones


def test_uniform_raw_choice():
    keys = np.arange(500, dtype=np.uint64)
    choice, sec = _ext.require().uniform_mask_keys(keys, 3, 5, 4)
    assert choice.dtype == np.uint8 and choice.shape == (500, 3, 5) and choice.max() == 3
    assert sec.dtype == np.bool_ and (sec.sum((1, 2)) == 4).all()
    assert set(np.unique(choice)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "grid,params,overlap",
    [
        ((14, 14), {}, "never"),
        (
            (10, 18),
            {"target_scale": (0.05, 0.1), "context_scale": (0.3, 1.0), "min_keep": 60, "max_tries": 60},
            "never",
        ),
        # a target covering the grid: the context keeps a token only by giving up its exclusion (it was empty)
        ((6, 6), {"num_targets": 1, "target_scale": (1.0, 1.0), "aspect_range": (1.0, 1.0), "min_keep": 0}, "always"),
        ((1, 1), {"min_keep": 0}, "always"),
        # (a 3-row grid keeping more than I-JEPA's 10: a constraint is given up at times; the default, 60 / 8, not)
        ((3, 20), {"aspect_range": (0.1, 10.0), "min_keep": 10}, "sometimes"),
        ((3, 20), {"aspect_range": (0.1, 10.0)}, "never"),
    ],
)
def test_multiblock_invariants(grid, params, overlap):
    s = build_mask("multiblock", grid, impl="cpp", **params)
    m = s(300)
    h, w = grid
    t, ctx = m.targets, ~m.mask
    assert t.shape == (300, s.num_targets, h, w) and ctx.shape == (300, h, w)
    # every target is one non-empty rectangle inside the grid: its token count is its bounding box's area
    rows, cols = t.any(3).sum(2), t.any(2).sum(2)
    assert (rows >= 1).all() and (cols >= 1).all()
    assert (t.flatten(2).sum(2) == rows * cols).all()
    overlaps = (ctx & t.any(1)).flatten(1).any(1)  # a context keeping a target token gave up an exclusion
    assert {"never": not overlaps.any(), "always": overlaps.all(), "sometimes": 0 < overlaps.sum() < 300}[overlap]
    assert (ctx.flatten(1).sum(1) > s.min_keep).all()  # more than min_keep, as I-JEPA's (min_keep 0: one)


def test_multiblock_context_fails_like_torch():
    """A context block that can never keep more than min_keep tokens, even with no target excluded: RuntimeError naming
    min_keep, as in Python."""
    params = dict(
        num_targets=1,
        target_scale=(1.0, 1.0),
        aspect_range=(1.0, 1.0),
        context_scale=(0.05, 0.5),
        min_keep=10,
        max_tries=2,
    )
    with pytest.raises(RuntimeError, match="kept more than min_keep=10 tokens, even without excluding the targets"):
        build_mask("multiblock", 6, impl="torch", **params)(indices=torch.arange(64))
    with pytest.raises(RuntimeError, match="kept more than min_keep=10 tokens, even without excluding the targets"):
        build_mask("multiblock", 6, impl="cpp", **params)(indices=torch.arange(64))


# --------------------------------------------------------------------------------------- determinism and threads


@pytest.mark.parametrize("name", ["block", "uniform", "multiblock"])
def test_masks_are_a_function_of_seed_epoch_index(name):
    idx = torch.tensor([3, 7, 11, 2**40])

    def run(seed=7, epoch=2, indices=idx):
        m = build_mask(name, 14, seed=seed, impl="cpp")(indices=indices, epoch=epoch)
        return torch.cat([t.flatten(1) for t in (m.mask, m.targets, m.secondary) if t is not None], 1)

    first = run()
    assert torch.equal(first, run())
    assert not torch.equal(first, run(epoch=3))
    assert not torch.equal(first, run(seed=8))
    assert torch.equal(first[1:2], run(indices=idx[1:2]))  # a sample's mask does not depend on its batch
    assert len({tuple(r.tolist()) for r in first}) == 4  # samples differ


def _raw_calls(keys):
    C = _ext.require()
    return {
        "block": lambda nt: (C.block_mask_keys(keys, 14, 14, 78, 4.0, 78.0, 0.3, 1 / 0.3, 10, num_threads=nt),),
        "uniform": lambda nt: C.uniform_mask_keys(keys, 7, 7, 12, num_threads=nt),
        "multiblock": lambda nt: C.multiblock_mask_keys(
            keys, 14, 14, 4, 0.15, 0.2, 0.75, 1.5, 0.85, 1.0, 10, 20, num_threads=nt
        ),
        "block_seeded": lambda nt: (
            C.block_mask(len(keys), 14, 14, 78, 4.0, 78.0, 0.3, 1 / 0.3, 10, 5, num_threads=nt),
        ),
    }


@pytest.mark.parametrize("name", ["block", "uniform", "multiblock", "block_seeded"])
def test_result_does_not_depend_on_thread_count(name):
    keys = sample_keys(7, 0, torch.arange(257)).numpy().astype(np.uint64)  # 257: an uneven split over threads
    call = _raw_calls(keys)[name]
    one = call(1)
    for nt in (2, 3, 0):  # 0: OpenMP's default
        for a, b in zip(one, call(nt), strict=True):
            assert np.array_equal(a, b), (name, nt)


@pytest.mark.parametrize("name", ["block", "uniform", "multiblock"])
def test_strategy_masks_do_not_depend_on_torch_threads(name):
    """Through the strategy (num_threads=0): torch.set_num_threads reaches the extension when both share torch's
    OpenMP runtime (one libgomp.so.1 in the process, as on Linux wheels); the masks stay the same either way."""
    s = build_mask(name, 14, impl="cpp")
    idx = torch.arange(257)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            m = s(indices=idx, epoch=4)
            outs.append([t for t in (m.mask, m.targets, m.secondary) if t is not None])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_strategy_calls_the_raw_functions_with_the_sample_keys():
    """impl="cpp" is the raw function on sample_keys(seed, epoch, indices); any integer key dtype works."""
    idx = torch.arange(40)
    keys = sample_keys(7, 1, idx).numpy()
    m = build_mask("uniform", 14, seed=7, impl="cpp")(indices=idx, epoch=1)
    choice, sec = _ext.require().uniform_mask_keys(keys, 7, 7, 13)  # int64 keys, converted; UM-MAE's 13 of 49
    vis = torch.nn.functional.one_hot(torch.from_numpy(choice).long(), 4).bool().view(40, 7, 7, 2, 2)
    assert torch.equal(~m.mask, vis.permute(0, 1, 3, 2, 4).reshape(40, 14, 14))
    assert torch.equal(m.secondary.view(40, 7, 2, 7, 2).any(4).any(2), torch.from_numpy(sec))


def test_empty_batch_and_edge_counts():
    C = _ext.require()
    empty = np.zeros(0, dtype=np.uint64)
    assert C.block_mask_keys(empty, 4, 5, 3, 4.0, 4.0, 0.3, 3.3, 10).shape == (0, 4, 5)
    c, s = C.uniform_mask_keys(empty, 2, 3, 1)
    assert c.shape == s.shape == (0, 2, 3)
    c, t = C.multiblock_mask_keys(empty, 4, 5, 3, 0.1, 0.2, 0.5, 2.0, 0.5, 1.0, 0, 5)
    assert c.shape == (0, 4, 5) and t.shape == (0, 3, 4, 5)
    keys = np.arange(6, dtype=np.uint64)
    assert C.block_mask_keys(keys, 4, 5, 20, 4.0, 20.0, 0.3, 3.3, 10).all()
    assert not C.block_mask_keys(keys, 4, 5, 0, 4.0, 4.0, 0.3, 3.3, 10).any()
    assert C.uniform_mask_keys(keys, 2, 3, 6)[1].all() and not C.uniform_mask_keys(keys, 2, 3, 0)[1].any()


# ------------------------------------------------------------------------------------------------ bad arguments

K2 = np.arange(2, dtype=np.uint64)
BLOCK = (K2, 4, 4, 2, 4.0, 8.0, 0.3, 3.3, 10)
UNIFORM = (K2, 2, 2, 1)
MULTI = (K2, 6, 6, 2, 0.15, 0.2, 0.75, 1.5, 0.85, 1.0, 4, 20)


def _with(base, i, v):
    return base[:i] + (v,) + base[i + 1 :]


@pytest.mark.parametrize(
    "fn,args,msg",
    [
        ("block_mask_keys", _with(BLOCK, 0, np.zeros((2, 2), np.uint64)), "1-D"),
        ("block_mask_keys", _with(BLOCK, 0, np.zeros(2, np.float64)), "integer"),
        ("block_mask_keys", _with(BLOCK, 0, np.array(3, np.uint64)), "1-D"),
        ("block_mask_keys", _with(BLOCK, 1, 0), "height and width must be >= 1"),
        ("block_mask_keys", _with(BLOCK, 2, -3), "height and width must be >= 1"),
        ("block_mask_keys", _with(BLOCK, 1, 2**20), "<= 32768"),
        ("block_mask_keys", _with(BLOCK, 3, 17), r"num_masked=17 is outside \[0, 16\]"),
        ("block_mask_keys", _with(BLOCK, 3, -1), "num_masked=-1"),
        ("block_mask_keys", _with(BLOCK, 4, float("nan")), "min_num_patches"),
        ("block_mask_keys", _with(BLOCK, 5, 2.0), "max_num_patches"),
        ("block_mask_keys", _with(BLOCK, 6, 0.0), "min_aspect"),
        ("block_mask_keys", _with(BLOCK, 7, float("inf")), "max_aspect"),
        ("block_mask_keys", _with(BLOCK, 8, 0), "max_attempts"),
        ("uniform_mask_keys", _with(UNIFORM, 0, np.zeros((1, 2), np.int64)), "1-D"),
        ("uniform_mask_keys", _with(UNIFORM, 1, 0), "cells_h and cells_w must be >= 1"),
        ("uniform_mask_keys", _with(UNIFORM, 2, -1), "cells_h and cells_w must be >= 1"),
        ("uniform_mask_keys", _with(UNIFORM, 2, 2**20), "<= 32768"),
        ("uniform_mask_keys", _with(UNIFORM, 3, 5), r"num_secondary=5 is outside \[0, 4\]"),
        ("uniform_mask_keys", _with(UNIFORM, 3, -1), "num_secondary=-1"),
        ("multiblock_mask_keys", _with(MULTI, 0, np.array(["a", "b"])), "integer"),
        ("multiblock_mask_keys", _with(MULTI, 1, 0), "height and width must be >= 1"),
        ("multiblock_mask_keys", _with(MULTI, 2, 2**16), "<= 32768"),
        ("multiblock_mask_keys", _with(MULTI, 3, 0), "num_targets must be >= 1"),
        ("multiblock_mask_keys", _with(MULTI, 4, 0.0), r"target_scale.*\(0, 1\]"),
        ("multiblock_mask_keys", _with(MULTI, 5, 1.5), r"target_scale.*\(0, 1\]"),
        ("multiblock_mask_keys", _with(MULTI, 4, float("nan")), r"target_scale.*\(0, 1\]"),
        ("multiblock_mask_keys", _with(MULTI, 4, 0.3), "target_scale_min must be <= target_scale_max"),
        ("multiblock_mask_keys", _with(MULTI, 6, 0.0), "aspect_min and aspect_max must be finite numbers > 0"),
        ("multiblock_mask_keys", _with(MULTI, 7, float("inf")), "aspect_min and aspect_max must be finite"),
        ("multiblock_mask_keys", _with(MULTI, 6, 2.0), "aspect_min must be <= aspect_max"),
        ("multiblock_mask_keys", _with(MULTI, 8, -0.5), r"context_scale.*\(0, 1\]"),
        ("multiblock_mask_keys", _with(MULTI, 9, 1.01), r"context_scale.*\(0, 1\]"),
        ("multiblock_mask_keys", _with(_with(MULTI, 8, 0.95), 9, 0.9), "context_scale_min must be <="),
        ("multiblock_mask_keys", _with(MULTI, 10, 36), r"min_keep=36 is outside \[0, 35\]"),
        ("multiblock_mask_keys", _with(MULTI, 10, -1), "min_keep=-1"),
        ("multiblock_mask_keys", _with(MULTI, 11, 0), "max_tries must be >= 1"),
        ("multiblock_mask_keys", _with(_with(_with(MULTI, 1, 2**15), 2, 2**15), 3, 2**40), "too large"),
    ],
)
def test_native_functions_validate_their_arguments(fn, args, msg):
    """Called directly, past the strategies, bad arguments raise ValueError instead of crashing."""
    with pytest.raises(ValueError, match=msg):
        getattr(_ext.require(), fn)(*args)


@pytest.mark.parametrize(
    "fn,args", [("block_mask_keys", BLOCK), ("uniform_mask_keys", UNIFORM), ("multiblock_mask_keys", MULTI)]
)
@pytest.mark.parametrize("nt", [-1, 10**6])
def test_native_functions_validate_num_threads(fn, args, nt):
    with pytest.raises(ValueError, match="num_threads"):
        getattr(_ext.require(), fn)(*args, num_threads=nt)
