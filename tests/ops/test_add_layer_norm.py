"""add_layer_norm (a pre-norm block's residual add fused with the LayerNorm after it): the reference against
nn.LayerNorm, every backend against the reference (values and every gradient, from y and from s, low precision with
the model's dtypes, gradient subsets, strides, autocast), empty and bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastmim.ops import add_layer_norm, add_layer_norm_ref
from fastmim.ops._dispatch import choose_backend
from tests.ops.conftest import _skip_reason
from tests.ops.helpers import check_against_reference, compile_backend

OP = "add_layer_norm"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)
EPS = 1e-6


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, grad=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)


def _problem(shape, device, x_dtype=torch.float32, r_dtype=None, w_dtype=None, seed=0):
    """[x, residual, weight, bias]: a branch output, the residual stream (offset, as a real stream is), the affine
    parameters (around 1 and 0)."""
    c = shape[-1]
    x = _randn(*shape, dtype=x_dtype, device=device, seed=seed)
    r = (_randn(*shape, device=device, seed=seed + 1, grad=False) * 2 + 0.5).to(r_dtype or x_dtype).requires_grad_()
    w = (_randn(c, device=device, seed=seed + 2, grad=False) * 0.2 + 1).to(w_dtype or x_dtype).requires_grad_()
    b = _randn(c, dtype=w_dtype or x_dtype, device=device, seed=seed + 3, scale=0.1)
    return [x, r, w, b]


def _both(fn, **kw):
    """One output for the shared checks: y and s side by side (in fp32), so gradients flow in from both."""

    def f(x, r, w, b):
        y, s = fn(x, r, w, b, EPS, **kw)
        return torch.cat([y.float().flatten(), s.float().flatten() * 0.5])

    return f


# ---- the reference -----------------------------------------------------------------------------------------------


def test_reference_is_the_add_and_nn_layer_norm():
    x, r, w, b = _problem((2, 5, 16), "cpu")
    ln = torch.nn.LayerNorm(16, eps=EPS)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b)
    y, s = add_layer_norm_ref(x, r, w, b, EPS)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, ln(x + r), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s32 = add_layer_norm_ref(x.bfloat16(), r, w, b, EPS)
    assert y16.dtype == torch.bfloat16 and s32.dtype == torch.float32  # y in the dtype the next matmul wants


# ---- every backend against the reference -------------------------------------------------------------------------

SHAPES = [(2, 37, 59), (1, 1, 3), (3, 5, 300), (7, 768), (4, 9, 130)]  # (C = 1 is degenerate: xhat = 0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, shape):
    device, name = backend
    check_against_reference(_both(add_layer_norm), _both(add_layer_norm_ref), _problem(shape, device),
                            f"fp32[{name}]", rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("dtypes", ["bf16-stream-fp32", "bf16", "fp16"])
def test_low_precision_matches_reference(backend, dtypes):
    """``bf16-stream-fp32``: the model under autocast: bf16 branch output, fp32 residual stream and parameters, y
    in bf16. The others: everything in one low-precision dtype."""
    device, name = backend
    if dtypes == "bf16-stream-fp32":
        inputs = _problem((3, 11, 96), device, torch.bfloat16, torch.float32, torch.float32)
        kw = {"out_dtype": torch.bfloat16}
    else:
        inputs = _problem((3, 11, 96), device, torch.bfloat16 if dtypes == "bf16" else torch.float16)
        kw = {}
    check_against_reference(_both(add_layer_norm, **kw), _both(add_layer_norm_ref, **kw), inputs, f"{dtypes}[{name}]")
    y, s = add_layer_norm(*inputs, EPS, **kw)
    ry, rs = add_layer_norm_ref(*inputs, EPS, **kw)
    assert (y.dtype, s.dtype) == (ry.dtype, rs.dtype)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)  # the add rounds once, as the unfused add does


@pytest.mark.parametrize("used", ["y", "s"])
def test_one_output_used(backend, used):
    """A final norm uses only y (no gradient comes into s: none is read); a stream whose norm output is dropped uses
    only s (the add's gradient)."""
    device, name = backend
    inputs = _problem((4, 6, 40), device)
    if used == "s":  # the norm's parameters get no gradient (None) from s alone, in both
        inputs[2].requires_grad_(False), inputs[3].requires_grad_(False)

    def pick(fn):
        return lambda *a: fn(*a, EPS)[0 if used == "y" else 1]

    check_against_reference(pick(add_layer_norm), pick(add_layer_norm_ref), inputs, f"{used}[{name}]", rtol=1e-5)


@pytest.mark.parametrize("needs", ["x", "residual", "weight+bias", "x+weight"])
def test_gradient_subsets(backend, needs):
    device, name = backend
    x, r, w, b = _problem((2, 9, 33), device)
    for t, key in ((x, "x"), (r, "residual"), (w, "weight"), (b, "bias")):
        t.requires_grad_(key in needs)
    check_against_reference(_both(add_layer_norm), _both(add_layer_norm_ref), [x, r, w, b], f"{needs}[{name}]",
                            rtol=1e-5)  # fmt: skip


def test_non_contiguous_and_empty_inputs(backend):
    device, name = backend
    x = _randn(2, 13, 7, device=device, grad=False).transpose(1, 2)  # [2, 7, 13], not contiguous
    _, r, w, b = _problem((2, 7, 13), device)
    assert not x.is_contiguous()
    check_against_reference(_both(add_layer_norm), _both(add_layer_norm_ref), [x.requires_grad_(), r, w, b],
                            f"strided[{name}]", rtol=1e-5)  # fmt: skip
    # expanded (stride 0) upstream gradients, as .sum() gives
    got = torch.autograd.grad(sum(t.sum() for t in add_layer_norm(x, r, w, b)), (x, r, w, b))
    want = torch.autograd.grad(sum(t.sum() for t in add_layer_norm_ref(x, r, w, b)), (x, r, w, b))
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    x, r, w, b = _problem((0, 5), device)
    y, s = add_layer_norm(x, r, w, b)
    assert y.shape == s.shape == (0, 5)
    (y.sum() + s.sum()).backward()
    assert x.grad.shape == (0, 5) and w.grad.eq(0).all() and b.grad.eq(0).all()


def test_autocast_gives_y_in_the_autocast_dtype(backend):
    """Under autocast the inputs are used as given and y comes out in the autocast dtype; outside it, in s's."""
    device, name = backend
    x, r, w, b = _problem((2, 4, 24), device, torch.bfloat16, torch.float32, torch.float32)
    y, s = add_layer_norm(x, r, w, b)
    assert y.dtype == s.dtype == torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y16, s16 = add_layer_norm(x, r, w, b)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    torch.testing.assert_close(y16, y.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(s16, s, rtol=0, atol=0)


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend(OP, cpu, (torch.float32,)) == "torch"
    if _skip_reason("cpu", "triton") is None:
        monkeypatch.setenv("FASTMIM_BACKEND", "triton")
        assert choose_backend(OP, cpu, (torch.bfloat16, torch.float32)) == "triton"


def test_bad_inputs_raise():
    x, r, w, b = _problem((2, 3, 8), "cpu")
    with pytest.raises(ValueError, match="residual has shape"):
        add_layer_norm(x, r[:, :2], w, b)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \[C\] = \[8\]"):
        add_layer_norm(x, r, w[:7], b)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        add_layer_norm(x.long(), r, w, b)
    with pytest.raises(ValueError, match="eps must be a finite float"):
        add_layer_norm(x, r, w, b, eps=float("nan"))
    with pytest.raises(TypeError, match="bias must be a tensor"):
        add_layer_norm(x, r, w, None)


# ---- torch.library and torch.compile ---------------------------------------------------------------------------


def test_opcheck(backend):
    device, _ = backend
    x, r, w, b = _problem((6, 10), device, torch.bfloat16, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.fastmim.add_layer_norm.default, (x, r, w, b, EPS, torch.bfloat16))
    y, s, mean, rstd = torch.ops.fastmim.add_layer_norm(x, r, w, b, EPS, torch.bfloat16)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    for has_ds, need_w, need_b in [(True, True, True), (False, False, True), (True, False, False)]:
        args = (dy, ds, s.detach(), w.detach(), mean, rstd, has_ds, torch.bfloat16, torch.float32, need_w, need_b)
        torch.library.opcheck(torch.ops.fastmim.add_layer_norm_backward.default, args)


def test_compile_fullgraph(backend):
    """Two pre-norm blocks' adds and norms under torch.compile(fullgraph=True): eager's values and gradients."""
    device, name = backend
    x, r, w, b = _problem((2, 9, 12), device)

    def blocks(x, r, w, b):
        y, s = add_layer_norm(x, r, w, b, EPS)
        y2, s2 = add_layer_norm(torch.nn.functional.gelu(y), s, w, b, EPS)
        return y2 + s2

    compiled = torch.compile(blocks, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    check_against_reference(compiled, blocks, [x, r, w, b], f"compiled[{name}]")
