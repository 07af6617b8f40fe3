"""``patchify`` / ``unpatchify`` as ops: [B, C, H, W] <-> [B, L, p*p*C], (p, q, c) order inside a patch (MAE).

Each is the other's backward. Any patch size and channel count; non-contiguous inputs are read through strides
(Triton) or copied first (C++).
"""

from __future__ import annotations

import functools
import operator

import torch

from fastmim.ops import _cpu, _cuda
from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_image_grid,
    check_patch_size,
    check_shape,
    check_tensor,
    choose_backend,
    custom_op,
    eager_function,
    needs_autograd,
    traced_op,
    triton_twin,
    use_custom_op,
)
from fastmim.ops.reference import patchify_ref, unpatchify_ref


def _triton_patchify():
    from fastmim.ops.triton import patchify

    return patchify


def _fresh(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A contiguous result that does not alias ``src`` (a reshape of a 1x1-patch image is a view)."""
    if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _cuda_fits(channels: int, p: int, element_size: int, device: torch.device) -> bool:
    """One patch must fit the CUDA kernel's shared memory on ``device`` (at most PATCHIFY_MAX_BYTES; an A100 opts
    in to 163 KiB a block, an RTX 30/40 to 99 KiB); larger ones run the Triton kernel."""
    return p * p * channels * element_size <= _shared_memory_limit(device.index)


@functools.cache
def _shared_memory_limit(index: int | None) -> int:
    try:
        props = torch.cuda.get_device_properties(index)
    except Exception:  # no driver (CPU tests of the CUDA branch)
        return _cuda.PATCHIFY_MAX_BYTES
    optin = getattr(props, "shared_memory_per_block_optin", 0) or _cuda.PATCHIFY_MAX_BYTES
    return min(_cuda.PATCHIFY_MAX_BYTES, int(optin))


def _patchify_impl(imgs: torch.Tensor, p: int) -> torch.Tensor:
    backend = choose_backend("patchify", imgs.device, (imgs.dtype,))
    if backend == "cuda" and _cuda_fits(imgs.shape[1], p, imgs.element_size(), imgs.device):
        return _cuda.patchify(imgs, p)
    if backend in ("triton", "cuda"):
        return _triton_patchify().patchify(imgs, p)
    if backend == "cpp":
        return _cpu.patchify(imgs, p)
    return _fresh(patchify_ref(imgs, p), imgs)


def _unpatchify_impl(x: torch.Tensor, p: int, gh: int, gw: int, channels: int) -> torch.Tensor:
    backend = choose_backend("unpatchify", x.device, (x.dtype,))
    if backend == "cuda" and _cuda_fits(channels, p, x.element_size(), x.device):
        return _cuda.unpatchify(x, p, (gh, gw), channels)
    if backend in ("triton", "cuda"):
        return _triton_patchify().unpatchify(x, p, (gh, gw), channels)
    if backend == "cpp":
        return _cpu.unpatchify(x, p, (gh, gw), channels)
    return _fresh(unpatchify_ref(x, p, (gh, gw), channels), x)


def _patchify_check(imgs: torch.Tensor, p: int) -> None:
    """The public function's checks, and the raw op's."""
    check_tensor("patchify", "imgs", imgs)
    if imgs.dim() != 4:
        raise ValueError(f"patchify: imgs must be [B, C, H, W], got shape {tuple(imgs.shape)}")
    check_patch_size("patchify", p)
    check_image_grid("patchify", imgs, p)


def _unpatchify_check(x: torch.Tensor, p: int, gh: int, gw: int, channels: int) -> None:
    check_patch_size("unpatchify", p)
    if min(gh, gw, channels) < 0:  # 0 is fine: an empty image (patchify's backward of one)
        raise ValueError(f"unpatchify: grid {gh}x{gw} and {channels} channels must not be negative")
    check_shape("unpatchify", "x", x, (None, gh * gw, p * p * channels))


_patchify_op = custom_op("fastmim::patchify", _patchify_impl, _patchify_check)


@_patchify_op.register_fake
def _(imgs, p):
    b, c, h, w = imgs.shape
    return imgs.new_empty((b, (h // p) * (w // p), p * p * c))


_unpatchify_op = custom_op("fastmim::unpatchify", _unpatchify_impl, _unpatchify_check)


@_unpatchify_op.register_fake
def _(x, p, gh, gw, channels):
    return x.new_empty((x.shape[0], channels, gh * p, gw * p))


def _patchify_setup(ctx, inputs, output):
    imgs, p = inputs
    ctx.p, ctx.shape = p, imgs.shape


def _patchify_backward(ctx, grad, unpatchify_fn=_unpatchify_op):
    _, c, h, w = ctx.shape
    return unpatchify_fn(grad, ctx.p, h // ctx.p, w // ctx.p, c), None


def _unpatchify_setup(ctx, inputs, output):
    ctx.p = inputs[1]


def _unpatchify_backward(ctx, grad, patchify_fn=_patchify_op):
    return patchify_fn(grad, ctx.p), None, None, None, None


_patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)
_unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


# each is the other's backward (so both differentiate any number of times: the custom ops' formulas)
_Patchify = eager_function(
    "_Patchify",
    _patchify_impl,
    _patchify_setup,
    lambda ctx, g: _patchify_backward(ctx, g, _unpatchify_impl),
    graph_backward=_patchify_backward,
)
_Unpatchify = eager_function(
    "_Unpatchify",
    _unpatchify_impl,
    _unpatchify_setup,
    lambda ctx, g: _unpatchify_backward(ctx, g, _patchify_impl),
    graph_backward=_unpatchify_backward,
)

# the Triton twins inductor can see into (fastmim.ops._dispatch.traced_op), each the other's backward: one
# AUTO_COMPILED entry, "patchify", decides for both (the same kernels; benchmarks/ops.py times them as one op)
_patchify_twin = triton_twin(
    "patchify_triton", _patchify_impl, lambda imgs, p: _triton_patchify().patchify(imgs, p), _patchify_check
)
_unpatchify_twin = triton_twin(
    "unpatchify_triton",
    _unpatchify_impl,
    lambda x, p, gh, gw, channels: _triton_patchify().unpatchify(x, p, (gh, gw), channels),
    _unpatchify_check,
)
if _patchify_twin is not None:
    _patchify_twin.register_autograd(
        lambda ctx, g: _patchify_backward(ctx, g, _unpatchify_twin), setup_context=_patchify_setup
    )
    _unpatchify_twin.register_autograd(
        lambda ctx, g: _unpatchify_backward(ctx, g, _patchify_twin), setup_context=_unpatchify_setup
    )


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] with L = (H/p)*(W/p), channels last inside a patch (as ``patchify_ref``).

    Args:
        imgs: [B, C, H, W]; H and W divisible by ``patch_size``.
        patch_size: patch side p.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.patchify_ref(imgs, patch_size)
    _patchify_check(imgs, patch_size)
    if use_custom_op():
        return traced_op("patchify", _patchify_op, _patchify_twin, imgs.device, (imgs.dtype,))(imgs, patch_size)
    return _Patchify.apply(imgs, patch_size) if needs_autograd(imgs) else _patchify_impl(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, grid: int | tuple[int, int], channels: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, gh*p, gw*p]; the inverse of ``patchify``.

    Args:
        x: [B, L, p*p*C] patches.
        patch_size: patch side p.
        grid: (gh, gw) patches per column and row, gh * gw = L; one int for a square grid.
        channels: C.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.unpatchify_ref(x, patch_size, grid, channels)
    check_tensor("unpatchify", "x", x)
    check_patch_size("unpatchify", patch_size)
    if isinstance(grid, (int, torch.SymInt)) and not isinstance(grid, bool):
        grid = (grid, grid)  # a square grid
    try:  # symbolic sizes (torch.compile, torch.export) stay symbolic: int() would specialise them
        gh, gw = (v if isinstance(v, (int, torch.SymInt)) else operator.index(v) for v in grid)
    except (TypeError, ValueError):  # not two ints
        gh = gw = 0
    if gh < 1 or gw < 1 or isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        shown = tuple(grid) if isinstance(grid, (tuple, list)) else grid
        raise ValueError(f"unpatchify: grid {shown!r} and channels {channels!r} must be positive ints")
    if x.dim() != 3 or x.shape[1] != gh * gw or x.shape[2] != patch_size * patch_size * channels:
        raise ValueError(
            f"unpatchify: x has shape {tuple(x.shape)}, expected [B, {gh * gw}, {patch_size * patch_size * channels}] "
            f"for grid {gh}x{gw}, patch {patch_size}, {channels} channels"
        )
    if use_custom_op():
        return traced_op("patchify", _unpatchify_op, _unpatchify_twin, x.device, (x.dtype,))(
            x, patch_size, gh, gw, channels
        )
    if needs_autograd(x):
        return _Unpatchify.apply(x, patch_size, gh, gw, channels)
    return _unpatchify_impl(x, patch_size, gh, gw, channels)
