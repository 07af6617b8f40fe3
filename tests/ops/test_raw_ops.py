"""The raw custom ops (``torch.ops.fastmim.*``, what torch.compile and exported programs call) check the shapes of
their own arguments: a direct call skips the public functions' checks, and the kernels trust the shapes they are given
(an index tensor with fewer rows than the tokens would be read past its end, in C++ on CPU). Each case here is a
mismatch that the kernels would otherwise have run with; each must raise a ValueError naming the op and the argument,
on every backend."""

from __future__ import annotations

import pytest
import torch

import fastmim.ops  # noqa: F401  (registers torch.ops.fastmim.*)
from fastmim.ops._dispatch import triton_available

HAS_TWINS = getattr(torch.library, "triton_op", None) is not None and triton_available() is None
B, N, K, D = 2, 16, 4, 8
f32, i32 = torch.float32, torch.int32


def _t(*shape, dtype=f32):  # on the default device (the test sets the backend's)
    return torch.zeros(shape, dtype=dtype) if dtype != f32 else torch.randn(shape)


def _ids(b, n):
    return torch.stack([torch.randperm(n) for _ in range(b)])


CASES = {
    "gather_visible: ids_keep has shape (1, 4)": lambda: torch.ops.fastmim.gather_visible(_t(B, N, D), _ids(1, K)),
    "gather_visible_backward: ids_keep has shape (1, 4)": lambda: torch.ops.fastmim.gather_visible_backward(
        _t(B, K, D), _ids(1, K), N
    ),
    "gather_visible_backward: n = 2 is fewer": lambda: torch.ops.fastmim.gather_visible_backward(
        _t(B, K, D), _ids(B, K), 2
    ),
    "scatter_masked: ids_restore has shape (1, 16)": lambda: torch.ops.fastmim.scatter_masked(
        _t(B, K, D), _ids(1, N), _t(D), None, None
    ),
    "scatter_masked: pos_embed has shape (16, 8), expected [17, 8]": lambda: torch.ops.fastmim.scatter_masked(
        _t(B, K, D), _ids(B, N), _t(D), _t(N, D), _t(B, D)
    ),
    "scatter_masked: mask_token has shape (4,)": lambda: torch.ops.fastmim.scatter_masked(
        _t(B, K, D), _ids(B, N), _t(4), None, None
    ),
    "scatter_masked: cls_token has 3 rows": lambda: torch.ops.fastmim.scatter_masked(
        _t(B, K, D), _ids(B, N), _t(D), None, _t(3, D)
    ),
    "scatter_masked_backward: ids_restore has shape (2, 16), expected [2, 17]": (
        lambda: torch.ops.fastmim.scatter_masked_backward(_t(B, N + 2, D), _ids(B, N), K, True, True, f32, f32, 1)
    ),
    "scatter_masked_backward: k = 20": lambda: torch.ops.fastmim.scatter_masked_backward(
        _t(B, N, D), _ids(B, N), 20, False, False, f32, f32, 0
    ),
    "masked_mse_loss: mask has shape (1, 4)": lambda: torch.ops.fastmim.masked_loss(
        _t(B, 4, 48), _t(B, 3, 8, 8), torch.ones(1, 4), 4, True, 1e-6, 2
    ),
    "masked_mse_loss: target images (2, 3, 8, 8) with patch size 4 do not give": lambda: torch.ops.fastmim.masked_loss(
        _t(B, 4, 12), _t(B, 3, 8, 8), torch.ones(B, 4), 4, True, 1e-6, 2
    ),
    "masked_mse_loss: target has shape (2, 4, 7)": lambda: torch.ops.fastmim.masked_loss(
        _t(B, 4, 8), _t(B, 4, 7), torch.ones(B, 4), 0, True, 1e-6, 2
    ),
    "masked_mse_loss: grad_loss must hold one value": lambda: torch.ops.fastmim.masked_loss_backward(
        _t(3), _t(B, 4, 8), _t(B, 4, 8), torch.ones(B, 4), torch.ones(()), 0, True, 1e-6, 2
    ),
    "patchify: image size 10x8 is not divisible": lambda: torch.ops.fastmim.patchify(_t(B, 3, 10, 8), 4),
    "unpatchify: x has shape (2, 4, 48), expected [*, 9, 48]": lambda: torch.ops.fastmim.unpatchify(
        _t(B, 4, 48), 4, 3, 3, 3
    ),
    "sparse_dwconv: nbr has shape (9, 5), expected [9, 6]": lambda: torch.ops.fastmim.sparse_dwconv(
        _t(6, D), torch.zeros(9, 5, dtype=i32), _t(D, 1, 3, 3), None
    ),
    "sparse_dwconv: bias has shape (7,)": lambda: torch.ops.fastmim.sparse_dwconv(
        _t(6, D), torch.zeros(9, 6, dtype=i32), _t(D, 1, 3, 3), _t(7)
    ),
    "sparse_dwconv: grad has shape (5, 8), expected [6, 8]": lambda: torch.ops.fastmim.sparse_dwconv_backward(
        _t(5, D), _t(6, D), torch.zeros(9, 6, dtype=i32), _t(D, 1, 3, 3), True, True, True
    ),
    "add_layer_norm: residual has shape (5, 8), expected [6, 8]": lambda: torch.ops.fastmim.add_layer_norm(
        _t(6, D), _t(5, D), _t(D), _t(D), 1e-6, f32
    ),
    "add_layer_norm_backward: mean has shape (5,), expected [6]": lambda: torch.ops.fastmim.add_layer_norm_backward(
        _t(6, D), _t(6, D), _t(6, D), _t(D), _t(5), _t(6), True, f32, f32, True, True
    ),
    "grn: bias has shape (7,), expected [8]": lambda: torch.ops.fastmim.grn(_t(B, 5, D), _t(D), _t(7), 1e-6),
    "grn_backward: grad has shape (2, 4, 8), expected [2, 5, 8]": lambda: torch.ops.fastmim.grn_backward(
        _t(B, 4, D), _t(B, 5, D), _t(D), 1e-6, True, True, True
    ),
    "bias_gelu: bias has shape (7,), expected [8]": lambda: torch.ops.fastmim.bias_gelu(_t(6, D), _t(7)),
    "bias_gelu_backward: dy has shape (5, 8), expected [6, 8]": lambda: torch.ops.fastmim.bias_gelu_backward(
        _t(5, D), _t(6, D), _t(D), True
    ),
    "attention: qkv has shape (2, 5, 2, 2, 4), expected [*, *, 3, *, *]": lambda: torch.ops.fastmim.attention(
        _t(B, 5, 2, 2, 4), 0.5
    ),
    "attention_backward: lse has shape (4, 4), expected [4, 5]": lambda: torch.ops.fastmim.attention_backward(
        _t(B, 5, 2, 4), _t(B, 5, 3, 2, 4), _t(B, 5, 2, 4), _t(4, 4), 0.5
    ),
    "hog_target: mask has shape (2, 3), expected [2, 4]": lambda: torch.ops.fastmim.hog_target(
        _t(B, 3, 32, 32), torch.ones(B, 3, dtype=torch.bool), 16, 8, 9, 0
    ),
    "fft_loss: target has shape (2, 3, 8, 4)": lambda: torch.ops.fastmim.fft_loss(
        _t(B, 3, 8, 8), _t(B, 3, 8, 4), None, 1
    ),
    "fft_loss_backward: mask has shape (2, 3), expected [2, 4]": lambda: torch.ops.fastmim.fft_loss_backward(
        torch.ones(()), _t(3, 8, 8, 2), _t(B, 3), [B, 3, 8, 8], 4, f32, f32, True, True
    ),
    "patch_fft_loss: mask has shape (2, 3), expected [2, 4]": lambda: torch.ops.fastmim.patch_fft_loss(
        _t(B, 4, 48), _t(B, 3, 8, 8), _t(B, 3), 4, 1.0, True
    ),
    "patch_fft_loss: rowmax has shape (2, 4, 2), expected [2, 4, 3]": lambda: torch.ops.fastmim.patch_fft_loss_backward(
        torch.ones(()), _t(B, 4, 48), _t(B, 3, 8, 8), _t(B, 4), _t(B, 4, 2), 4, 1.0, True
    ),
}


