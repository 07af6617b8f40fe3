"""Submanifold sparse depthwise convolution (FCMAE's sparse ConvNeXt V2) as a fused op, and the layout it runs on.

Only the active (visible) pixels of a feature map are stored, as rows [M, C] in raster order over (b, y, x);
``SparseLayout`` numbers them and builds the neighbor table [K*K, M] every KxK convolution on that active set reads.
``sparse_dwconv`` computes the depthwise convolution at active pixels only, masked and outside taps reading zero:
the same as scattering into a zero dense map, ``F.conv2d(..., padding=K // 2, groups=C)``, and gathering back.
Registered as ``torch.library.custom_op`` (fake kernels, autograd), so it runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastmim.ops import _cpu
from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_id_values,
    check_shape,
    check_tensors,
    checked,
    choose_backend,
    eager_function,
    ids_checked_here,
    no_second_derivative,
    use_custom_op,
)
from fastmim.ops.reference import sparse_dwconv_ref

_OP = "sparse_dwconv"


def _check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"SparseLayout.neighbors: kernel_size must be a positive odd int, got {kernel_size!r}")


@dataclass(frozen=True, eq=False)
class SparseLayout:
    """Which pixels of a [B, H, W] feature map are active, and the row each one is stored in.

    Attributes:
        index: [B, H, W] int32 row id of each active pixel, -1 where masked (rows in raster order over (b, y, x)).
        batch: [M] int64 sample of each row.
        pixel: [M] int64 flat position ``(b * H + y) * W + x`` of each row.
        num_rows: M.
        shape: (B, H, W).
    """

    index: torch.Tensor
    batch: torch.Tensor
    pixel: torch.Tensor
    num_rows: int
    shape: tuple[int, int, int]
    _neighbors: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_mask(cls, active: torch.Tensor, num_rows: int | None = None) -> SparseLayout:
        """The layout of ``active`` [B, H, W] bool (True: active/visible pixel).

        Args:
            active: the active pixels.
            num_rows: the number of active pixels when the caller knows it (FCMAE: batch x kept patches x pixels per
                patch): the layout is then built without a host sync (and traces under torch.compile). It must be
                right: on CPU tensors it is checked; on CUDA a wrong count gives wrong rows. Without it, finding M
                costs one host sync.
        """
        if active.dtype != torch.bool:
            raise TypeError(f"SparseLayout.from_mask: active must be a bool tensor, got {active.dtype}")
        if active.dim() != 3:
            raise ValueError(f"SparseLayout.from_mask: active must be [B, H, W], got shape {tuple(active.shape)}")
        b, h, w = active.shape
        flat = active.reshape(-1)
        if num_rows is None:
            pixel = flat.nonzero().squeeze(1)  # [M], ascending: raster order
        else:
            if num_rows < 0 or num_rows > flat.numel():
                raise ValueError(f"SparseLayout.from_mask: num_rows {num_rows} is not in [0, {flat.numel()}]")
            if active.device.type == "cpu" and not torch.compiler.is_compiling() and int(flat.sum()) != num_rows:
                raise ValueError(f"SparseLayout.from_mask: num_rows is {num_rows} but {int(flat.sum())} are active")
            pixel = torch.nonzero_static(flat, size=num_rows).squeeze(1)
        m = pixel.numel()
        if m >= 2**31:
            raise ValueError(f"SparseLayout.from_mask: {m} active pixels do not fit int32 row ids")
        index = torch.full((b * h * w,), -1, dtype=torch.int32, device=active.device)
        index[pixel] = torch.arange(m, dtype=torch.int32, device=active.device)
        return cls(index.view(b, h, w), pixel // (h * w), pixel, m, (b, h, w))

    def neighbors(self, kernel_size: int) -> torch.Tensor:
        """The neighbor table [K*K, M] int32 of a KxK convolution on this active set (cached per K).

        ``nbr[t, r]`` is the row of the pixel at offset ``(t // K - K // 2, t % K - K // 2)`` from row r's pixel, or
        -1 where that pixel is masked or outside the image. Inputs and outputs share one active set, so the table is
        symmetric: ``nbr[t, r] = r'`` implies ``nbr[K*K - 1 - t, r'] = r`` (what ``sparse_dwconv``'s backward uses).
        """
        _check_kernel_size(kernel_size)
        if kernel_size not in self._neighbors:
            k, pad = kernel_size, kernel_size // 2
            b, h, w = self.shape
            hp, wp = h + 2 * pad, w + 2 * pad
            padded = F.pad(self.index, (pad, pad, pad, pad), value=-1).reshape(-1)  # [B * Hp * Wp]
            yx = self.pixel % (h * w)
            corner = self.batch * (hp * wp) + (yx // w) * wp + yx % w  # [M]: the top-left tap in the padded map
            t = torch.arange(k * k, device=self.index.device)
            offsets = (t // k) * wp + t % k  # [K*K]
            self._neighbors[k] = padded[corner.unsqueeze(0) + offsets.unsqueeze(1)].contiguous()  # [K*K, M]
        return self._neighbors[kernel_size]

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Active rows [M, C] of a channels-last map [B, H, W, C] (differentiable)."""
        if tuple(dense.shape[:3]) != self.shape or dense.dim() != 4:
            raise ValueError(f"SparseLayout.gather: dense has shape {tuple(dense.shape)}, expected [{self.shape}, C]")
        return dense.reshape(-1, dense.shape[3])[self.pixel]

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """Channels-last map [B, H, W, C]: ``rows`` [M, C] at the active pixels, zeros elsewhere (differentiable)."""
        if rows.dim() != 2 or rows.shape[0] != self.num_rows:
            raise ValueError(f"SparseLayout.scatter: rows has shape {tuple(rows.shape)}, expected [{self.num_rows}, C]")
        b, h, w = self.shape
        out = rows.new_zeros((b * h * w, rows.shape[1])).index_copy(0, self.pixel, rows)
        return out.view(b, h, w, rows.shape[1])


# ---- sparse_dwconv --------------------------------------------------------------------------------------------


def _triton_sparse_conv():
    from fastmim.ops.triton import sparse_conv

    return sparse_conv


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype, ...]:
    return tuple(t.dtype for t in tensors if t is not None)


