"""gather_visible and scatter_masked: every backend against the reference (values and all gradients), odd shapes,
low precision, non-contiguous inputs, bad inputs, opcheck, torch.compile and hypothesis-generated shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmim import _ext
from fastmim.masking import random_masking
from fastmim.ops import gather_visible, gather_visible_ref, scatter_masked, scatter_masked_ref
from tests.ops.helpers import check_against_reference, compile_backend


def _ids_keep(b: int, n: int, k: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]).to(device)


def _ids_restore(b: int, n: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g).argsort(1).argsort(1).to(device)


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)


# (B, N, D, K): N=197 as a ViT-B sequence with its class token, D=59 prime, K=1 and K=N-1, batch 1
GATHER_SHAPES = [(1, 197, 59, 1), (2, 197, 59, 196), (3, 16, 8, 5), (2, 49, 130, 12)]


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gather_visible_matches_reference(backend, shape, dtype):
    device, name = backend
    b, n, d, k = shape
    x = _randn(b, n, d, dtype=dtype, device=device)
    ids = _ids_keep(b, n, k, device)
    check_against_reference(gather_visible, gather_visible_ref, [x, ids], f"gather[{name}]")


# (B, N, K, D, cls, pos, pos requires grad)
SCATTER_CASES = [
    (2, 196, 49, 59, True, True, False),  # MAE decoder: 197 rows with the class token, frozen pos embedding
    (1, 196, 1, 59, True, True, True),  # K=1, batch 1, learnable pos embedding
    (3, 17, 16, 8, False, True, True),  # K=N-1, no class token
    (2, 13, 5, 130, True, False, False),  # no pos embedding, D above one tile
    (2, 10, 3, 7, False, False, False),
]


@pytest.mark.parametrize("case", SCATTER_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "bf16+fp32"])
def test_scatter_masked_matches_reference(backend, case, dtypes):
    device, name = backend
    b, n, k, d, has_cls, has_pos, pos_grad = case
    xdt = torch.float32 if dtypes == "fp32" else torch.bfloat16
    pdt = torch.bfloat16 if dtypes == "bf16" else torch.float32  # "bf16+fp32": autocast activations, fp32 params
    x = _randn(b, k, d, dtype=xdt, device=device, seed=1)
    ids = _ids_restore(b, n, device, seed=2)
    mt = _randn(1, 1, d, dtype=pdt, device=device, seed=3)
    pos = _randn(1, n + has_cls, d, dtype=pdt, device=device, seed=4, grad=pos_grad) if has_pos else None
    cls = _randn(b, 1, d, dtype=xdt, device=device, seed=5) if has_cls else None
    check_against_reference(scatter_masked, scatter_masked_ref, [x, ids, mt, pos, cls], f"scatter[{name}]")


def test_scatter_masked_broadcast_class_token(backend):
    device, _ = backend
    x = _randn(3, 4, 6, device=device)
    ids = _ids_restore(3, 9, device)
    mt, cls = _randn(6, device=device, seed=1), _randn(1, 1, 6, device=device, seed=2)
    pos = _randn(10, 6, device=device, seed=3)
    check_against_reference(scatter_masked, scatter_masked_ref, [x, ids, mt, pos, cls], "broadcast cls")


def test_mae_masks_round_trip(backend):
    """gather then scatter with MAE's own masks puts every visible token back where it was."""
    device, _ = backend
    x = _randn(4, 20, 12, device=device, grad=False)
    info = random_masking(4, 20, 0.6, device=device)
    vis = gather_visible(x, info.ids_keep)
    out = scatter_masked(vis, info.ids_restore, torch.zeros(12, device=device))
    keep = (info.mask == 0).unsqueeze(-1)
    torch.testing.assert_close(out * keep, x * keep, rtol=0, atol=0)
    assert (out[~keep.expand_as(out)] == 0).all()


