"""SparseLayout and sparse_dwconv (FCMAE's submanifold depthwise convolution): the layout against brute force, the op
against the dense definition (zero-filled F.conv2d read back at active pixels) and every backend against the
reference (values and all gradients, low precision), empty inputs, bad inputs, opcheck, torch.compile and
hypothesis-generated shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmim import _ext
from fastmim.ops import SparseLayout, sparse_dwconv, sparse_dwconv_ref
from fastmim.ops._dispatch import choose_backend
from tests.ops.conftest import _skip_reason
from tests.ops.helpers import check_against_reference, compile_backend

OP = "sparse_dwconv"  # no CUDA kernel: the backend fixture skips "cuda" (it would run the Triton one again)


def _active(b: int, h: int, w: int, kind: str, seed: int = 0) -> torch.Tensor:
    """[B, H, W] bool: "random" pixels, "patchP" FCMAE-style (60% of a coarse grid of PxP blocks masked), "full"."""
    g = torch.Generator().manual_seed(seed)
    if kind == "full":
        return torch.ones(b, h, w, dtype=torch.bool)
    if kind == "random":
        return torch.rand(b, h, w, generator=g) < 0.5
    p = int(kind.removeprefix("patch"))
    keep = torch.rand(b, -(-h // p), -(-w // p), generator=g) >= 0.6  # [B, gh, gw]
    return keep.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, :h, :w].contiguous()


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)


def _dense_dwconv(active: torch.Tensor):
    """The definition: rows scattered into a zero NCHW map, F.conv2d(groups=C, padding=K // 2), read back."""

    def fn(x, nbr, weight, bias):
        b, h, w = active.shape
        dense = x.new_zeros(b, h, w, x.shape[1]).index_put((active,), x)  # [B, H, W, C]
        out = F.conv2d(dense.permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
        return out.permute(0, 2, 3, 1)[active]  # [M, C]

    return fn


def _problem(b, h, w, c, k, kind, has_bias, device, dtype=torch.float32, wdtype=None, seed=0):
    active = _active(b, h, w, kind, seed).to(device)
    layout = SparseLayout.from_mask(active)
    assert layout.num_rows > 0, "pick a seed with active pixels"
    x = _randn(layout.num_rows, c, dtype=dtype, device=device, seed=seed + 1)
    weight = _randn(c, 1, k, k, dtype=wdtype or dtype, device=device, seed=seed + 2)
    bias = _randn(c, dtype=wdtype or dtype, device=device, seed=seed + 3) if has_bias else None
    return active, layout, [x, layout.neighbors(k), weight, bias]


# ---- SparseLayout -------------------------------------------------------------------------------------------------


def test_layout_of_a_hand_made_mask():
    active = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 0], [1, 1, 0]]], dtype=torch.bool)  # [2, 2, 3]
    layout = SparseLayout.from_mask(active)
    assert layout.num_rows == 6 and layout.shape == (2, 2, 3)
    expected = torch.tensor([[[0, -1, 1], [-1, -1, 2]], [[-1, 3, -1], [4, 5, -1]]], dtype=torch.int32)
    assert layout.index.dtype == torch.int32 and torch.equal(layout.index, expected)
    assert layout.batch.dtype == torch.int64 and layout.batch.tolist() == [0, 0, 0, 1, 1, 1]
    assert layout.pixel.tolist() == [0, 2, 5, 7, 9, 10]
    nbr = layout.neighbors(3)
    assert nbr.shape == (9, 6) and nbr.dtype == torch.int32
    assert nbr[:, 0].tolist() == [-1, -1, -1, -1, 0, -1, -1, -1, -1]  # (0, 0): no active neighbor
    assert nbr[:, 2].tolist() == [-1, 1, -1, -1, 2, -1, -1, -1, -1]  # (1, 2): (0, 2) above it
    assert nbr[:, 4].tolist() == [-1, -1, 3, -1, 4, 5, -1, -1, -1]  # sample 1 (1, 0): never sample 0's rows


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("kind", ["random", "patch2"])
def test_neighbors_match_brute_force(k, kind):
    active = _active(2, 5, 7, kind, seed=3)
    layout = SparseLayout.from_mask(active)
    rows = [(b, y, x) for b in range(2) for y in range(5) for x in range(7) if active[b, y, x]]
    row_of = {p: i for i, p in enumerate(rows)}
    expected = torch.full((k * k, len(rows)), -1, dtype=torch.int32)
    for r, (b, y, x) in enumerate(rows):
        for t in range(k * k):
            expected[t, r] = row_of.get((b, y + t // k - k // 2, x + t % k - k // 2), -1)
    assert torch.equal(layout.neighbors(k), expected)
    assert layout.neighbors(k) is layout.neighbors(k)  # cached


@pytest.mark.parametrize("k", [3, 7])
def test_neighbors_are_symmetric(k):
    """nbr[t, r] = r' implies nbr[K*K - 1 - t, r'] = r: what the backward's flipped kernel relies on."""
    nbr = SparseLayout.from_mask(_active(3, 9, 11, "patch2", seed=5)).neighbors(k).long()
    t, r = (nbr >= 0).nonzero().unbind(1)
    assert t.numel() > nbr.shape[1]  # more than the centre taps
    assert torch.equal(nbr[k * k - 1 - t, nbr[t, r]], r)


def test_gather_scatter_round_trip():
    active = _active(2, 5, 7, "random", seed=1)
    layout = SparseLayout.from_mask(active)
    dense = _randn(2, 5, 7, 3, grad=True)
    rows = layout.gather(dense)
    assert rows.shape == (layout.num_rows, 3)
    torch.testing.assert_close(rows, dense[active], rtol=0, atol=0)
    back = layout.scatter(rows)
    torch.testing.assert_close(back, dense * active.unsqueeze(-1), rtol=0, atol=0)
    torch.testing.assert_close(layout.gather(back), rows, rtol=0, atol=0)
    back.sum().backward()  # differentiable: the gradient reaches the active pixels only
    torch.testing.assert_close(dense.grad, active.unsqueeze(-1).expand(2, 5, 7, 3).float(), rtol=0, atol=0)


def test_empty_layout(backend):
    device, _ = backend
    layout = SparseLayout.from_mask(torch.zeros(2, 3, 5, dtype=torch.bool, device=device))
    assert layout.num_rows == 0 and (layout.index == -1).all() and layout.batch.shape == (0,)
    nbr = layout.neighbors(3)
    assert nbr.shape == (9, 0) and nbr.dtype == torch.int32
    assert layout.gather(torch.randn(2, 3, 5, 4, device=device)).shape == (0, 4)
    assert layout.scatter(torch.zeros(0, 4, device=device)).eq(0).all()
    x, w, b = _randn(0, 4, device=device), _randn(4, 1, 3, 3, device=device), _randn(4, device=device)
    out = sparse_dwconv(x, nbr, w, b)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4) and w.grad.eq(0).all() and b.grad.eq(0).all()


# ---- sparse_dwconv against its definition and the reference ----------------------------------------------------

# (B, H, W, C, K, mask, bias): odd sizes, batch 1 and 3, C = 1, 5, 40, FCMAE's patch masks, a fully active map
DENSE_CASES = [
    (1, 5, 7, 1, 3, "random", True),
    (3, 5, 7, 5, 7, "random", False),
    (2, 9, 11, 40, 7, "patch2", True),
    (1, 13, 9, 5, 3, "patch4", True),
    (3, 7, 5, 40, 3, "patch2", False),
    (2, 13, 17, 5, 3, "random", True),  # M ~ 220: several row blocks per weight-gradient program
    (1, 6, 6, 40, 7, "full", True),
    (2, 7, 7, 1, 7, "patch4", False),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_dense_conv(backend, case):
    device, name = backend
    active, _, inputs = _problem(*case, device=device)
    check_against_reference(sparse_dwconv, _dense_dwconv(active), inputs, f"dense[{name}]", rtol=1e-5)


@pytest.mark.parametrize("case", DENSE_CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_dense_conv(case):
    active, _, inputs = _problem(*case, device="cpu")
    check_against_reference(sparse_dwconv_ref, _dense_dwconv(active), inputs, "reference", rtol=1e-5)


@pytest.mark.parametrize("case", [(2, 9, 11, 40, 7, "patch2", True), (1, 5, 7, 5, 3, "random", False)])
@pytest.mark.parametrize("dtypes", ["bf16", "fp16", "bf16+fp32"])
def test_low_precision_matches_reference(backend, case, dtypes):
    device, name = backend
    x_dtype = torch.float16 if dtypes == "fp16" else torch.bfloat16
    w_dtype = torch.float32 if dtypes == "bf16+fp32" else x_dtype  # "bf16+fp32": autocast activations, fp32 params
    _, _, inputs = _problem(*case, device=device, dtype=x_dtype, wdtype=w_dtype)
    check_against_reference(sparse_dwconv, sparse_dwconv_ref, inputs, f"{dtypes}[{name}]")


@pytest.mark.parametrize("needs", ["x", "weight", "bias", "x+bias"])
def test_gradient_subsets(backend, needs):
    """Frozen weights, a first layer's input: only the gradients asked for are computed, and they are right."""
    device, name = backend
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, device)
    x.requires_grad_("x" in needs)
    w.requires_grad_("weight" in needs)
    b.requires_grad_("bias" in needs)
    check_against_reference(sparse_dwconv, sparse_dwconv_ref, [x, nbr, w, b], f"{needs}[{name}]")


def test_masked_outputs_are_zero(backend):
    """Outputs exist at active pixels only: scattered back, masked pixels are exactly zero although the dense conv
    (with a bias) is not zero there."""
    device, _ = backend
    active, layout, inputs = _problem(2, 9, 11, 5, 7, "patch2", True, device)
    dense_out = layout.scatter(sparse_dwconv(*inputs).detach())  # [B, H, W, C]
    assert dense_out[~active].eq(0).all()
    assert dense_out[active].ne(0).all()
    x, nbr, w, b = inputs
    full = F.conv2d(layout.scatter(x.detach()).permute(0, 3, 1, 2), w.detach(), b.detach(), padding=3, groups=5)
    assert full.permute(0, 2, 3, 1)[~active].ne(0).any()


def test_non_contiguous_inputs(backend):
    device, name = backend
    _, _, (x, nbr, w, b) = _problem(2, 7, 9, 6, 3, "random", True, device)
    xs = _randn(x.shape[0], 12, device=device, grad=False)[:, ::2].requires_grad_()  # [M, 6] with stride 2
    nbr_t = nbr.t().contiguous().t()  # same table, [M, K*K] memory
    assert not xs.is_contiguous() and not nbr_t.is_contiguous()
    check_against_reference(sparse_dwconv, sparse_dwconv_ref, [xs, nbr_t, w, b], f"strided[{name}]")
    # an expanded (stride 0) upstream gradient, as .sum() gives
    out = sparse_dwconv(xs, nbr_t, w, b)
    gx, gw = torch.autograd.grad(out.sum(), (xs, w))
    rx, rw = torch.autograd.grad(sparse_dwconv_ref(xs, nbr_t, w, b).sum(), (xs, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float64)])
def test_float64_weight_and_bias_gradients_are_float64_accurate(dtypes):
    """float64 x or weights: the weight and bias gradients were summed in fp32 (8e-8 relative error); as the
    reference's autograd now."""
    _, _, (x, nbr, w, b) = _problem(2, 6, 7, 4, 7, "random", True, "cpu", *dtypes)
    w, b = w.requires_grad_(), b.requires_grad_()
    grad = _randn(x.shape[0], 4, dtype=x.dtype, device="cpu", seed=9)
    got = torch.autograd.grad(sparse_dwconv(x, nbr, w, b), (w, b), grad)
    want = torch.autograd.grad(sparse_dwconv_ref(x, nbr, w, b), (w, b), grad)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_cpp_backend_is_chosen_on_cpu(monkeypatch):
    """CPU tensors run the C++ kernels when fastmim._C is built (auto or forced), the reference when forced."""
    if not _ext.available():
        pytest.skip(f"fastmim._C not built ({_ext.load_error})")
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend("sparse_dwconv", cpu, (torch.float32,)) == "cpp"
    assert choose_backend("sparse_dwconv", cpu, (torch.bfloat16, torch.float32)) == "cpp"
    assert choose_backend("sparse_dwconv", cpu, (torch.float64,)) == "torch"
    monkeypatch.setenv("FASTMIM_BACKEND", "torch")
    assert choose_backend("sparse_dwconv", cpu, (torch.float32,)) == "torch"


# ---- torch.library and torch.compile ---------------------------------------------------------------------------


def test_opcheck(backend):
    device, _ = backend
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, device)
    torch.library.opcheck(torch.ops.fastmim.sparse_dwconv.default, (x, nbr, w, b))
    torch.library.opcheck(torch.ops.fastmim.sparse_dwconv.default, (x, nbr, w, None))
    grad = _randn(*x.shape, device=device, grad=False)
    for flags in [(True, True, True), (False, True, False), (True, False, True)]:
        args = (grad, x.detach(), nbr, w.detach(), *flags)
        torch.library.opcheck(torch.ops.fastmim.sparse_dwconv_backward.default, args)


