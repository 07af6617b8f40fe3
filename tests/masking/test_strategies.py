"""Every mask strategy, batched PyTorch and readable reference: invariants, distributions, determinism, errors."""

from __future__ import annotations

import os

import pytest
import torch

from fastmim import _ext
from fastmim.masking.strategies import STRATEGIES, build_mask, exact_hidden
from fastmim.ops._dispatch import triton_available

IMPLS = ["torch", "ref"]
INPUTS = {"attention": "scores", "hardpatch": "losses"}


def draw(name, impl, batch=64, grid=14, seed=0, epoch=0, indices=None, **params):
    s = build_mask(name, grid, impl=impl, seed=seed, **params)
    inputs = {}
    if name in INPUTS:
        g = torch.Generator().manual_seed(7)
        inputs[INPUTS[name]] = torch.rand(batch if indices is None else len(indices), s.num_tokens, generator=g)
    return s, s(None if indices is not None else batch, indices=indices, epoch=epoch, **inputs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("multiblock", "tube")])
def test_exact_hidden_count_and_shape(name, impl):
    s, m = draw(name, impl)
    assert m.mask.dtype == torch.bool and m.mask.shape == (64, 14, 14)
    counts = m.mask.flatten(1).sum(1)
    expected = {"simmim": s.num_hidden_cells * s.scale**2 if name == "simmim" else None,
                "uniform": 196 * 3 // 4}.get(name) or exact_hidden(196, s.ratio)  # fmt: skip
    assert (counts == expected).all(), (name, counts.unique())
    assert m.num_hidden == expected  # what info() trusts without a host sync
    info = m.info()  # the same count everywhere: MAE's index form works
    assert info.ids_keep.shape == (64, 196 - expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_simmim_hides_whole_mask_patches(impl):
    s, m = draw("simmim", impl, grid=(12, 8), ratio=0.5, mask_patch_size=64, patch_size=16)  # 4x4-token cells
    cells = m.mask.view(64, 3, 4, 2, 4).permute(0, 1, 3, 2, 4).flatten(3)  # [B, 3, 2, 16]
    assert ((cells.all(-1)) | (~cells.any(-1))).all()  # each cell wholly hidden or wholly visible
    assert (cells.all(-1).flatten(1).sum(1) == 3).all()  # ceil(0.5 * 6)


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_keeps_one_token_per_cell_and_secondary_is_a_subset(impl):
    s, m = draw("uniform", impl, grid=(6, 10), secondary_ratio=0.4)
    visible = (~m.mask).view(64, 3, 2, 5, 2).permute(0, 1, 3, 2, 4).flatten(3)  # [B, 3, 5, 4]
    assert (visible.sum(-1) == 1).all()
    assert not (m.secondary & m.mask).any()
    assert (m.secondary.flatten(1).sum(1) == 15 - int(15 * 0.6)).all()  # UM-MAE's count: 6 of 15


@pytest.mark.parametrize("impl", IMPLS)
def test_tube_is_constant_over_time(impl):
    s, m = draw("tube", impl, grid=(7, 9), frames=5, ratio=0.9)
    assert m.mask.shape == (64, 5, 7, 9) and m.num_hidden == 5 * exact_hidden(63, 0.9)
    assert (m.mask == m.mask[:, :1]).all()
    assert (m.mask[:, 0].flatten(1).sum(1) == exact_hidden(63, 0.9)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_multiblock_targets_are_blocks_and_disjoint_from_the_context(impl):
    s, m = draw("multiblock", impl, batch=48, num_targets=3, min_keep=12)
    assert m.targets.shape == (48, 3, 14, 14) and m.mask.shape == (48, 14, 14) and m.num_hidden is None
    context = ~m.mask
    assert not (context & m.targets.any(1)).any()
    assert (context.flatten(1).sum(1) > 12).all()
    for block in m.targets.flatten(0, 1):  # each target is one filled rectangle within the scale range
        ys, xs = block.nonzero(as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert block.sum() == h * w
        assert 0.5 * 0.15 * 196 <= h * w <= 2.0 * 0.2 * 196


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_hides_the_top_scores(impl):
    scores = torch.rand(16, 49, generator=torch.Generator().manual_seed(3))
    s = build_mask("attention", 7, impl=impl, ratio=0.5)
    m = s(indices=torch.arange(16), scores=scores).mask.flatten(1)
    k = exact_hidden(49, 0.5)
    top = torch.zeros_like(m).scatter_(1, scores.topk(k, dim=1).indices, True)
    assert torch.equal(m, top)
    # with a random share, the loss-driven part is still the top of the scores
    s = build_mask("attention", 7, impl=impl, ratio=0.5, random_share=0.4)
    m = s(indices=torch.arange(16), scores=scores).mask.flatten(1)
    n_top = k - round(0.4 * k)
    assert (m.sum(1) == k).all()
    assert m.gather(1, scores.topk(n_top, dim=1).indices).all()
    assert not torch.equal(m, top)


@pytest.mark.parametrize("impl", IMPLS)
def test_hardpatch_draws_in_proportion_to_the_loss(impl):
    n = 3000 if impl == "torch" else 1500
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]]).expand(n, 5)
    s = build_mask("hardpatch", (1, 5), impl=impl, ratio=0.2)  # one hidden token of five
    m = s(indices=torch.arange(n), losses=losses).mask.view(n, 5).float()
    freq = m.mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]), atol=0.035, rtol=0)
    # zero-loss tokens come only after every positive one
    s = build_mask("hardpatch", (1, 5), impl=impl, ratio=0.8)
    m = s(indices=torch.arange(50), losses=losses[:50]).mask.view(50, 5)
    assert m[:, :4].all() and not m[:, 4].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_random_positions_are_uniform(impl):
    s, m = draw("random", impl, batch=2000 if impl == "torch" else 600, grid=8, ratio=0.75)
    freq = m.mask.float().mean(0)
    tol = 5 * (0.75 * 0.25 / m.mask.shape[0]) ** 0.5
    assert (freq - 0.75).abs().max() < tol