def test_non_contiguous_inputs(backend):
    device, _ = backend
    base = _randn(2, 30, 16, device=device, grad=False)
    x = base.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, [N, B, D] memory
    assert not x.is_contiguous()
    ids = _ids_keep(2, 30, 14, device)[:, ::2]  # a strided view
    assert not ids.is_contiguous()
    check_against_reference(gather_visible, gather_visible_ref, [x, ids], "strided gather")
    xv = _randn(2, 16, 9, device=device)[:, ::2]  # [2, 8, 9], strided
    rid = _ids_restore(2, 11, device).t().contiguous().t()
    pos = _randn(12, 18, device=device, grad=False)[:, ::2]
    mt = _randn(9, device=device, seed=7)
    cls = _randn(2, 1, 9, device=device, seed=8)
    check_against_reference(scatter_masked, scatter_masked_ref, [xv, rid, mt, pos, cls], "strided scatter")


@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_opcheck(backend, op):
    device, _ = backend
    if op == "gather":
        x = _randn(2, 11, 7, device=device)
        args = (x, _ids_keep(2, 11, 4, device))
        torch.library.opcheck(torch.ops.fastmim.gather_visible.default, args)
        grad = _randn(2, 4, 7, device=device, grad=False)
        torch.library.opcheck(torch.ops.fastmim.gather_visible_backward.default, (grad, args[1], 11))
    else:
        args = (_randn(2, 4, 7, device=device), _ids_restore(2, 11, device), _randn(7, device=device, seed=1),
                _randn(12, 7, device=device, seed=2), _randn(2, 7, device=device, seed=3))  # fmt: skip
        torch.library.opcheck(torch.ops.fastmim.scatter_masked.default, args)
        torch.library.opcheck(torch.ops.fastmim.scatter_masked.default, (*args[:3], None, None))
        grad = _randn(2, 12, 7, device=device, grad=False)
        for need_pos in (True, False):
            for cls_rows in (2, 1):  # per-sample class token, broadcast one
                bwd_args = (grad, args[1], 4, True, need_pos, torch.float32, torch.bfloat16, cls_rows)
                torch.library.opcheck(torch.ops.fastmim.scatter_masked_backward.default, bwd_args)


def test_compile_fullgraph(backend):
    """The ops under torch.compile(fullgraph=True): the same values and gradients as eager."""
    device, name = backend

    def decoder_input(x, ids_keep, ids_restore, mt, pos):
        vis = gather_visible(x, ids_keep)  # [B, K, D]
        return scatter_masked(vis * 2, ids_restore, mt, pos, x[:, :1])

    info = random_masking(2, 12, 0.75, device=device)
    inputs = [_randn(2, 12, 5, device=device), info.ids_keep, info.ids_restore, _randn(5, device=device, seed=1),
              _randn(13, 5, device=device, seed=2)]  # fmt: skip
    compiled = torch.compile(decoder_input, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    check_against_reference(compiled, decoder_input, inputs, f"compiled[{name}]")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    n=st.integers(2, 40),
    d=st.integers(1, 70),
    frac=st.floats(0.0, 1.0),
    has_cls=st.booleans(),
    has_pos=st.booleans(),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(backend, b, n, d, frac, has_cls, has_pos, bf16, seed):
    device, name = backend
    k = min(n - 1, max(1, round(frac * n)))
    dt = torch.bfloat16 if bf16 else torch.float32
    x = _randn(b, n, d, dtype=dt, device=device, seed=seed)
    check_against_reference(gather_visible, gather_visible_ref, [x, _ids_keep(b, n, k, device, seed)], "gather")
    inputs = [_randn(b, k, d, dtype=dt, device=device, seed=seed + 1), _ids_restore(b, n, device, seed),
              _randn(d, device=device, seed=seed + 2),
              _randn(n + has_cls, d, device=device, seed=seed + 3) if has_pos else None,
              _randn(b, 1, d, dtype=dt, device=device, seed=seed + 4) if has_cls else None]  # fmt: skip
    check_against_reference(scatter_masked, scatter_masked_ref, inputs, f"scatter[{name}]")


def test_double_backward(backend):
    """gather_visible's and scatter_masked's backwards are linear and differentiable (each one's backward is the op
    again): second derivatives equal the reference's (tests/ops/test_second_derivative.py: all ops)."""
    device, _ = backend
    x = _randn(2, 9, 4, device=device)
    ids = _ids_keep(2, 9, 3, device)
    g = torch.autograd.grad(gather_visible(x, ids).square().sum(), x, create_graph=True)[0]
    (gg,) = torch.autograd.grad(g.sum(), x)
    want = torch.zeros_like(x)
    want[torch.arange(2, device=device).unsqueeze(1), ids] = 2.0  # d/dx of sum(2 x) over the kept rows
    torch.testing.assert_close(gg, want)
    xv, mt = _randn(2, 3, 4, device=device), _randn(4, device=device, seed=1)
    ids = _ids_restore(2, 9, device)
    second = []
    for fn in (scatter_masked, scatter_masked_ref):
        g = torch.autograd.grad(fn(xv, ids, mt).pow(3).sum(), (xv, mt), create_graph=True)
        second.append(torch.autograd.grad(sum(t.square().sum() for t in g), (xv, mt)))
    for got, want in zip(*second, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 16])
