"""grn (ConvNeXt V2's Global Response Norm of each sample's rows): the reference against the model's dense GRN, every
backend against the reference (values and all gradients, low precision, zero channels and samples, gradient subsets,
strides, autocast), empty inputs, bad inputs, opcheck, torch.compile and hypothesis-generated shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmim.models.convnextv2 import GlobalResponseNorm
from fastmim.ops import grn, grn_ref
from fastmim.ops._dispatch import choose_backend
from tests.ops.conftest import _skip_reason
from tests.ops.helpers import check_against_reference, compile_backend

OP = "grn"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)
EPS = 1e-6


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)


def _problem(b, n, c, device, dtype=torch.float32, wdtype=None, seed=0, zero_channel=False):
    """[x, weight, bias, eps]; ``zero_channel``: channel 2 (or the last) is all zero in the last sample."""
    x = _randn(b, n, c, dtype=dtype, device=device, seed=seed, grad=False)
    if zero_channel:
        x[-1, :, min(2, c - 1)] = 0
    weight = _randn(c, dtype=wdtype or dtype, device=device, seed=seed + 1)
    bias = _randn(c, dtype=wdtype or dtype, device=device, seed=seed + 2)
    return [x.requires_grad_(), weight, bias, EPS]


# ---- the reference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_the_dense_grn(dtype):
    """grn_ref on [B, H*W, C] is the model's GlobalResponseNorm on [B, H, W, C]: values and every gradient."""
    x, w, b, _ = _problem(2, 15, 7, "cpu", dtype=dtype, zero_channel=True)
    module = GlobalResponseNorm(7).to(dtype)

    def dense(x, w, b, eps):
        return torch.func.functional_call(module, {"weight": w, "bias": b}, (x.view(2, 3, 5, 7),)).view(2, 15, 7)

    check_against_reference(grn_ref, dense, [x, w, b, EPS], f"dense {dtype}", rtol=1e-5)


def test_reference_formula_by_hand():
    x = torch.tensor([[[3.0, 0.0], [4.0, 1.0]]])  # [1, 2, 2]: gx = (5, 1), mean 3
    w, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    nx = torch.tensor([5.0, 1.0]) / (3.0 + EPS)
    torch.testing.assert_close(grn_ref(x, w, b, EPS), x * (1 + w * nx) + b)


# ---- every backend against the reference -------------------------------------------------------------------------