def test_block_torch_and_reference_agree_in_distribution():
    """Per-position hidden frequency of the batched block masks against the per-sample reference."""
    _, a = draw("block", "torch", batch=1500, grid=10, ratio=0.4)
    _, b = draw("block", "ref", batch=1500, grid=10, ratio=0.4)
    fa, fb = a.mask.float().mean(0), b.mask.float().mean(0)
    assert (fa - fb).abs().max() < 0.08
    assert fa[4:6, 4:6].mean() > fa[0, 0]  # blocks cover the centre more often than the corners: shape, not noise
    # a different block shape is told apart by the same statistic (the test can fail)
    _, c = draw("block", "torch", batch=1500, grid=10, ratio=0.4, min_num_patches=16, min_aspect=0.9)
    pa = a.mask.view(1500, -1).float()
    pc = c.mask.view(1500, -1).float()
    row_runs = lambda p: (p.view(-1, 10, 10)[:, :, 1:] & p.view(-1, 10, 10)[:, :, :-1].bool()).float().mean()  # noqa: E731
    assert abs(float(row_runs(pa.bool())) - float(row_runs(pc.bool()))) > 0.01


@pytest.mark.skipif(triton_available() is not None, reason=f"optional dependency absent: {triton_available()}")
@pytest.mark.parametrize("grid, ratio", [(14, 0.4), ((5, 9), 0.75)])
def test_block_triton_kernel_gives_the_torch_loops_masks(grid, ratio, monkeypatch):
    """The one-launch Triton block kernel (interpreted on CPU here) consumes the same random numbers with the same
    float64 maths as the batched PyTorch loop: the same masks, sample for sample (on CUDA in tests/test_gpu.py)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET=1 is not set, so Triton cannot run CPU tensors")
    idx = torch.tensor([0, 1, 2, 3, 17, 400, 2**33 + 5, 9_999_999])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = build_mask("block", grid, impl="torch", ratio=ratio, seed=11)(indices=idx, epoch=4, device=dev)
    b = build_mask("block", grid, impl="triton", ratio=ratio, seed=11)(indices=idx, epoch=4, device=dev)
    assert torch.equal(a.mask, b.mask)
    assert (b.mask.flatten(1).sum(1) == a.num_hidden).all()
    # and it is not the key-independent answer: other samples, other masks
    assert len({tuple(m.flatten().tolist()) for m in b.mask}) == len(idx)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_masks_are_a_pure_function_of_seed_epoch_and_index(name):
    """One call for samples 0..31 equals two calls of 16 (workers), and a permuted call (a reshuffled shard); a
    different epoch or seed changes them."""
    idx = torch.arange(100, 132)
    _, whole = draw(name, "torch", indices=idx, epoch=3)
    _, first = draw(name, "torch", indices=idx[:16], epoch=3)
    _, second = draw(name, "torch", indices=idx[16:], epoch=3)
    if name in INPUTS:  # the inputs are per batch: give each part its rows of the same scores
        g = torch.Generator().manual_seed(7)
        full = torch.rand(32, 196, generator=g)
        s = build_mask(name, 14, impl="torch")
        whole = s(indices=idx, epoch=3, **{INPUTS[name]: full})
        first = s(indices=idx[:16], epoch=3, **{INPUTS[name]: full[:16]})
        second = s(indices=idx[16:], epoch=3, **{INPUTS[name]: full[16:]})
    assert torch.equal(torch.cat([first.mask, second.mask]), whole.mask)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    if name not in INPUTS:
        _, shuffled = draw(name, "torch", indices=idx[perm], epoch=3)
        assert torch.equal(shuffled.mask, whole.mask[perm])
        _, other_epoch = draw(name, "torch", indices=idx, epoch=4)
        _, other_seed = draw(name, "torch", indices=idx, epoch=3, seed=1)
        assert not torch.equal(other_epoch.mask, whole.mask) and not torch.equal(other_seed.mask, whole.mask)
    _, again = draw(name, "ref", indices=idx[:4], epoch=3)
    _, again2 = draw(name, "ref", indices=idx[:4], epoch=3)
    assert torch.equal(again.mask, again2.mask)


def _fairseq_inverse_block(batch: int, grid: int, ratio: float, block: int, adjust: float, g: torch.Generator):
    """fairseq's compute_block_mask_2d(inverse_mask=True, require_same_masks=True), written out again: the visible
    squares around int(L * (keep + adjust) / block^2) centres (randint, clamped), trimmed or topped up by multinomial
    draws to int(L * keep) visible; True = hidden."""
    n = grid * grid
    keep = 1 - ratio
    kept = torch.zeros(batch, grid, grid)
    centres = torch.randint(0, n, (batch, int(n * ((keep + adjust) / block**2))), generator=g)
    kept.view(batch, -1).scatter_(1, centres, 1)
    b, r, c = kept.nonzero(as_tuple=True)
    off = block // 2
    for i in range(block):
        for j in range(block):
            kept[b, (r + i - off).clamp(0, grid - 1), (c + j - off).clamp(0, grid - 1)] = 1
    kept = kept.view(batch, -1)
    target = int(n * keep)
    for m in kept:
        k = int(m.sum())
        if k > target:
            m[torch.multinomial(m, k - target, generator=g)] = 0
        elif k < target:
            m[torch.multinomial(1 - m, target - k, generator=g)] = 1
    return (1 - kept).bool().view(batch, grid, grid)


def _visible_neighbours(mask: torch.Tensor) -> float:
    """Mean number of visible 4-neighbours of a visible token: how square-shaped the visible region is."""
    v = (~mask).float().unsqueeze(1)
    cross = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]])
    return float((torch.nn.functional.conv2d(v, cross, padding=1) * v).sum() / v.sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_inverse_block_matches_data2vec2s_generator_in_distribution(impl):
    """ViT-B/16's data2vec 2.0 masks: 39 visible of 196 in every sample (157 hidden), squares as in fairseq's."""
    s, m = draw("inverse_block", impl, batch=1500)
    assert s.num_centres == 5 and s.num_visible == 39
    assert ((~m.mask).flatten(1).sum(1) == 39).all()
    want = _fairseq_inverse_block(1500, 14, 0.8, 3, 0.07, torch.Generator().manual_seed(0))
    assert ((~want).flatten(1).sum(1) == 39).all()
    ours, theirs = _visible_neighbours(m.mask), _visible_neighbours(want)
    assert ours == pytest.approx(theirs, rel=0.03), (ours, theirs)
    uniform_visible = _visible_neighbours(torch.rand(1500, 14, 14, generator=torch.Generator().manual_seed(1)) > 0.2)
    assert ours > 2 * uniform_visible  # squares, not scattered tokens


def test_multiblock_batch_shared_is_ijepas_collator():
    """One target and one context size per batch (I-JEPA: targets about 33 tokens on 14x14, a context of about 82
    before the truncation to the batch's smallest), equal counts in every sample, num_hidden per call, targets never
    in the context while the constraint holds, the same masks for every impl and for the same batch."""
    s = build_mask("multiblock", 14, batch_shared=True, impl="torch")
    target_sizes, kept = [], []
    for e in range(12):
        idx = torch.arange(64) + 1000 * e
        m = s(indices=idx, epoch=2)
        ctx, tgt = ~m.mask.flatten(1), m.targets.flatten(2)  # [B, N], [B, K, N]
        assert (ctx.sum(1) == ctx.sum(1)[0]).all() and m.num_hidden == 196 - int(ctx.sum(1)[0])
        assert (tgt.sum(2) == tgt.sum(2)[0, 0]).all()  # one block size for the batch
        assert not (ctx & tgt.any(1)).any()
        target_sizes.append(float(tgt.sum(2).float().mean()))
        kept.append(int(ctx.sum(1)[0]))
        if e == 0:
            for impl in ("ref", "cpp"):
                other = build_mask("multiblock", 14, batch_shared=True, impl=impl)(indices=idx, epoch=2)
                assert torch.equal(other.mask, m.mask) and torch.equal(other.targets, m.targets)
            again = s(indices=idx, epoch=2)
            assert torch.equal(again.mask, m.mask) and again.num_hidden == m.num_hidden
    assert 30 < sum(target_sizes) / 12 < 38
    assert 40 < sum(kept) / 12 < 70  # the batch minimum of ~82-token contexts
    per_sample = build_mask("multiblock", 14, impl="torch")(indices=torch.arange(256))
    assert (~per_sample.mask).flatten(1).sum(1).float().mean() > sum(kept) / 12 + 15  # ~90, untruncated


def test_multiblock_batch_shared_blocks_are_ijepas_squares_off_the_last_row_and_column():
    """I-JEPA's _sample_block_mask draws top from randint(0, H - h): no block, context or target, reaches the last
    row or column; its encoder block has aspect (1, 1): the context block is square."""
    s = build_mask("multiblock", 14, batch_shared=True, impl="torch")
    for e in range(20):
        idx = torch.arange(32) + 1000 * e
        m = s(indices=idx, epoch=1)
        ctx = ~m.mask
        assert not (m.targets[..., -1, :].any() or m.targets[..., :, -1].any()), e
        assert not (ctx[:, -1, :].any() or ctx[:, :, -1].any()), e
        _, _, eh, ew = s._shared_sizes(idx)
        assert eh == ew, (e, eh, ew)


@pytest.mark.parametrize("grid, kw", [(14, {}), (16, {}), ((8, 12), {}), (5, {"num_targets": 1}),
                                      (14, {"context_scale": (0.3, 1.0), "max_tries": 2})])  # fmt: skip
def test_multiblock_batch_shared_on_ints_draws_the_reference_masks(grid, kw):
    """The collator's blocks as Python ints of H*W bits (5.1 -> 1.9 ms per batch of 128: it runs on the training
    thread under DALI) give the tensor reference's masks, targets and count, across grids (non-square too), one
    target, and contexts small enough to need the collator's timeout (one constraint fewer)."""
    fast = build_mask("multiblock", grid, batch_shared=True, **kw)
    ref = build_mask("multiblock", grid, batch_shared=True, impl="ref", **kw)
    for e in range(6):
        idx = torch.arange(48) + 131 * e
        a, b = fast(indices=idx, epoch=e), ref(indices=idx, epoch=e)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.targets, b.targets) and a.num_hidden == b.num_hidden
    empty = fast(indices=torch.arange(0), epoch=0)
    assert empty.mask.shape[0] == empty.targets.shape[0] == 0


