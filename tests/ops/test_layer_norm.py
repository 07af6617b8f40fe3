"""layer_norm (add_layer_norm's kernels without the add: the LayerNorm written in the next matmul's dtype): the
reference against nn.LayerNorm, every backend against the reference (values and every gradient, low precision with a
model's dtypes, gradient subsets, strides, autocast), empty and bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastmim.ops import add_layer_norm, layer_norm, layer_norm_ref
from tests.ops.helpers import check_against_reference, compile_backend

OP = "add_layer_norm"  # the dispatcher's name for both (no C++ kernel: the backend fixture skips "cpp")
EPS = 1e-6


def _problem(shape, device, x_dtype=torch.float32, w_dtype=None, seed=0):
    """[x, weight, bias]: an activation with an offset (as a conv output has), the affine parameters near 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = (torch.randn(*shape, generator=g) * 1.5 + 0.3).to(device, x_dtype).requires_grad_()
    w = (torch.randn(c, generator=g) * 0.2 + 1).to(device, w_dtype or x_dtype).requires_grad_()
    b = (torch.randn(c, generator=g) * 0.1).to(device, w_dtype or x_dtype).requires_grad_()
    return [x, w, b]


def test_reference_is_nn_layer_norm_cast_to_the_autocast_dtype():
    x, w, b = _problem((2, 5, 16), "cpu")
    ln = torch.nn.LayerNorm(16, eps=EPS)
    with torch.no_grad():
        ln.weight.copy_(w), ln.bias.copy_(b)
    torch.testing.assert_close(layer_norm_ref(x, w, b, EPS), ln(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm_ref(x.bfloat16(), w, b, EPS)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(2, 37, 59), (1, 1, 3), (3, 5, 300), (7, 768), (4, 9, 130)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_matches_reference(backend, shape):
    device, name = backend
    check_against_reference(layer_norm, layer_norm_ref, _problem(shape, device), f"fp32[{name}]", rtol=1e-5)


def test_rows_of_variance_near_eps_match_the_reference(backend):
    """Where eps enters shows only on rows whose variance is about eps (small activations, a zero-initialised residual
    stream early in training): 1 / sqrt(var + eps), nn.LayerNorm's, not 1 / (sqrt(var) + eps)."""
    device, name = backend
    x, w, b = _problem((2, 6, 64), device)
    with torch.no_grad():
        x.mul_(1e-3)  # variance about 2e-6
        x[0, 0] = 0.25  # a constant row (its mean exact in any summation order)
        x[1, 2] = 0.25
        x[1, 2, 5] += 1e-4  # one value off
    check_against_reference(lambda *a: layer_norm(*a, EPS), lambda *a: layer_norm_ref(*a, EPS), [x, w, b],
                            f"near-flat[{name}]", rtol=1e-5)  # fmt: skip
    r = x.detach()[1, 2].cpu().double()  # (the row tells the two apart)
    assert ((r - r.mean()) / (r.var(unbiased=False) + EPS).sqrt()).abs().max() < 0.2
    assert ((r - r.mean()) / (r.var(unbiased=False).sqrt() + EPS)).abs().max() > 7


@pytest.mark.parametrize("dtypes", ["bf16-params-fp32", "bf16", "fp16"])
def test_low_precision_matches_reference(backend, dtypes):
    """``bf16-params-fp32``: a model under autocast (bf16 activation, fp32 parameters, bf16 output)."""
    device, name = backend
    if dtypes == "bf16-params-fp32":
        inputs, kw = _problem((3, 11, 96), device, torch.bfloat16, torch.float32), {"out_dtype": torch.bfloat16}
    else:
        inputs, kw = _problem((3, 11, 96), device, torch.bfloat16 if dtypes == "bf16" else torch.float16), {}

    def op(*a):
        return layer_norm(*a, EPS, **kw)

    def ref(*a):
        return layer_norm_ref(*a, EPS, **kw)

    check_against_reference(op, ref, inputs, f"{dtypes}[{name}]")
    assert op(*inputs).dtype == ref(*inputs).dtype


@pytest.mark.parametrize("needs", ["x", "weight+bias", "x+bias"])
def test_gradient_subsets(backend, needs):
    device, name = backend
    x, w, b = _problem((2, 9, 33), device)
    for t, key in ((x, "x"), (w, "weight"), (b, "bias")):
        t.requires_grad_(key in needs)
    check_against_reference(layer_norm, layer_norm_ref, [x, w, b], f"{needs}[{name}]", rtol=1e-5)


def test_strided_and_empty_inputs(backend):
    device, name = backend
    x = _problem((2, 13, 7), device)[0].detach().transpose(1, 2).requires_grad_()  # [2, 7, 13], not contiguous
    _, w, b = _problem((13,), device, seed=1)
    check_against_reference(layer_norm, layer_norm_ref, [x, w, b], f"strided[{name}]", rtol=1e-5)
    got = torch.autograd.grad(layer_norm(x, w, b).sum(), (x, w, b))  # an expanded (stride 0) upstream gradient
    want = torch.autograd.grad(layer_norm_ref(x, w, b).sum(), (x, w, b))
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    x, w, b = _problem((0, 5), device)
    y = layer_norm(x, w, b)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 5) and w.grad.eq(0).all() and b.grad.eq(0).all()


def test_autocast_gives_the_autocast_dtype_and_the_same_values(backend):
    device, name = backend
    x, w, b = _problem((2, 4, 24), device, torch.bfloat16, torch.float32)
    assert layer_norm(x, w, b).dtype == torch.bfloat16  # outside autocast: x's dtype
    y32 = layer_norm(x, w, b, out_dtype=torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y16 = layer_norm(x, w, b)
        plain = torch.nn.functional.layer_norm(x, (24,), w, b, EPS)  # what it replaces
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16, y32.bfloat16(), rtol=0, atol=0)
    if device.type == "cuda":  # CUDA's autocast runs LayerNorm in fp32 (CPU's keeps bf16)
        assert plain.dtype == torch.float32
        torch.testing.assert_close(y32, plain, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_layer_norm():
    x, w, b = _problem((2, 3, 8), "cpu")
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(7,\), expected \[C\] = \[8\]"):
        layer_norm(x, w[:7], b)
    with pytest.raises(TypeError, match="layer_norm: x must be a floating-point tensor"):
        layer_norm(x.long(), w, b)
    with pytest.raises(ValueError, match="layer_norm: eps must be a finite float"):
        layer_norm(x, w, b, eps=-1.0)
    with pytest.raises(TypeError, match="layer_norm: bias must be a tensor"):
        layer_norm(x, w, None)
    with pytest.raises(ValueError, match=r"C: the last dimension of x, whose shape is \(2, 3, 9\)"):  # x is wrong
        layer_norm(torch.randn(2, 3, 9), w, b)
    for bad in (torch.int32, torch.bool, "bfloat16"):  # an output dtype that would truncate, or a name
        with pytest.raises(TypeError, match="layer_norm: out_dtype must be a floating-point torch.dtype"):
            layer_norm(x, w, b, EPS, bad)
    with pytest.raises(TypeError, match="add_layer_norm: out_dtype must be a floating-point"):
        add_layer_norm(x, x, w, b, EPS, torch.int64)


def test_the_triton_backends_refusal_names_layer_norm(monkeypatch):
    """Forced onto a backend that cannot take the input, layer_norm's error names layer_norm, not the op it shares
    kernels with."""
    monkeypatch.setenv("FASTMIM_BACKEND", "triton")
    x, w, b = (t.detach().double() for t in _problem((2, 3, 8), "cpu"))
    with pytest.raises(Exception, match=r"^layer_norm\b") as err:
        layer_norm(x, w, b)
    assert "add_layer_norm" not in str(err.value)


@pytest.mark.parametrize("forced", ["cpp", "torch"])
def test_layer_norm_runs_where_add_layer_norm_does_when_forced(monkeypatch, forced):
    """layer_norm shares add_layer_norm's backend table: forced onto a backend that add_layer_norm's has no kernel
    for (cpp), it runs the torch path as add_layer_norm does, on the same values."""
    monkeypatch.setenv("FASTMIM_BACKEND", forced)
    x, w, b = _problem((2, 3, 8), "cpu")
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b), rtol=1e-5, atol=1e-5)
    from fastmim.ops import _dispatch

    monkeypatch.setattr("fastmim._ext.available", lambda: False)  # no fastmim._C either: still the torch path
    monkeypatch.setattr(_dispatch, "_choices", {})  # (choices are cached per op, device, dtypes and forcing)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b), rtol=1e-5, atol=1e-5)