def test_compile_fullgraph(backend):
    """sparse_dwconv in a ConvNeXt-like block under torch.compile(fullgraph=True): eager's values and gradients."""
    device, name = backend
    _, layout, (x, nbr, w, b) = _problem(2, 7, 9, 5, 7, "patch2", True, device)

    def block(x, nbr, w, b):
        return x + sparse_dwconv(x * 2, nbr, w, b).relu()

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    check_against_reference(compiled, block, [x, nbr, w, b], f"compiled[{name}]")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.integers(1, 20),
    k=st.sampled_from([1, 3, 5, 7]),
    kind=st.sampled_from(["random", "patch2", "patch4", "full"]),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(backend, b, h, w, c, k, kind, has_bias, seed):
    device, name = backend
    active = _active(b, h, w, kind, seed).to(device)
    layout = SparseLayout.from_mask(active)
    inputs = [_randn(layout.num_rows, c, device=device, seed=seed), layout.neighbors(k),
              _randn(c, 1, k, k, device=device, seed=seed + 1),
              _randn(c, device=device, seed=seed + 2) if has_bias else None]  # fmt: skip
    if layout.num_rows:
        check_against_reference(sparse_dwconv, _dense_dwconv(active), inputs, f"hypothesis[{name}]", rtol=1e-5)
    else:
        assert sparse_dwconv(*inputs).shape == (0, c)