def test_multiblock_batch_shared_names_a_context_that_cannot_keep_min_keep():
    """On 4x4 I-JEPA's context size shrinks to 3x3 (below the side), 9 tokens: min_keep=10 cannot hold, which is
    said when the strategy is built (per sample the whole 4x4 may be drawn); a batch whose drawn context is too
    small says so when drawn."""
    with pytest.raises(ValueError, match="has at most 9 tokens, too few to keep more than min_keep=10: lower"):
        build_mask("multiblock", 4, batch_shared=True, min_keep=10)
    build_mask("multiblock", 4, batch_shared=False, min_keep=10)
    build_mask("multiblock", 4, batch_shared=True, min_keep=8)(4)
    s = build_mask("multiblock", 5, batch_shared=True, context_scale=(0.1, 1.0), min_keep=9)
    with pytest.raises(ValueError, match="context block cannot keep more than min_keep=9 tokens: lower min_keep"):
        for epoch in range(40):  # (the context's size is drawn per batch: some batches draw a small one)
            s(4, epoch=epoch)


def test_several_masks_per_sample():
    """num_masks M: [B * M] sample-major, mask 0 is the single draw, each mask a pure function of (index, j)."""
    s = build_mask("inverse_block", 14, seed=3)
    one = s(indices=torch.arange(10, 14), epoch=1)
    multi = s(indices=torch.arange(10, 14), epoch=1, num_masks=4)
    assert multi.mask.shape == (16, 14, 14) and multi.num_hidden == 157
    assert torch.equal(multi.mask[::4], one.mask)
    assert len({tuple(m.flatten().tolist()) for m in multi.mask}) == 16
    assert torch.equal(s(indices=torch.arange(12, 14), epoch=1, num_masks=4).mask, multi.mask[8:])
    ref = build_mask("inverse_block", 14, seed=3, impl="ref")(indices=torch.arange(10, 14), epoch=1, num_masks=4)
    assert ref.mask.shape == (16, 14, 14) and ((~ref.mask).flatten(1).sum(1) == 39).all()
    with pytest.raises(ValueError, match="num_masks must be a positive int"):
        s(indices=torch.arange(2), num_masks=0)