def test_ids_out_of_range_raise(backend, bad):
    device, _ = backend
    if device.type != "cpu":
        pytest.skip("ids are checked on CPU tensors only (a check on CUDA would cost a host sync)")
    x = _randn(2, 16, 4, device=device)
    ids = _ids_keep(2, 16, 5, device)
    ids[1, 3] = bad
    with pytest.raises(IndexError, match=r"ids_keep\[1, 3\] = .* out of range \[0, 16\)"):
        gather_visible(x, ids)
    rid = _ids_restore(2, 16, device)
    rid[0, 2] = bad
    with pytest.raises(IndexError, match=r"ids_restore\[0, 2\] = .* out of range"):
        scatter_masked(x[:, :4], rid, torch.zeros(4, device=device))


def test_repeated_ids_raise(backend):
    device, _ = backend
    if device.type != "cpu":
        pytest.skip("ids are checked on CPU tensors only (a check on CUDA would cost a host sync)")
    x = _randn(1, 8, 4, device=device)
    with pytest.raises(ValueError, match="repeats index 3"):
        gather_visible(x, torch.tensor([[3, 1, 3]], device=device))
    with pytest.raises(ValueError, match="repeats index 0"):
        scatter_masked(x[:, :2], torch.zeros(1, 8, dtype=torch.long, device=device), torch.zeros(4, device=device))


def test_wrong_dtype_shape_device_raise():
    x = torch.randn(2, 8, 4)
    ids = _ids_keep(2, 8, 3, "cpu")
    with pytest.raises(TypeError, match="ids_keep must be int64"):
        gather_visible(x, ids.float())
    with pytest.raises(TypeError, match="x must be a floating-point"):
        gather_visible(x.long(), ids)
    with pytest.raises(ValueError, match=r"x must be \[B, N, D\]"):
        gather_visible(x[0], ids)
    with pytest.raises(ValueError, match="ids_keep has shape"):
        gather_visible(x, ids[:1])
    with pytest.raises(ValueError, match="ids_keep is on meta"):
        gather_visible(x, ids.to("meta"))
    rid = _ids_restore(2, 8, "cpu")
    with pytest.raises(ValueError, match="mask_token has shape"):
        scatter_masked(x[:, :3], rid, torch.zeros(5))
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 8, 4\), expected \[9, 4\].*row for it"):
        scatter_masked(x[:, :3], rid, torch.zeros(4), torch.zeros(1, 8, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"ids_restore says N = 3 positions: .* should be \[B, 8\] .*not ids_keep"):
        scatter_masked(x[:, :3], rid[:, :3], torch.zeros(4), torch.zeros(1, 9, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="cls_token has shape"):
        scatter_masked(x[:, :3], rid, torch.zeros(4), None, torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="fewer than the 3 visible"):
        scatter_masked(x[:, :3], rid[:, :2], torch.zeros(4))
    with pytest.raises(ValueError, match="x_vis has no channels"):
        scatter_masked(x[:, :3, :0], rid, torch.zeros(0))
    with pytest.raises(ValueError, match="mask_token is on meta"):
        scatter_masked(x[:, :3], rid, torch.zeros(4, device="meta"))


@pytest.mark.skipif(not _ext.available(), reason=f"fastmim._C not built ({_ext.load_error})")
def test_cpp_kernels_check_ids_themselves():
    """The C++ side never trusts the Python checks: bad ids raise ValueError there too, never read out of bounds."""
    from fastmim.ops import _cpu

    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="out of range"):
        _cpu.gather_visible(x, torch.tensor([[0, 9], [1, 2]]))
    with pytest.raises(ValueError, match="out of range"):
        _cpu.gather_visible_backward(x[:, :2], torch.tensor([[0, -1], [1, 2]]), 8)
    with pytest.raises(ValueError, match="out of range"):
        _cpu.scatter_masked(x[:, :2], torch.tensor([[0, 1, 8], [0, 1, 2]]), torch.zeros(4), None, None, torch.float32)


def test_triton_kernels_are_memory_safe_on_bad_ids():
    """Without a host sync there is no error to raise on CUDA: bad ids give NaN rows and are skipped backward."""
    from tests.ops.conftest import _skip_reason

    why = _skip_reason("cpu", "triton")
    if why:
        pytest.skip(why)
    from fastmim.ops.triton import tokens

    x = torch.randn(2, 8, 4)
    out = tokens.gather_visible(x, torch.tensor([[0, 9], [1, -3]]))
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 1]).all()
    torch.testing.assert_close(out[:, 0], x[[0, 1], [0, 1]])
    g = tokens.gather_visible_backward(torch.ones(2, 2, 4), torch.tensor([[0, 9], [1, -3]]), 8)
    assert g.sum() == 8 and g[0, 0].eq(1).all() and g[1, 1].eq(1).all()
    dec = tokens.scatter_masked(x[:, :2], torch.tensor([[0, 1, 99], [2, 1, 0]]), torch.zeros(4), None, None, x.dtype)
    assert torch.isnan(dec[0, 2]).all() and not torch.isnan(dec[1]).any()