def test_raw_sparse_dwconv_refuses_a_64_bit_neighbor_table(backend):
    """The kernels read 32-bit ids: an int64 table would be read as pairs of halves."""
    with pytest.raises(TypeError, match="sparse_dwconv: nbr must be an int32 neighbor table"):
        torch.ops.fastmim.sparse_dwconv(_t(6, D), torch.zeros(9, 6, dtype=torch.long), _t(D, 1, 3, 3), None)


CASES.update(
    {
        "hog_target: image size 1x8": lambda: torch.ops.fastmim.hog_target(_t(1, 1, 1, 8), None, 1, 1, 9, 0),
        "hog_target: image size 16x16, patch_size 16, cell_size 8 and nbins 17": lambda: torch.ops.fastmim.hog_target(
            _t(1, 3, 16, 16), None, 16, 8, 17, 0
        ),
        "hog_target: gaussian_window -4 must be 0 (none)": lambda: torch.ops.fastmim.hog_target(
            _t(1, 3, 32, 32), None, 16, 8, 9, -4
        ),
        "hog_target: gaussian_window 12 must be 0 (none) or divide the image size 32x32": lambda: (
            torch.ops.fastmim.hog_target(_t(1, 3, 32, 32), None, 16, 8, 9, 12)
        ),
        "low_pass_target: mean has 1 values, expected one per channel (3)": lambda: torch.ops.fastmim.low_pass_target(
            _t(1, 3, 8, 8), 2.0, [0.5], [0.25, 0.25, 0.25]
        ),
    }
)
if HAS_TWINS:  # the Triton twins check the same shapes (they run the opaque ops' checks)
    CASES["gather_visible: ids_keep has shape (1, 4) [twin]"] = lambda: torch.ops.fastmim.gather_visible_triton(
        _t(B, N, D), _ids(1, K)
    )
    CASES["unpatchify: x has shape (2, 4, 48), expected [*, 9, 48] [twin]"] = lambda: (
        torch.ops.fastmim.unpatchify_triton(_t(B, 4, 48), 4, 3, 3, 3)
    )