def test_consecutive_calls_without_indices_continue_the_stream():
    s = build_mask("random", 14, impl="torch")
    a, b = s(8), s(8)
    t = build_mask("random", 14, impl="torch")
    assert torch.equal(torch.cat([a.mask, b.mask]), t(indices=torch.arange(16)).mask)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("random", {"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
        ("random", {"ratio": 0.0}, r"ratio must be in \(0, 1\)"),
        ("block", {"ratio": 1.5}, r"ratio must be in"),
        ("block", {"min_num_patches": 0}, "min_num_patches must be >= 1"),
        ("simmim", {"mask_patch_size": 24, "patch_size": 16}, "must be a positive multiple of patch_size"),
        ("uniform", {"secondary_ratio": 1.0}, r"secondary_ratio must be in \[0, 1\)"),
        ("multiblock", {"target_scale": (0.3, 0.2)}, r"target_scale must be \(min, max\)"),
        ("multiblock", {"min_keep": 196}, r"min_keep must be an int in \[0, 195\]"),
        ("multiblock", {"num_targets": 0}, "num_targets must be a positive int"),
        ("multiblock", {"max_tries": 0}, "max_tries must be a positive int"),
        ("tube", {"frames": 0}, "frames must be a positive int"),
        ("attention", {"random_share": 1.5}, r"random_share must be in \[0, 1\]"),
        ("inverse_block", {"block": 1}, "block must be an int >= 2"),
        ("inverse_block", {"adjust": 1.5}, r"adjust must be a number in \[0, 1\)"),
        # (a NaN cap was taken as "no larger than min_num_patches"; strings and truthy words were taken too)
        ("block", {"max_num_patches": float("nan")}, "max_num_patches must be an int, got nan"),
        ("block", {"max_num_patches": "30"}, "max_num_patches must be an int, got '30'"),
        ("block", {"min_aspect": "0.3"}, "min_aspect must be a number, got '0.3'"),
        ("multiblock", {"batch_shared": "false"}, "batch_shared must be true or false, got 'false'"),
        ("multiblock", {"truncate": "no"}, "truncate must be true or false, got 'no'"),
        ("random", {"impl": "cpp"}, "has no C\\+\\+ implementation"),
        ("random", {"impl": "cuda"}, "impl must be one of"),
        ("random", {"impl": "triton"}, "has no Triton implementation"),
    ],
)
def test_bad_parameters_name_the_problem(name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_mask(name, 14, **params)


def test_numpy_numbers_are_parameters_too():
    np = pytest.importorskip("numpy")
    assert build_mask("inverse_block", 14, adjust=np.float32(0.07)).adjust == pytest.approx(0.07)
    assert build_mask("block", 14, max_num_patches=np.int64(30), min_aspect=np.float32(0.3)).config.block_area_max == 30


def test_bad_grids_and_inputs_name_the_problem():
    with pytest.raises(ValueError, match="unknown mask strategy 'blocks'; choose from random, block"):
        build_mask("blocks", 14)
    with pytest.raises(ValueError, match="grid must be a positive int"):
        build_mask("random", (0, 14))
    with pytest.raises(ValueError, match="does not divide into 2x2-token mask patches"):
        build_mask("simmim", 7)
    with pytest.raises(ValueError, match="needs an even token grid"):
        build_mask("uniform", (14, 7))
    with pytest.raises(ValueError, match="has at most 4 tokens, too few to keep more than min_keep=10"):
        build_mask("multiblock", 4, context_scale=(0.2, 0.3), min_keep=10)
    s = build_mask("attention", 14)
    with pytest.raises(ValueError, match=r"scores must be \[B, H\*W\] or \[B, H, W\]"):
        s(4, scores=torch.rand(4, 195))
    with pytest.raises(TypeError, match="takes per-batch inputs: scores; missing \\['scores'\\]"):
        s(4)
    with pytest.raises(ValueError, match="non-finite"):
        s(2, scores=torch.tensor([[float("nan")] * 196] * 2))
    with pytest.raises(ValueError, match="losses must be >= 0"):
        build_mask("hardpatch", 14)(2, losses=-torch.ones(2, 196))
    with pytest.raises(ValueError, match="batch=3 but 2 indices"):
        build_mask("random", 14)(3, indices=torch.arange(2))
    with pytest.raises(ValueError, match="sample indices must be >= 0"):
        build_mask("random", 14)(indices=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        build_mask("random", 14)(2, epoch=-1)


@pytest.mark.parametrize("impl", ["torch", "cpp", "ref"])
def test_a_multiblock_context_gives_up_target_exclusions_as_ijepa_then_raises(impl):
    """Targets that leave no room for min_keep context tokens: every max_tries draws, one target fewer is excluded
    (I-JEPA's collator), down to none; only a context block smaller than min_keep by itself raises. Per sample, on a
    small grid, this raised mid-training before (0.25% of the samples of a 6x6 grid)."""
    if impl == "cpp" and not _ext.available():
        pytest.skip(f"the C++ extension is not loaded ({_ext.load_error})")
    s = build_mask("multiblock", 8, num_targets=4, target_scale=(0.3, 0.35), context_scale=(0.5, 0.55), min_keep=30,
                   impl=impl, max_tries=3)  # fmt: skip
    m = s(indices=torch.arange(16))
    ctx = ~m.mask.flatten(1)
    assert (ctx.sum(1) > 30).all()
    assert (ctx & m.targets.flatten(2).any(1)).any()  # some target overlaps its context: a constraint was dropped
    small = build_mask("multiblock", 6, num_targets=1, target_scale=(1.0, 1.0), aspect_range=(1.0, 1.0),
                       context_scale=(0.05, 0.5), min_keep=10, max_tries=2, impl=impl)  # fmt: skip
    with pytest.raises(RuntimeError, match="even without excluding the targets"):
        small(indices=torch.arange(64))
    for grid in (6, 7):  # the I-JEPA defaults on small grids never fail now
        build_mask("multiblock", grid, impl=impl)(indices=torch.arange(2000))


def test_empty_batch():
    for name in STRATEGIES:
        s = build_mask(name, 14, impl="torch")
        inputs = {INPUTS[name]: torch.rand(0, 196)} if name in INPUTS else {}
        assert s(0, **inputs).mask.shape[0] == 0


def test_masks_drawn_in_loader_workers_equal_the_strategy_on_those_indices():
    """MaskCollate (the pretrain loader's collate when the mask has a C++ generator) gives each sample the mask of
    its dataset index and epoch, whichever worker collates it."""
    from fastmim.data import MaskCollate, WithIndex

    data = WithIndex([torch.full((3, 4, 4), float(i)) for i in range(40)])
    strategy = build_mask("block", 14, ratio=0.4, seed=11)
    collate = MaskCollate(strategy)
    collate.set_epoch(2)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate, num_workers=2,
                                         sampler=[5, 3, 39, 0, 17, 8, 9, 1, 22, 30, 31, 2, 4, 6, 7, 10])  # fmt: skip
    for imgs, idx, mask in loader:
        assert torch.equal(imgs[:, 0, 0, 0].long(), idx)
        assert torch.equal(mask, strategy(indices=idx, epoch=2).mask)
        assert not torch.equal(mask, strategy(indices=idx, epoch=3).mask)


def test_simmim_masks_keep_a_visible_cell_and_refuse_a_single_cell():
    """SimMIM's ceil(ratio * M) hidden cells stop at M - 1 (a mask hiding every token leaves nothing to encode), and a
    grid that is one mask cell is refused by name."""
    from fastmim.masking import build_mask

    m = build_mask("simmim", 14, ratio=0.99, mask_patch_size=32, patch_size=16)(3).mask
    assert m.flatten(1).sum(1).tolist() == [192, 192, 192]  # 49 cells of 4 tokens: 48 hidden
    assert build_mask("simmim", 14, ratio=0.6)(1).mask.sum() == 30 * 4  # SimMIM's own ceil(0.6 * 49) = 30
    with pytest.raises(ValueError, match="2x2 token grid is one 2x2-token mask patch"):
        build_mask("simmim", 2, mask_patch_size=32, patch_size=16)


def test_numpy_numbers_are_taken_where_python_ones_are():
    """A grid, batch, epoch and seed of numpy integer types and a ratio of numpy's float32 draw the masks their
    Python values draw; a float grid is refused as a grid."""
    import numpy as np

    from fastmim.masking import build_mask

    a = build_mask("block", np.int64(14), ratio=np.float32(0.5), seed=np.int64(3))(np.int64(2), epoch=np.int64(1))
    b = build_mask("block", 14, ratio=float(np.float32(0.5)), seed=3)(2, epoch=1)
    assert torch.equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="grid must be a positive int or \\(height, width\\)"):
        build_mask("random", 14.0)
    # every strategy's integer arguments, and num_masks
    i = np.int64
    pairs = [(("block", 8, {"ratio": 0.4}), {"num_masks": 2}),
             (("multiblock", 8, {"num_targets": 2, "min_keep": 4, "max_tries": 30}), {}),
             (("inverse_block", 8, {"block": 3}), {}), (("tube", 8, {"frames": 3}), {}),
             (("simmim", 4, {"mask_patch_size": 32, "patch_size": 16}), {})]  # fmt: skip
    for (name, grid, kw), call in pairs:
        want = build_mask(name, grid, seed=1, **kw)(indices=torch.arange(2), **call)
        got = build_mask(name, grid, seed=1, **{k: i(v) if isinstance(v, int) else v for k, v in kw.items()})(
            indices=torch.arange(2), **{k: i(v) for k, v in call.items()})  # fmt: skip
        assert torch.equal(got.mask, want.mask), name
    with pytest.raises(ValueError, match="num_targets must be a positive int, got 2.0"):
        build_mask("multiblock", 8, num_targets=2.0)