@pytest.mark.parametrize("per_sample_cls", [True, False])
def test_triton_token_kernels_slice_a_batch_past_the_grid_limit(monkeypatch, per_sample_cls):
    """The batch is grid axis 1, which stops at 65535 programs on CUDA: a larger batch (I-JEPA gathers batch x
    targets rows) is launched in slices, here with the limit lowered to 2 samples for a batch of 5."""
    from tests.ops.conftest import _skip_reason

    why = _skip_reason("cpu", "triton")
    if why:
        pytest.skip(why)
    from fastmim.ops.triton import tokens

    monkeypatch.setattr(tokens, "MAX_GRID_Y", 2)
    x = _randn(5, 9, 6, grad=False)
    ids = _ids_keep(5, 9, 4, "cpu")
    torch.testing.assert_close(tokens.gather_visible(x, ids), gather_visible_ref(x, ids), rtol=0, atol=0)
    g = _randn(5, 4, 6, seed=1, grad=False)
    expected = torch.zeros(5, 9, 6).scatter_(1, ids.unsqueeze(-1).expand(-1, -1, 6), g)
    torch.testing.assert_close(tokens.gather_visible_backward(g, ids, 9), expected, rtol=0, atol=0)
    restore = _ids_restore(5, 9, "cpu", seed=2)
    xv, mt, pos = _randn(5, 4, 6, seed=3, grad=False), _randn(6, seed=4, grad=False), _randn(10, 6, seed=5, grad=False)
    cls = _randn(5 if per_sample_cls else 1, 1, 6, seed=6, grad=False)
    got = tokens.scatter_masked(xv, restore, mt, pos, cls.view(-1, 6), torch.float32)
    torch.testing.assert_close(got, scatter_masked_ref(xv, restore, mt, pos, cls), rtol=1e-6, atol=1e-6)
    # the backward: every sample's gradient, with the batch chunks made larger instead (a constexpr: no slicing)
    gd = _randn(5, 10, 6, seed=7, grad=False)
    gx, gmt, gpos = tokens.scatter_masked_backward(gd, restore, 4, True, True, torch.float32, (4, 8, 1, 4))
    xr, mr, pr = xv.clone().requires_grad_(), mt.clone().requires_grad_(), pos.clone().requires_grad_()
    torch.autograd.backward(scatter_masked_ref(xr, restore, mr, pr, cls), gd)
    torch.testing.assert_close((gx, gmt, gpos), (xr.grad, mr.grad, pr.grad), rtol=1e-5, atol=1e-5)
