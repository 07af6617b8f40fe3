"""Second derivatives (create_graph=True, double backward): gather_visible, scatter_masked and patchify / unpatchify
(linear ops) differentiate any number of times, on every backend, to the reference's values; every other op's
backward raises naming the op when differentiated, by ``.backward()`` and by ``torch.autograd.grad`` with respect to
its inputs alike, never a silently missing term (or a "not used in the graph" that ``allow_unused=True`` would turn
into None)."""

from __future__ import annotations

import pytest
import torch

import fastmim.ops as ops
from tests.ops.test_compile_dynamic import CASES, _ids, _rand, _restore

# the target ops give no gradient (the case differentiates around them): nothing to differentiate twice
NO_GRAD_THROUGH = {"hog_target", "low_pass_target"}
TWICE = {
    "gather_visible": (
        lambda x, ids: ops.gather_visible(x, ids) * 2,
        lambda x, ids: ops.gather_visible_ref(x, ids) * 2,
        lambda: [_rand(2, 9, 5), _ids(2, 9, 4)],
    ),
    "scatter_masked": (
        lambda x, ids, tok, pos, cls: ops.scatter_masked(x, ids, tok, pos, cls).square(),
        lambda x, ids, tok, pos, cls: ops.scatter_masked_ref(x, ids, tok, pos, cls).square(),
        lambda: [_rand(2, 3, 5), _restore(2, 9), _rand(5), _rand(10, 5), _rand(2, 1, 5)],
    ),
    "scatter_masked (broadcast class token, no position embedding)": (
        lambda x, ids, tok, cls: ops.scatter_masked(x, ids, tok, None, cls).square(),
        lambda x, ids, tok, cls: ops.scatter_masked_ref(x, ids, tok, None, cls).square(),
        lambda: [_rand(2, 3, 5), _restore(2, 9), _rand(5), _rand(1, 1, 5)],
    ),
    "patchify_unpatchify": (
        lambda x: ops.unpatchify(ops.patchify(x, 4).square(), 4, (2, 3), 3),
        lambda x: ops.unpatchify_ref(ops.patchify_ref(x, 4).square(), 4, (2, 3), 3),
        lambda: [_rand(2, 3, 8, 12)],
    ),
}


def _second(fn, inputs):
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*inputs)
    first = torch.autograd.grad(out.square().sum(), diff, create_graph=True)
    total = sum(g.square().sum() for g in first)
    return torch.autograd.grad(total, diff)


@pytest.mark.parametrize("name", sorted(TWICE))
def test_linear_ops_differentiate_twice_like_the_reference(name, backend):
    fused, ref, make = TWICE[name]
    device, _ = backend
    inputs = [t.detach().to(device).requires_grad_(t.requires_grad) for t in make()]
    for got, want in zip(_second(fused, inputs), _second(ref, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TWICE))
def test_linear_ops_pass_gradgradcheck(name):
    fused, _, make = TWICE[name]
    inputs = [t.detach().double().requires_grad_(True) if t.is_floating_point() else t for t in make()]
    assert torch.autograd.gradgradcheck(fused, inputs)


@pytest.mark.parametrize("name", sorted(set(CASES) - NO_GRAD_THROUGH - {n.split(" ")[0] for n in TWICE}))
@pytest.mark.parametrize("how", ["autograd.grad", "backward"])
def test_a_second_derivative_of_the_other_ops_raises_naming_the_op(name, how):
    fn, make = CASES[name]
    inputs = make(2, 16)
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    first = torch.autograd.grad(fn(*inputs).square().sum(), diff, create_graph=True)
    total = sum(g.square().sum() for g in first)
    names = r"has no second derivative: its backward \(fastmim\.\w+_backward\).*use fastmim\.ops\.\w+_ref"
    with pytest.raises(RuntimeError, match=names):
        if how == "backward":
            total.backward()
        else:
            torch.autograd.grad(total, diff, allow_unused=True)