# ---- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    _, layout, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, "cpu")
    m = x.shape[0]
    with pytest.raises(TypeError, match="nbr must be an int32"):
        sparse_dwconv(x, nbr.long(), w, b)
    with pytest.raises(ValueError, match=rf"nbr has shape \(9, {m - 1}\), expected \[K\*K, M\] with M = {m}"):
        sparse_dwconv(x, nbr[:, 1:], w, b)
    with pytest.raises(ValueError, match="nbr has 16 taps, expected K\\*K for an odd kernel size"):
        sparse_dwconv(x, layout.neighbors(5)[:16], w, b)
    with pytest.raises(ValueError, match="nbr has 8 taps"):
        sparse_dwconv(x, nbr[:8], w, b)
    with pytest.raises(ValueError, match=r"weight has shape \(5, 1, 7, 7\), expected \[C, 1, K, K\] = \[5, 1, 3, 3\]"):
        sparse_dwconv(x, nbr, torch.randn(5, 1, 7, 7), b)
    with pytest.raises(ValueError, match=r"weight has shape \(5, 3, 3\)"):
        sparse_dwconv(x, nbr, w.detach()[:, 0], b)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 1, 3, 3\), expected .* = \[5, 1, 3, 3\]"):
        sparse_dwconv(x, nbr, w.detach()[:4], b)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \[5\]"):
        sparse_dwconv(x, nbr, w, b.detach()[:4])
    with pytest.raises(ValueError, match=r"x must be \[M, C\] rows"):
        sparse_dwconv(x.detach()[None], nbr, w, b)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sparse_dwconv(x.detach().long(), nbr, w, b)
    with pytest.raises(ValueError, match="weight is on meta"):
        sparse_dwconv(x, nbr, w.detach().to("meta"), b)
    with pytest.raises(ValueError, match="nbr is on meta"):
        sparse_dwconv(x, nbr.to("meta"), w, b)