class _HostValuesOnADevice(torch.overrides.TorchFunctionMode):
    """Records torch.tensor / torch.as_tensor calls given a device: a tensor made from host values there, which on a
    GPU is a blocking copy (a sync that drains the stream) each time."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None and func in (torch.tensor, torch.as_tensor):
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_device_path_makes_no_tensor_from_host_values_per_call(name):
    """What runs on a GPU (impl torch, the Triton block kernel's launcher where it runs) makes no tensor from host
    values on the device after the first call (cached ones are made once): data2vec 2.0's inverse-block masks made
    two per call (randint's bounds), the Triton block masks one (the kernel's parameters)."""
    impls = ["torch"] + (["triton"] if name == "block" and triton_available() is None and _interpreted() else [])
    for impl in impls:
        draw(name, impl, batch=4, num_masks=3) if name == "inverse_block" else draw(name, impl, batch=4)
        with _HostValuesOnADevice() as rec:
            draw(name, impl, batch=4, num_masks=3) if name == "inverse_block" else draw(name, impl, batch=4)
        assert rec.calls == [], (name, impl, rec.calls)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def test_multiblock_default_min_keep_fits_small_grids():
    """I-JEPA's min_keep 10 by default, at most 1/8 of a smaller grid as the I-JEPA models take it: a 2x3 grid refused
    the default with 'min_keep must be an int in [0, 5], got 10', a value the user never gave, and on a 4x4 grid 10
    left no context once the targets were cut out, so they were let overlap it (98.8% of the samples)."""
    assert build_mask("multiblock", 14).min_keep == 10 and build_mask("multiblock", 8).min_keep == 8
    assert build_mask("multiblock", 3).min_keep == 1
    m = build_mask("multiblock", 4)(512)
    overlap = (m.targets & ~m.mask.unsqueeze(1)).flatten(1).any(1).float().mean()
    assert float(overlap) < 0.05, float(overlap)
    small = build_mask("multiblock", (2, 3))
    assert small.min_keep == 0
    m = small(4)
    assert (~m.mask).flatten(1).sum(1).min() >= 1 and m.targets.shape == (4, 4, 2, 3)
    with pytest.raises(ValueError, match=r"min_keep must be an int in \[0, 5\], got 10"):
        build_mask("multiblock", (2, 3), min_keep=10)  # given: still checked


def test_a_masks_of_values_other_than_0_and_1_is_refused_by_name():
    """Masks(...) took any tensor as it was: a model given Masks(torch.full(..., 0.5)) hid the last tokens of each
    sample, and SimMIM weighted its loss by 0.5, while the same plain tensor was refused for its values. Values other
    than 0/1 are refused now; 0/1 of another dtype is made bool, as for a plain tensor."""
    import fastmim
    from fastmim.masking import Masks

    half = torch.full((2, 4, 4), 0.5)
    for bad in (half, torch.full((2, 4, 4), 2, dtype=torch.uint8), torch.full((2, 4, 4), -1)):
        with pytest.raises(ValueError, match=rf"Masks.mask holds True/1 .* this {bad.dtype} one has other values"):
            Masks(bad)
    with pytest.raises(ValueError, match="Masks.targets holds True/1"):
        Masks(torch.zeros(2, 4, 4, dtype=torch.bool), targets=torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(TypeError, match="Masks.mask must be a bool tensor"):
        Masks([[True]])
    ones = torch.zeros(2, 4, 4, dtype=torch.uint8)  # 0/1 of another dtype (a strategy's numpy output): made bool
    ones[:, :2] = 1
    got = Masks(ones, targets=ones[:, None].long())
    assert got.mask.dtype == got.targets.dtype == torch.bool and torch.equal(got.mask, ones.bool())
    model = fastmim.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, decoder_depth=1,
                                 decoder_embed_dim=32, decoder_num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="has other values"):  # the plain tensor: its values checked, as before
        model(torch.randn(2, 3, 32, 32), mask=half)
    ok = torch.zeros(2, 4, 4, dtype=torch.bool)
    ok[:, :2] = True
    loss, _, mask = model(torch.randn(2, 3, 32, 32), mask=Masks(ok))
    assert torch.equal(mask.bool(), ok.flatten(1)) and torch.isfinite(loss)