@pytest.mark.parametrize("expected", list(CASES), ids=lambda s: s.split(":")[0] + ":" + s.split(":")[1][:24])
def test_raw_op_refuses_shapes_its_kernels_would_overrun(expected, backend):
    device, _ = backend
    with torch.device(device), pytest.raises(ValueError) as err:  # the inputs on the backend's device
        CASES[expected]()
    assert expected.removesuffix(" [twin]") in str(err.value)


def test_raw_empty_patchify_backward_is_accepted(backend):
    """An empty image is legal (patchify's backward calls unpatchify with a 0 x n grid)."""
    device, _ = backend
    x = torch.randn(2, 3, 0, 8, device=device, requires_grad=True)
    out = torch.ops.fastmim.patchify(x, 4)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert out.shape == (2, 0, 48) and g.shape == x.shape
    assert torch.ops.fastmim.unpatchify(torch.randn(2, 0, 48, device=device), 4, 0, 3, 3).shape == (2, 3, 0, 12)


def test_raw_loss_backward_refuses_a_denominator_not_in_float32(backend):
    """The kernels read the forward's mask sum as a float: another dtype would be read as raw bits."""
    device, _ = backend
    args = [torch.randn(2, 4, 8, device=device) for _ in range(2)] + [torch.ones(2, 4, device=device)]
    with pytest.raises(TypeError, match="denom must be the forward's float32 mask sum, got torch.float64"):
        denom = torch.ones((), device=device, dtype=torch.float64)
        torch.ops.fastmim.masked_loss_backward(torch.ones((), device=device), *args, denom, 0, True, 1e-6, 2)