@pytest.mark.parametrize("bad", [-2, 10**6])
def test_nbr_out_of_range_raises_on_cpu(bad):
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, "cpu")
    nbr = nbr.clone()
    nbr[4, 3] = bad
    with pytest.raises(IndexError, match=rf"nbr\[4, 3\] = {bad} is out of range \[-1, {x.shape[0]}\)"):
        sparse_dwconv(x, nbr, w, b)


def test_an_asymmetric_table_is_refused_where_x_needs_a_gradient():
    """x's gradient runs the flipped table, so an in-range but asymmetric one gave it silently wrong values; the
    forward alone (no gradient of x) does not need the symmetry."""
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, "cpu")
    nbr = nbr.clone()
    r = int((nbr[0] >= 0).nonzero()[0])  # a tap with a neighbour: point it at another row
    nbr[0, r] = (nbr[0, r] + 1) % x.shape[0]
    with pytest.raises(ValueError, match=rf"nbr is not symmetric, which x's gradient needs: nbr\[0, {r}\] ="):
        sparse_dwconv(x, nbr, w, b)
    torch.testing.assert_close(sparse_dwconv(x.detach(), nbr, w, b), sparse_dwconv_ref(x.detach(), nbr, w, b))


def test_an_asymmetric_table_is_refused_under_torch_compile_too():
    """Under torch.compile the public function's check is traced away (ids are not read while tracing); the backward
    op's body runs at every call and refuses the table there (it gave x a silently wrong gradient)."""
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, "cpu")
    nbr = nbr.clone()
    r = int((nbr[0] >= 0).nonzero()[0])
    nbr[0, r] = (nbr[0, r] + 1) % x.shape[0]
    compiled = torch.compile(sparse_dwconv, fullgraph=True, backend="aot_eager")
    out = compiled(x.detach().requires_grad_(), nbr, w, b)
    with pytest.raises(ValueError, match=r"nbr is not symmetric, which x's gradient needs"):
        out.sum().backward()