# (B, N, C, zero channel): prime and odd sizes, batch 1, one row, one channel, several channel blocks
CASES = [
    (2, 37, 59, True),
    (1, 197, 8, False),
    (3, 1, 16, True),
    (1, 1, 1, False),
    (2, 20, 300, True),
    (4, 9, 5, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(backend, case):
    device, name = backend
    b, n, c, zero = case
    check_against_reference(grn, grn_ref, _problem(b, n, c, device, zero_channel=zero), f"fp32[{name}]", rtol=1e-5)


@pytest.mark.parametrize("case", [(2, 37, 59, True), (1, 5, 130, False)], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtypes", ["bf16", "fp16", "bf16+fp32"])
def test_low_precision_matches_reference(backend, case, dtypes):
    device, name = backend
    x_dtype = torch.float16 if dtypes == "fp16" else torch.bfloat16
    w_dtype = torch.float32 if dtypes == "bf16+fp32" else x_dtype  # "bf16+fp32": autocast activations, fp32 params
    b, n, c, zero = case
    inputs = _problem(b, n, c, device, dtype=x_dtype, wdtype=w_dtype, zero_channel=zero)
    check_against_reference(grn, grn_ref, inputs, f"{dtypes}[{name}]")


def test_zero_channels_and_samples_have_finite_gradients(backend):
    """A channel that is zero in one sample gets vector_norm's zero subgradient; an all-zero sample (gx = 0, so
    nx = 0) gives out = bias there and dx = dout. Everything finite, and equal to the reference."""
    device, name = backend
    x, w, b, eps = _problem(3, 6, 10, device, zero_channel=True)
    x = x.detach().clone()
    x[0] = 0
    x.requires_grad_()
    check_against_reference(grn, grn_ref, [x, w, b, eps], f"zeros[{name}]", rtol=1e-5)
    out = grn(x, w, b, eps)
    torch.testing.assert_close(out[0].detach(), b.detach().expand(6, 10))
    g = _randn(3, 6, 10, device=device, seed=5, grad=False)
    dx, dw, db = torch.autograd.grad(out, (x, w, b), g)
    assert all(torch.isfinite(t).all() for t in (dx, dw, db))
    torch.testing.assert_close(dx[0], g[0])


@pytest.mark.parametrize("needs", ["x", "weight", "bias", "x+bias", "weight+bias"])
def test_gradient_subsets(backend, needs):
    """Frozen parameters, or an input that needs no gradient: only what is asked for is computed, and it is right."""
    device, name = backend
    x, w, b, eps = _problem(2, 11, 19, device, zero_channel=True)
    x.requires_grad_("x" in needs)
    w.requires_grad_("weight" in needs)
    b.requires_grad_("bias" in needs)
    check_against_reference(grn, grn_ref, [x, w, b, eps], f"{needs}[{name}]", rtol=1e-5)


def test_empty_inputs(backend):
    """No rows (N = 0) or no samples (B = 0): an empty output; the parameter gradients are zero."""
    device, _ = backend
    for shape in [(2, 0, 5), (0, 3, 5), (0, 0, 5)]:
        x = _randn(*shape, device=device)
        w, b = _randn(5, device=device, seed=1), _randn(5, device=device, seed=2)
        out = grn(x, w, b)
        assert out.shape == shape and out.dtype == x.dtype
        out.sum().backward()
        assert x.grad.shape == shape and w.grad.eq(0).all() and b.grad.eq(0).all()


def test_non_contiguous_inputs(backend):
    device, name = backend
    x = _randn(2, 7, 26, device=device, grad=False)[:, :, ::2]  # [2, 7, 13], channel stride 2
    xt = _randn(2, 13, 7, device=device, seed=3, grad=False).transpose(1, 2)  # [2, 7, 13], row stride 1
    w, b = _randn(13, 2, device=device, seed=1, grad=False)[:, 0], _randn(13, device=device, seed=2)  # w stride 2
    for xs in (x, xt):
        assert not xs.is_contiguous()
        check_against_reference(grn, grn_ref, [xs.requires_grad_(), w.requires_grad_(), b, EPS], f"strided[{name}]")
    # an expanded (stride 0) upstream gradient, as .sum() gives
    gx, gw = torch.autograd.grad(grn(x, w, b).sum(), (x, w))
    rx, rw = torch.autograd.grad(grn_ref(x, w, b).sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_autocast_leaves_the_inputs_as_they_are(backend):
    """Under bf16 autocast (the model's case: bf16 activations, fp32 parameters) the op is not recast: same values
    and gradients as without autocast, bf16 out and dx, fp32 parameter gradients."""
    device, name = backend
    x, w, b, eps = _problem(2, 9, 24, device, dtype=torch.bfloat16, wdtype=torch.float32)
    g = _randn(2, 9, 24, device=device, seed=7, grad=False).bfloat16()
    plain = grn(x, w, b, eps)
    expected = torch.autograd.grad(plain, (x, w, b), g)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = grn(x, w, b, eps)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    grads = torch.autograd.grad(out, (x, w, b), g)
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for a, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_backend_choice(monkeypatch):
    """No C++ kernel: CPU tensors run the torch backend, also with FASTMIM_BACKEND=cpp; float64 runs it always."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend(OP, cpu, (torch.bfloat16, torch.float32)) == "torch"
    assert choose_backend(OP, cpu, (torch.float64,)) == "torch"
    if _skip_reason("cpu", "cpp") is None:
        monkeypatch.setenv("FASTMIM_BACKEND", "cpp")
        assert choose_backend(OP, cpu, (torch.float32,)) == "torch"
    if _skip_reason("cpu", "triton") is None:
        monkeypatch.setenv("FASTMIM_BACKEND", "triton")
        assert choose_backend(OP, cpu, (torch.float32,)) == "triton"
        with pytest.raises(RuntimeError, match="FASTMIM_BACKEND=triton cannot run here: its kernels take float32"):
            grn(*_problem(1, 2, 3, "cpu", dtype=torch.float64))


# ---- torch.library and torch.compile ---------------------------------------------------------------------------


def test_opcheck(backend):
    device, _ = backend
    x, w, b, eps = _problem(2, 5, 7, device, zero_channel=True)
    torch.library.opcheck(torch.ops.fastmim.grn.default, (x, w, b, eps))
    grad = _randn(2, 5, 7, device=device, seed=4, grad=False)
    for flags in [(True, True, True), (False, True, False), (True, False, True), (False, False, True)]:
        args = (grad, x.detach(), w.detach(), eps, *flags)
        torch.library.opcheck(torch.ops.fastmim.grn_backward.default, args)


def test_compile_fullgraph(backend):
    """grn in an MLP-like block under torch.compile(fullgraph=True): eager's values and gradients."""
    device, name = backend
    x, w, b, eps = _problem(2, 9, 12, device)

    def block(x, w, b):
        return x + grn(torch.nn.functional.gelu(x * 2), w, b, eps)

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    check_against_reference(compiled, block, [x, w, b], f"compiled[{name}]")


def test_compile_with_frozen_parameters_and_a_strided_input(backend):
    """Inductor checks what the fake kernels promise: the backward's unused weight and bias gradients were one empty
    tensor (two outputs aliasing: refused), and the torch backend's output followed a strided x's layout where the
    fake is contiguous (a stride assertion)."""
    device, name = backend
    x, w, b, eps = _problem(2, 9, 12, device)
    w, b = w.detach(), b.detach()  # frozen: only x needs a gradient
    strided = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [B, N, C] of a [B, C, N]
    assert not strided.is_contiguous()

    def fn(x):
        return grn(x, w, b, eps)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    torch._dynamo.reset()
    for inp in (x, strided):
        out = compiled(inp)
        torch.testing.assert_close(out, grn_ref(inp, w, b, eps), rtol=1e-5, atol=1e-5)
        (got,) = torch.autograd.grad(out.square().sum(), inp)
        (want,) = torch.autograd.grad(grn_ref(inp, w, b, eps).square().sum(), inp)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    c=st.integers(1, 70),
    zero=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(backend, b, n, c, zero, seed):
    device, name = backend
    inputs = _problem(b, n, c, device, seed=seed, zero_channel=zero)
    check_against_reference(grn, grn_ref, inputs, f"hypothesis[{name}]", rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 76, 2048), (64, 1254, 512)], ids=["stage3", "stage0"])
def test_fcmae_shapes_on_cuda(monkeypatch, shape):
    """FCMAE ConvNeXtV2-Base hidden activations (bf16, fp32 parameters) on the GPU with the default row splits and
    channel groups: the Triton kernels against the reference by the 2x-PyTorch-error rule."""
    monkeypatch.setenv("FASTMIM_BACKEND", "triton")
    b, n, c = shape
    inputs = _problem(b, n, c, "cuda", dtype=torch.bfloat16, wdtype=torch.float32, zero_channel=True)
    check_against_reference(grn, grn_ref, inputs, f"cuda {shape}")


# ---- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    x, w, b, _ = _problem(2, 5, 7, "cpu")
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\] \(N rows per sample\), got shape \(10, 7\)"):
        grn(x.detach().view(10, 7), w, b)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        grn(x.detach().long(), w, b)
    with pytest.raises(ValueError, match=r"x has no channels"):
        grn(x.detach()[:, :, :0], w[:0], b[:0])
    with pytest.raises(ValueError, match=r"weight has shape \(6,\), expected \[C\] = \[7\]"):
        grn(x, w.detach()[:6], b)
    with pytest.raises(ValueError, match=r"bias has shape \(1, 7\), expected \[C\] = \[7\]"):
        grn(x, w, b.detach()[None])
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        grn(x, torch.ones(7, dtype=torch.int32), b)
    with pytest.raises(TypeError, match="bias must be a tensor, got NoneType"):
        grn(x, w, None)
    with pytest.raises(ValueError, match="weight is on meta, the other inputs on cpu"):
        grn(x, w.detach().to("meta"), b)
    with pytest.raises(ValueError, match="bias is on meta"):
        grn(x, w, b.detach().to("meta"))
    for eps in (-1e-6, float("nan"), float("inf"), "1e-6", True):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            grn(x, w, b, eps)
    from fastmim.ops import GRN

    with pytest.raises(ValueError, match=r"GRN\(24\) takes channels-last .* pass x.permute\(0, 2, 3, 1\)"):
        GRN(24)(torch.randn(2, 24, 4, 4))  # ConvNeXt's NCHW given to the channels-last module
    assert GRN(24)(torch.randn(2, 4, 4, 24)).shape == (2, 4, 4, 24)


# ---- the Triton kernels directly -------------------------------------------------------------------------------


@pytest.mark.parametrize(("splits", "groups"), [(1, 1), (2, 3), (5, 2), (100, 100)])
def test_triton_row_splits_and_channel_groups(splits, groups):
    """The kernels give the reference's values however the rows are split (partial sums) and the channels grouped
    (programs that each loop over part of C)."""
    why = _skip_reason("cpu", "triton")
    if why:
        pytest.skip(why)
    from fastmim.ops.triton import grn as kernels

    x, w, b, eps = (t.detach() if isinstance(t, torch.Tensor) else t for t in _problem(2, 45, 300, "cpu", seed=3))
    x[1, :, 7] = 0
    g = _randn(2, 45, 300, seed=8, grad=False)
    torch.testing.assert_close(kernels.grn_fwd(x, w, b, eps, splits, groups), grn_ref(x, w, b, eps))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    expected = torch.autograd.grad(grn_ref(*leaves, eps), leaves, g)
    got = kernels.grn_bwd(g, x, w, eps, True, True, True, splits, groups)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