def _fwd(x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    check_id_values(_OP, "nbr", nbr, x.shape[0], distinct=False, lower=-1)  # -1: an empty tap
    backend = choose_backend(_OP, x.device, _dtypes(x, weight, bias))
    if backend == "triton":
        return _triton_sparse_conv().sparse_dwconv(x, nbr, weight, bias)
    if backend == "cpp":
        return _cpu.sparse_dwconv(x, nbr, weight, bias)
    return sparse_dwconv_ref(x, nbr, weight, bias)


def _raw_check(x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """The raw ops' shapes: x [M, C], nbr [K*K, M] int32 (the kernels read 32-bit ids), weight [C, 1, K, K], bias
    [C]."""
    check_shape(_OP, "x", x, (None, None))
    m, c = x.shape
    check_shape(_OP, "weight", weight, (c, 1, None, None))
    k = weight.shape[-1]
    check_shape(_OP, "weight", weight, (c, 1, k, k))
    check_shape(_OP, "nbr", nbr, (k * k, m))
    check_shape(_OP, "bias", bias, (c,))
    if nbr.dtype != torch.int32:
        raise TypeError(f"{_OP}: nbr must be an int32 neighbor table (SparseLayout.neighbors), got {nbr.dtype}")
    for name, t in (("nbr", nbr), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_device(_OP, name, t, x.device)


def _raw_bwd_check(grad, x, nbr, weight, need_x, need_w, need_b) -> None:
    _raw_check(x, nbr, weight)
    check_shape(_OP, "grad", grad, tuple(x.shape))
    if need_x:  # the registered op (torch.compile's graphs, a direct call), where the public function's check was
        _check_symmetric(nbr)  # traced away or never ran; the eager backward runs _bwd itself, after that check


_sparse_dwconv_op = torch.library.custom_op("fastmim::sparse_dwconv", checked(_fwd, _raw_check), mutates_args=())


@_sparse_dwconv_op.register_fake
def _(x, nbr, weight, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _grad_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The weight and bias gradients' accumulation dtype: fp32, float64 where x or the weight is float64."""
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def _wgrad_ref(grad: torch.Tensor, x: torch.Tensor, nbr: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[C, K*K] in ``dtype``: ``gw[c, t] = sum_r grad[r, c] * x[nbr[t, r], c]``, one tap at a time ([M, C]
    memory)."""
    m, c = x.shape
    rows = torch.cat([x.to(dtype), x.new_zeros((1, c), dtype=dtype)])  # [M + 1, C]
    ids = torch.where(nbr < 0, m, nbr.long())  # [K*K, M]
    g = grad.to(dtype)
    return torch.stack([(g * rows[ids[t]]).sum(0) for t in range(nbr.shape[0])], dim=1)


def _bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    nbr: torch.Tensor,
    weight: torch.Tensor,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_x [M, C] (x's dtype; [0, C] if not needed), grad_weight [C, 1, K, K] and grad_bias [C] in fp32 (float64
    for float64 x or weight: ``_grad_dtype``; [0] if not needed). Relies on the table's symmetry for grad_x."""
    m, c = x.shape
    check_id_values(_OP, "nbr", nbr, m, distinct=False, lower=-1)  # (as the forward: every backend, on CPU tensors)
    backend = choose_backend(_OP, x.device, (grad.dtype, x.dtype, weight.dtype))
    gx = x.new_empty((0, c))
    acc = _grad_dtype(x, weight)  # (fp32 for the kernels: they never take float64)
    gw, gb = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)  # (never one tensor: a custom op's outputs
    # may not alias each other)
    if backend == "triton":
        kernels = _triton_sparse_conv()
        if need_x:  # submanifold: grad_x is the same convolution of grad with the kernel flipped
            gx = kernels.sparse_dwconv(grad, nbr, weight, None, flip=True, out_dtype=x.dtype)
        if need_w:
            gw, gb = kernels.sparse_dwconv_wgrad(grad, x, nbr)
        elif need_b:
            gb = grad.to(acc).sum(0)
    elif backend == "cpp":
        if need_x:  # the flipped kernel through the symmetric table, as Triton
            gx = _cpu.sparse_dwconv(grad, nbr, weight, None, flip=True, out_dtype=x.dtype)
        if need_w:
            gw, gb = _cpu.sparse_dwconv_wgrad(grad, x, nbr, weight.shape[-1], need_bias=need_b)
        elif need_b:
            gb = grad.to(acc).sum(0)
    else:
        if need_x:
            gx = sparse_dwconv_ref(grad, nbr, weight.flip((-2, -1))).to(x.dtype)
        if need_w:
            gw = _wgrad_ref(grad, x, nbr, acc)
        if need_b:
            gb = grad.to(acc).sum(0)
    if need_w:
        gw = gw.reshape(weight.shape)
    if not need_b:
        gb = x.new_empty((0,), dtype=acc)
    return gx, gw, gb


_sparse_dwconv_backward_op = torch.library.custom_op(
    "fastmim::sparse_dwconv_backward", checked(_bwd, _raw_bwd_check), mutates_args=()
)
no_second_derivative(_sparse_dwconv_backward_op, "fastmim.ops.sparse_dwconv", "sparse_dwconv_ref")


@_sparse_dwconv_backward_op.register_fake
def _(grad, x, nbr, weight, need_x, need_w, need_b):
    m, c = x.shape
    gx = x.new_empty((m if need_x else 0, c))
    acc = _grad_dtype(x, weight)
    gw = x.new_empty(tuple(weight.shape) if need_w else (0,), dtype=acc)
    gb = x.new_empty((c if need_b else 0,), dtype=acc)
    return gx, gw, gb


def _setup(ctx, inputs, output):
    x, nbr, weight, bias = inputs
    ctx.save_for_backward(x, nbr, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad, bwd=_sparse_dwconv_backward_op):
    x, nbr, weight = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad
    gx, gw, gb = bwd(grad, x, nbr, weight, need_x, need_w, need_b)
    return (
        gx if need_x else None,
        None,
        gw.to(weight.dtype) if need_w else None,
        gb.to(ctx.bias_dtype) if need_b else None,
    )


_sparse_dwconv_op.register_autograd(_backward, setup_context=_setup)


_SparseDWConv = eager_function(
    "_SparseDWConv", _fwd, _setup, lambda ctx, grad: _backward(ctx, grad, _bwd), graph_backward=_backward
)


def _check_inputs(x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensors(_OP, x=x, nbr=nbr, weight=weight, **({} if bias is None else {"bias": bias}))
    if x.dim() != 2:
        raise ValueError(f"{_OP}: x must be [M, C] rows, got shape {tuple(x.shape)}")
    check_float(_OP, "x", x)
    m, c = x.shape
    if nbr.dtype != torch.int32:
        raise TypeError(f"{_OP}: nbr must be an int32 neighbor table (SparseLayout.neighbors), got {nbr.dtype}")
    if nbr.dim() != 2 or nbr.shape[1] != m:
        raise ValueError(f"{_OP}: nbr has shape {tuple(nbr.shape)}, expected [K*K, M] with M = {m} rows of x")
    kk = nbr.shape[0]
    k = round(kk**0.5)  # not math.isqrt: torch.compile traces kk as a symbolic size (the check below is exact)
    if k * k != kk or k % 2 == 0:
        raise ValueError(f"{_OP}: nbr has {kk} taps, expected K*K for an odd kernel size K (9, 49, ...)")
    check_device(_OP, "nbr", nbr, x.device)
    check_float(_OP, "weight", weight)
    if tuple(weight.shape) != (c, 1, k, k):
        raise ValueError(
            f"{_OP}: weight has shape {tuple(weight.shape)}, expected [C, 1, K, K] = [{c}, 1, {k}, {k}] "
            f"(C from x, K from nbr's {kk} taps)"
        )
    check_device(_OP, "weight", weight, x.device)
    if bias is not None:
        check_float(_OP, "bias", bias)
        if tuple(bias.shape) != (c,):
            raise ValueError(f"{_OP}: bias has shape {tuple(bias.shape)}, expected [{c}]")
        check_device(_OP, "bias", bias, x.device)


def _check_symmetric(nbr: torch.Tensor) -> None:
    """``nbr[t, r] = r'`` implies ``nbr[K*K - 1 - t, r'] = r`` (x's backward reads the table flipped); checked where
    the ids are (CPU tensors, or CUDA with ``FASTMIM_CHECK_IDS=1``), after their range."""
    if not ids_checked_here(nbr):
        return
    check_id_values(_OP, "nbr", nbr, nbr.shape[1], distinct=False, lower=-1)
    ids = nbr.long()
    back = nbr.flip(0).long().gather(1, ids.clamp(min=0))  # nbr[K*K - 1 - t, nbr[t, r]]
    rows = torch.arange(nbr.shape[1], device=nbr.device).expand_as(ids)
    bad = (ids >= 0) & (back != rows)
    if bool(bad.any()):
        t, r = bad.nonzero()[0].tolist()
        other = int(ids[t, r])
        raise ValueError(f"{_OP}: nbr is not symmetric, which x's gradient needs: nbr[{t}, {r}] = {other} but "
                         f"nbr[{nbr.shape[0] - 1 - t}, {other}] = {int(nbr[nbr.shape[0] - 1 - t, other])}, not {r} "
                         "(SparseLayout.neighbors builds symmetric tables)")  # fmt: skip


def sparse_dwconv(
    x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Submanifold depthwise KxK convolution of active rows: ``out[r, c] = bias[c] + sum_t weight[c, 0, t // K,
    t % K] * x[nbr[t, r], c]``, taps with ``nbr = -1`` reading zero (see ``sparse_dwconv_ref``).

    Equal to scattering the rows into a zero [B, C, H, W] map, ``F.conv2d(dense, weight, bias, padding=K // 2,
    groups=C)`` and reading it back at the active pixels.

    Args:
        x: [M, C] active rows (float32, bfloat16 or float16 for the fused kernels; other dtypes use the reference).
        nbr: [K*K, M] int32 neighbor table for odd K, from ``SparseLayout.neighbors(K)``. The backward needs it
            symmetric (``nbr[t, r] = r'`` implies ``nbr[K*K - 1 - t, r'] = r``), which holds for any table built on
            one active set for inputs and outputs, as ``SparseLayout`` builds them.
        weight: [C, 1, K, K], a depthwise ``nn.Conv2d`` weight (timm's ``conv_dw.weight``); may be fp32 with bf16 x.
        bias: optional [C].
    Returns: [M, C] in x's dtype, accumulated in fp32 whatever the input dtypes. Gradients flow to x, weight and
    bias, each in its own dtype.

    Ids are range-checked on CPU tensors; on CUDA that would cost a host sync per call, so there the kernels are
    memory-safe instead: an id outside [-1, M) gives a NaN output row.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.sparse_dwconv_ref(x, nbr, weight, bias)
    _check_inputs(x, nbr, weight, bias)
    if x.requires_grad and torch.is_grad_enabled():  # x's gradient runs the flipped table: it must be symmetric
        _check_symmetric(nbr)
    if use_custom_op():
        return _sparse_dwconv_op(x, nbr, weight, bias)
    return _SparseDWConv.apply(x, nbr, weight, bias)


def _register_flop_formulas() -> None:
    """torch.utils.flop_counter counts the op like the dense depthwise conv it replaces, on the active rows only:
    2 M C K^2 forward; the backward the same per gradient it computes (x, weight)."""
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # older torch: the counter just sees no FLOPs here
        return

    @register_flop_formula(torch.ops.fastmim.sparse_dwconv)
    def _fwd_flops(x_shape, nbr_shape, weight_shape, bias_shape=None, *args, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * nbr_shape[0]

    @register_flop_formula(torch.ops.fastmim.sparse_dwconv_backward)
    def _bwd_flops(grad_shape, x_shape, nbr_shape, weight_shape, need_x, need_w, need_b, *args, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * nbr_shape[0] * (int(need_x) + int(need_w))


_register_flop_formulas()