def test_bad_layout_inputs_raise():
    with pytest.raises(TypeError, match="active must be a bool tensor"):
        SparseLayout.from_mask(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match=r"active must be \[B, H, W\]"):
        SparseLayout.from_mask(torch.ones(3, 3, dtype=torch.bool))
    layout = SparseLayout.from_mask(_active(2, 5, 7, "random"))
    for k in (0, 2, 4, 3.0, True):
        with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
            layout.neighbors(k)
    with pytest.raises(ValueError, match=r"SparseLayout.gather: dense has shape \(2, 7, 5, 3\)"):
        layout.gather(torch.zeros(2, 7, 5, 3))
    with pytest.raises(ValueError, match="SparseLayout.scatter: rows has shape"):
        layout.scatter(torch.zeros(layout.num_rows + 1, 3))


# ---- the Triton kernels directly -------------------------------------------------------------------------------


def _triton_or_skip():
    why = _skip_reason("cpu", "triton")
    if why:
        pytest.skip(why)
    from fastmim.ops.triton import sparse_conv

    return sparse_conv


@pytest.mark.parametrize("programs", [1, 2, 3, 100])
def test_weight_gradient_programs(programs):
    """The weight-gradient kernel gives the same sums however many splits share the rows."""
    kernels = _triton_or_skip()
    from fastmim.ops.sparse_conv import _wgrad_ref

    _, _, (x, nbr, _, _) = _problem(2, 13, 17, 40, 3, "random", False, "cpu")
    grad = _randn(*x.shape, seed=9, grad=False)
    gw, gb = kernels.sparse_dwconv_wgrad(grad, x.detach(), nbr, programs=programs)
    torch.testing.assert_close(gw, _wgrad_ref(grad, x.detach(), nbr))
    torch.testing.assert_close(gb, grad.sum(0))


def test_triton_kernels_are_memory_safe_on_bad_ids():
    """Without a host sync there is no error to raise on CUDA: a bad id gives a NaN row and is skipped backward."""
    kernels = _triton_or_skip()
    x = torch.randn(4, 3)
    nbr = torch.tensor([[-1, 0, 9, 1], [0, 1, 2, -5], [1, 2, 3, -1]], dtype=torch.int32)
    nbr = torch.cat([nbr, torch.full((6, 4), -1, dtype=torch.int32)])  # [9, 4]
    out = kernels.sparse_dwconv(x, nbr, torch.ones(3, 1, 3, 3), None)
    assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()
    torch.testing.assert_close(out[:2], torch.stack([x[0] + x[1], x[0] + x[1] + x[2]]))
    gw, gb = kernels.sparse_dwconv_wgrad(torch.ones(4, 3), x, nbr)
    assert torch.isfinite(gw).all()
    torch.testing.assert_close(gw[:, 0], x[[0, 1]].sum(0))  # tap 0 reads rows 0 and 1; -1 and 9 are skipped


# ---- the C++ kernels directly ----------------------------------------------------------------------------------