def test_raw_loss_refuses_a_negative_eps_and_a_zero_denominator(backend):
    """A negative (or NaN) eps would take the root of a negative variance; a zero mask sum divides by zero (checked on
    CPU tensors: on CUDA it would cost a host sync)."""
    device, _ = backend
    pred, target, mask = torch.randn(2, 4, 8, device=device), torch.randn(2, 4, 8, device=device), torch.ones(2, 4)
    mask = mask.to(device)
    for eps in (-10.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            torch.ops.fastmim.masked_loss(pred, target, mask, 0, True, eps, 2)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="denom must be the forward's positive mask sum, got 0"):
            zero = torch.zeros((), device=device)
            torch.ops.fastmim.masked_loss_backward(torch.ones((), device=device), pred, target, mask, zero, 0, True,
                                                   1e-6, 2)  # fmt: skip


def test_raw_gather_backward_refuses_repeated_ids_on_cpu(backend):
    """Called directly (not after the public gather, which checks its ids), a repeated id would have kept one of its
    gradient rows only; on CPU it is refused like the forward's."""
    device, _ = backend
    if device.type != "cpu":
        pytest.skip("ids are checked on CPU tensors only (on CUDA a check would cost a host sync)")
    grad = torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match="gather_visible_backward: ids_keep row 0 repeats index 0"):
        torch.ops.fastmim.gather_visible_backward(grad, torch.tensor([[0, 0], [1, 2]]), 3)


def test_raw_scatter_backward_refuses_repeated_and_negative_ids_on_cpu(backend):
    """Called directly, a repeated id kept one of its gradient rows only (C++), and -1 wrapped to the last row (the
    torch path for float64): ids_restore is checked as the forward's, a permutation of its positions."""
    device, _ = backend
    if device.type != "cpu":
        pytest.skip("ids are checked on CPU tensors only (on CUDA a check would cost a host sync)")
    f32, f64 = torch.float32, torch.float64
    with pytest.raises(ValueError, match="scatter_masked_backward: ids_restore row 0 repeats index 1"):
        torch.ops.fastmim.scatter_masked_backward(torch.ones(1, 4, 3), torch.tensor([[1, 1, 2, 3]]), 2, False, False,
                                                  f32, f32, 0)  # fmt: skip
    with pytest.raises(IndexError, match=r"scatter_masked_backward: ids_restore\[0, 0\] = -1 is out of range"):
        torch.ops.fastmim.scatter_masked_backward(torch.ones(1, 4, 3, dtype=f64), torch.tensor([[-1, 1, 2, 3]]), 2,
                                                  False, False, f64, f64, 0)  # fmt: skip


def test_raw_sparse_dwconv_backward_checks_its_table_on_cpu(backend):
    """The backward called directly checks the table as the forward does, on every backend (Triton's gave NaN rows
    for an id out of range where the C++ one refused it); with no weight or bias gradient asked, its two empty
    outputs are two tensors (a custom op's outputs may not alias)."""
    device, name = backend
    if device.type != "cpu":
        pytest.skip("ids are checked on CPU tensors only (on CUDA a check would cost a host sync)")
    nbr = torch.full((9, 4), -1000, dtype=torch.int32)
    with pytest.raises(IndexError, match=r"sparse_dwconv: nbr\[0, 0\] = -1000 is out of range \[-1, 4\)"):
        torch.ops.fastmim.sparse_dwconv_backward(torch.randn(4, 3), torch.randn(4, 3), nbr, torch.randn(3, 1, 3, 3),
                                                 True, True, True)  # fmt: skip
    nbr = torch.full((9, 4), -1, dtype=torch.int32)
    nbr[4] = torch.arange(4, dtype=torch.int32)  # the centre tap: each row itself
    args = (torch.randn(4, 3), torch.randn(4, 3), nbr, torch.randn(3, 1, 3, 3), True, False, False)
    gx, gw, gb = torch.ops.fastmim.sparse_dwconv_backward(*args)
    assert gx.shape == (4, 3) and gw.numel() == gb.numel() == 0
    torch.library.opcheck(torch.ops.fastmim.sparse_dwconv_backward.default, args)  # (checks the outputs' aliasing)