def test_meta_tensors_give_shapes_as_nn_layer_norm_does():
    """On the meta device (a model built without memory, shape inference) the norms give their output shapes and
    dtypes; autocast is not asked about a device it does not know."""
    x, w = torch.randn(2, 5, 16, device="meta"), torch.ones(16, device="meta")
    assert layer_norm(x, w, w).shape == (2, 5, 16) and layer_norm_ref(x, w, w).device.type == "meta"
    y, s = add_layer_norm(x, x.bfloat16(), w, w)
    assert y.shape == s.shape == (2, 5, 16) and y.dtype == s.dtype == torch.float32


def test_opcheck_without_a_residual(backend):
    device, _ = backend
    x, w, b = _problem((6, 10), device, torch.bfloat16, torch.float32)
    torch.library.opcheck(torch.ops.fastmim.add_layer_norm.default, (x, None, w, b, EPS, torch.bfloat16))
    y, s, _, _ = torch.ops.fastmim.add_layer_norm(x, None, w, b, EPS, torch.bfloat16)
    assert y.shape == (6, 10) and s.shape == (0, 10)  # no residual stream: s is x, not returned
    _, _, mean, rstd = torch.ops.fastmim.add_layer_norm(x, None, w, b, EPS, torch.bfloat16)
    with pytest.raises(ValueError, match=r"ds has shape \(0, 10\), expected \[6, 10\]"):  # a short one: refused
        torch.ops.fastmim.add_layer_norm_backward(torch.ones_like(y), s, x, w, mean, rstd, True, torch.bfloat16,
                                                  torch.bfloat16, True, True)  # fmt: skip


def test_compile_fullgraph(backend):
    device, name = backend
    x, w, b = _problem((2, 9, 12), device)

    def norm_mlp(x, w, b):
        return torch.nn.functional.gelu(layer_norm(x, w, b, EPS)) * 2

    compiled = torch.compile(norm_mlp, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    check_against_reference(compiled, norm_mlp, [x, w, b], f"compiled[{name}]")