def _cpp_or_skip():
    why = _skip_reason("cpu", "cpp")
    if why:
        pytest.skip(why)
    from fastmim.ops import _cpu

    return _cpu


@pytest.mark.parametrize("bad", [-2, 10**6, -(2**31)])
def test_cpp_kernels_raise_on_bad_ids(bad):
    """The Python id check runs first on CPU; the kernels check every id again and raise ValueError, never reading
    out of bounds (also with no rows to write: C = 0)."""
    _cpu = _cpp_or_skip()
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, "cpu")
    x, w, b = x.detach(), w.detach(), b.detach()
    nbr = nbr.clone()
    nbr[4, 3] = bad
    msg = rf"nbr\[4, 3\] = {bad} is out of range \[-1, {x.shape[0]}\)"
    with pytest.raises(ValueError, match="sparse_dwconv_forward: " + msg):
        _cpu.sparse_dwconv(x, nbr, w, b)
    with pytest.raises(ValueError, match="sparse_dwconv_forward: " + msg):
        _cpu.sparse_dwconv(x, nbr, w, None, flip=True, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sparse_dwconv_wgrad: " + msg):
        _cpu.sparse_dwconv_wgrad(torch.randn_like(x), x, nbr, 3)
    with pytest.raises(ValueError, match="sparse_dwconv_forward: " + msg):
        _cpu.sparse_dwconv(x[:, :0], nbr, w[:0], None)
    nbr[2, 1] = -7  # the first bad id in [t, r] order is reported
    with pytest.raises(ValueError, match=r"nbr\[2, 1\] = -7 is out of range"):
        _cpu.sparse_dwconv(x, nbr, w, b)


def test_cpp_wrappers_check_shapes():
    _cpu = _cpp_or_skip()
    _, _, (x, nbr, w, b) = _problem(2, 5, 7, 5, 3, "random", True, "cpu")
    x, w, b = x.detach(), w.detach(), b.detach()
    with pytest.raises(ValueError, match=r"nbr must be \[K\*K, M\]"):
        _cpu.sparse_dwconv(x, nbr[:, 1:], w, b)
    with pytest.raises(ValueError, match=r"nbr must be \[K\*K, M\]"):
        _cpu.sparse_dwconv(x, nbr.long(), w, b)
    with pytest.raises(ValueError, match=r"weight must be \[C, 1, K, K\]"):
        _cpu.sparse_dwconv(x, nbr, w[:4], b)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        _cpu.sparse_dwconv(x.double(), nbr, w, b)
    with pytest.raises(ValueError, match="grad has shape"):
        _cpu.sparse_dwconv_wgrad(x[1:], x, nbr, 3)
    with pytest.raises(ValueError, match=r"nbr must be \[K\*K, M\] = \[25,"):
        _cpu.sparse_dwconv_wgrad(x, x, nbr, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_weight_gradient_matches_reference(dtype):
    """Many rows (several fixed-size chunks): the chunked fp32 sums match the fp32 reference, and gb = grad.sum(0)."""
    _cpu = _cpp_or_skip()
    from fastmim.ops.sparse_conv import _wgrad_ref

    _, _, (x, nbr, _, _) = _problem(4, 31, 29, 24, 7, "random", False, "cpu", dtype=dtype)
    assert x.shape[0] > 1000
    x = x.detach()
    grad = _randn(*x.shape, seed=9, grad=False).to(dtype)
    gw, gb = _cpu.sparse_dwconv_wgrad(grad, x, nbr, 7)
    torch.testing.assert_close(gw, _wgrad_ref(grad, x, nbr), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, grad.float().sum(0), rtol=1e-5, atol=1e-4)
    assert _cpu.sparse_dwconv_wgrad(grad, x, nbr, 7, need_bias=False)[1] is None


def test_layout_with_a_known_row_count_equals_the_counted_one():
    active = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    m = int(active.sum())
    a, b = SparseLayout.from_mask(active), SparseLayout.from_mask(active, num_rows=m)
    assert a.num_rows == b.num_rows == m
    for name in ("index", "batch", "pixel"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.neighbors(3), b.neighbors(3))
    with pytest.raises(ValueError, match="num_rows is"):
        SparseLayout.from_mask(active, num_rows=m - 1)
    with pytest.raises(ValueError, match="not in"):
        SparseLayout.from_mask(active, num_rows=61)
