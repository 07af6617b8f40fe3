"""Every public fused op under torch.compile with dynamic shapes (``dynamic=True``; what torch.compile switches to by
itself after a second batch size, e.g. an epoch's last partial batch): one graph serves two problem sizes, with the
values and gradients of eager mode at both. The custom ops' fake kernels and autograd formulas are what is traced;
aot_eager runs the traced graphs (inductor's CPU code is tested elsewhere: test_compile_layout.py)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental import _config as fx_config

import fastmim.ops as ops
from fastmim.ops import SparseLayout
from tests.ops.helpers import check_against_reference


def _rand(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _ids(b, n, k, seed=0):
    g = torch.Generator().manual_seed(seed + b * 31 + n)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])


def _mask(b, n, seed=0):
    g = torch.Generator().manual_seed(seed + b * 7 + n)
    m = (torch.rand(b, n, generator=g) < 0.6).float()
    m[:, 0] = 1.0
    return m


def _restore(b, n, seed=0):
    return torch.argsort(torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(seed + i)) for i in
                                      range(b)]), dim=1)  # fmt: skip


def _sparse(b, h, w, c):
    active = torch.rand(b, h, w, generator=torch.Generator().manual_seed(b + h)) < 0.6
    active[:, 0, 0] = True
    layout = SparseLayout.from_mask(active)
    return [_rand(layout.num_rows, c), layout.neighbors(3), _rand(c, 1, 3, 3), _rand(c)]


# name -> (function of the inputs returning a tensor, inputs at a small size, inputs at a larger size)
CASES = {
    "gather_visible": (
        lambda x, ids: ops.gather_visible(x, ids) * 2,
        lambda b, n: [_rand(b, n, 8), _ids(b, n, n // 3)],
    ),
    "scatter_masked": (
        lambda x, ids, tok, pos, cls: ops.scatter_masked(x, ids, tok, pos, cls) * 2,
        lambda b, n: [_rand(b, n // 4, 8), _restore(b, n), _rand(8), _rand(n + 1, 8), _rand(b, 1, 8)],
    ),
    "masked_mse_loss": (
        lambda pred, imgs, mask: ops.masked_mse_loss(pred, imgs, mask, 4),
        lambda b, n: [_rand(b, n, 48), _rand(b, 3, 8, 4 * n // 2, grad=False), _mask(b, n)],
    ),
    "masked_mse_loss_patchified": (
        ops.masked_mse_loss_patchified,
        lambda b, n: [_rand(b, n, 12), _rand(b, n, 12, grad=False), _mask(b, n)],
    ),
    "patchify_unpatchify": (
        lambda x: ops.unpatchify(ops.patchify(x, 4) * 2, 4, (x.shape[2] // 4, x.shape[3] // 4), 3),
        lambda b, n: [_rand(b, 3, 8, 4 * n // 2)],
    ),
    "grn": (
        lambda x, w, bias: ops.grn(x, w, bias, 1e-6),
        lambda b, n: [_rand(b, n, 12), _rand(12), _rand(12)],
    ),
    "add_layer_norm": (
        lambda x, r, w, bias: torch.cat(ops.add_layer_norm(x, r, w, bias, 1e-6), dim=-1),
        lambda b, n: [_rand(b, n, 12), _rand(b, n, 12), _rand(12), _rand(12)],
    ),
    "layer_norm": (
        lambda x, w, bias: ops.layer_norm(x, w, bias, 1e-6),
        lambda b, n: [_rand(b, n, 12), _rand(12), _rand(12)],
    ),
    "bias_gelu": (ops.bias_gelu, lambda b, n: [_rand(b, n, 24), _rand(24)]),
    "attention": (ops.attention, lambda b, n: [_rand(b, n, 3, 2, 8)]),
    "hog_target": (
        lambda pred, imgs, mask: (pred - ops.hog_target(imgs, mask)).square().sum(),
        lambda b, n: [
            _rand(b, n // 4, 108),
            _rand(b, 3, 32, 16 * (n // 8), grad=False),
            _mask(b, n // 4) > 0.5,
        ],  # fmt: skip
    ),
    "fft_loss": (
        lambda pred, target, mask: ops.fft_loss(pred, target, mask, 8),
        lambda b, n: [_rand(b, 3, 16, 16), _rand(b, 3, 16, 16, grad=False), _mask(b, 4)],
    ),
    "patch_fft_loss": (
        lambda pred, imgs, mask: ops.patch_fft_loss(pred, imgs, mask, 8),
        lambda b, n: [_rand(b, n // 4 * 2, 192), _rand(b, 3, 16, 8 * (n // 4), grad=False), _mask(b, n // 4 * 2)],
    ),
    "low_pass_target": (
        lambda pred, imgs: (pred - ops.low_pass_target(imgs, 3.0)).square().sum(),
        lambda b, n: [_rand(b, 3, 16, n), _rand(b, 3, 16, n, grad=False)],
    ),
    "sparse_dwconv": (ops.sparse_dwconv, lambda b, n: _sparse(b, 4, n // 2, 6)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_dynamic_graph_serves_two_sizes(name):
    fn, make = CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    # no duck sizing: sizes that happen to be equal in the first problem (B and H, H and W) stay separate symbols
    with fx_config.patch(use_duck_shape=False):
        check_against_reference(compiled, fn, make(2, 16), f"{name} B=2 n=16", rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a specialised size would recompile here
            check_against_reference(compiled, fn, make(3, 24), f"{name} B=3 n=24", rtol=1e-5)
