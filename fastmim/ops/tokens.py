"""Visible-token gather (MAE encoder) and decoder-input scatter (MAE decoder) as fused ops.

Public: ``gather_visible``, ``scatter_masked``. Registered as ``torch.library.custom_op`` (with fake kernels and
autograd), so they run under ``torch.compile(fullgraph=True)``; the backend is picked per call (see ``_dispatch``).
"""

from __future__ import annotations

import functools

import torch

from fastmim.ops import _cpu, _cuda
from fastmim.ops import reference as _reference
from fastmim.ops._dispatch import (
    _functorch_active,
    check_device,
    check_float,
    check_id_values,
    check_ids,
    check_shape,
    check_tensors,
    choose_backend,
    custom_op,
    eager_function,
    needs_autograd,
    stat_dtype,
    traced_op,
    triton_twin,
    unaliased,
    use_custom_op,
)
from fastmim.ops.reference import gather_visible_ref, scatter_masked_ref


def _triton_tokens():
    from fastmim.ops.triton import tokens

    return tokens


# ---- gather_visible -------------------------------------------------------------------------------------------


def _gather_fwd(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    check_id_values("gather_visible", "ids_keep", ids_keep, x.shape[1], distinct=True)
    backend = choose_backend("gather_visible", x.device, (x.dtype,))
    if backend == "cuda":
        return _cuda.gather_visible(x, ids_keep)
    if backend == "triton":
        return _triton_tokens().gather_visible(x, ids_keep)
    if backend == "cpp":
        return _cpu.gather_visible(x, ids_keep)
    return gather_visible_ref(x, ids_keep.long())


def _gather_check(x: torch.Tensor, ids_keep: torch.Tensor) -> None:
    """The raw ops' shapes (the public function checks more, before reshaping)."""
    op = "gather_visible"
    check_shape(op, "x", x, (None, None, None))
    check_ids(op, "ids_keep", ids_keep, (x.shape[0], None), x.device)


_gather_visible_op = custom_op("fastmim::gather_visible", _gather_fwd, _gather_check)


@_gather_visible_op.register_fake
def _(x, ids_keep):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


def _gather_bwd(grad: torch.Tensor, ids_keep: torch.Tensor, n: int) -> torch.Tensor:
    backend = choose_backend("gather_visible", grad.device, (grad.dtype,))
    if backend == "cuda":
        return _cuda.gather_visible_backward(grad, ids_keep, n)
    if backend == "triton":
        return _triton_tokens().gather_visible_backward(grad, ids_keep, n)
    if backend == "cpp":
        return _cpu.gather_visible_backward(grad, ids_keep, n)
    b, k, d = grad.shape
    out = grad.new_zeros((b, n, d))
    return out.scatter_add_(1, ids_keep.long().unsqueeze(-1).expand(b, k, d), grad)


def _gather_bwd_check(grad: torch.Tensor, ids_keep: torch.Tensor, n: int) -> None:
    op = "gather_visible_backward"
    check_shape(op, "grad", grad, (None, None, None))
    check_ids(op, "ids_keep", ids_keep, tuple(grad.shape[:2]), grad.device)
    if n < grad.shape[1]:
        raise ValueError(f"{op}: n = {n} is fewer than the {grad.shape[1]} kept tokens")
    check_id_values(op, "ids_keep", ids_keep, n, distinct=True)  # a repeat would keep one of its gradients only


_gather_visible_backward_op = custom_op("fastmim::gather_visible_backward", _gather_bwd, _gather_bwd_check)


@_gather_visible_backward_op.register_fake
def _(grad, ids_keep, n):
    return grad.new_empty((grad.shape[0], n, grad.shape[2]))


def _gather_setup(ctx, inputs, output):
    x, ids_keep = inputs
    ctx.save_for_backward(ids_keep)
    ctx.n = x.shape[1]


def _gather_backward(ctx, grad, bwd=_gather_visible_backward_op):
    (ids_keep,) = ctx.saved_tensors
    return bwd(grad, ids_keep, ctx.n), None


_gather_visible_op.register_autograd(_gather_backward, setup_context=_gather_setup)


# the backward (rows written back at ids_keep, zeros elsewhere) is linear: its own backward is the gather, so the op
# differentiates any number of times
def _gather_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _gather_bwd_backward(ctx, grad, fwd=_gather_visible_op):
    (ids_keep,) = ctx.saved_tensors
    return fwd(grad, ids_keep), None, None


_gather_visible_backward_op.register_autograd(_gather_bwd_backward, setup_context=_gather_bwd_setup)


_GatherVisible = eager_function(
    "_GatherVisible",
    _gather_fwd,
    _gather_setup,
    lambda ctx, grad: _gather_backward(ctx, grad, _gather_bwd),
    graph_backward=_gather_backward,
)

# the Triton twins inductor can see into (fastmim.ops._dispatch.traced_op)
_gather_visible_twin = triton_twin(
    "gather_visible_triton",
    _gather_fwd,
    lambda x, ids_keep: _triton_tokens().gather_visible(x, ids_keep),
    _gather_check,
)
_gather_visible_backward_twin = triton_twin(
    "gather_visible_backward_triton",
    _gather_bwd,
    lambda g, ids, n: _triton_tokens().gather_visible_backward(g, ids, n),
    _gather_bwd_check,
)
if _gather_visible_twin is not None:
    _gather_visible_twin.register_autograd(
        lambda ctx, grad: _gather_backward(ctx, grad, _gather_visible_backward_twin), setup_context=_gather_setup
    )
    _gather_visible_backward_twin.register_autograd(
        lambda ctx, grad: _gather_bwd_backward(ctx, grad, _gather_visible_twin), setup_context=_gather_bwd_setup
    )


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Keeps the visible tokens: ``out[b, k] = x[b, ids_keep[b, k]]``, without expanding the index D times.

    Args:
        x: [B, N, D] tokens (float32, bfloat16 or float16 for the fused kernels; other dtypes use the reference).
        ids_keep: [B, K] int64 (or int32) ids in [0, N), distinct within a row (as every masking strategy gives).
    Returns: [B, K, D]. The backward writes the gradient rows back at ``ids_keep`` and zeros elsewhere; it is
    differentiable itself (second derivatives work).

    Ids are checked on CPU tensors (range and distinctness); on CUDA that would cost a host sync per call, so there
    the kernel is memory-safe instead: an out-of-range id gives a NaN row, while a repeated id goes undetected (the
    row is copied twice and the backward keeps one of its gradients; ``FASTMIM_CHECK_IDS=1`` checks it there).
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.gather_visible_ref(x, ids_keep)
    op = "gather_visible"
    check_tensors(op, x=x, ids_keep=ids_keep)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, N, D], got shape {tuple(x.shape)}")
    check_float(op, "x", x)
    if ids_keep.dim() != 2:
        raise ValueError(f"{op}: ids_keep must be [B, K], got shape {tuple(ids_keep.shape)}")
    check_ids(op, "ids_keep", ids_keep, (x.shape[0], None), x.device)
    if ids_keep.shape[1] > x.shape[1]:
        raise ValueError(f"{op}: ids_keep keeps {ids_keep.shape[1]} tokens of {x.shape[1]}; ids must be distinct")
    if use_custom_op():
        return traced_op("gather_visible", _gather_visible_op, _gather_visible_twin, x.device, (x.dtype,))(x, ids_keep)
    return _GatherVisible.apply(x, ids_keep) if needs_autograd(x) else _gather_fwd(x, ids_keep)


# ---- scatter_masked -------------------------------------------------------------------------------------------


def _scatter_fwd(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
) -> torch.Tensor:
    # mask_token [D], pos_embed [R, D], cls_token [B or 1, D] (the public function reshapes them)
    check_id_values("scatter_masked", "ids_restore", ids_restore, ids_restore.shape[1], distinct=True)
    tensors = [t for t in (x_vis, mask_token, pos_embed, cls_token) if t is not None]
    backend = choose_backend("scatter_masked", x_vis.device, tuple(t.dtype for t in tensors))
    return _scatter_fwd_on(backend, x_vis, ids_restore, mask_token, pos_embed, cls_token)


def _scatter_fwd_on(backend: str, x_vis, ids_restore, mask_token, pos_embed, cls_token) -> torch.Tensor:
    out_dtype = _out_dtype(x_vis, mask_token, pos_embed, cls_token)
    if backend == "cuda":
        return _cuda.scatter_masked(x_vis, ids_restore, mask_token, pos_embed, cls_token, out_dtype)
    if backend == "triton":
        return _triton_tokens().scatter_masked(x_vis, ids_restore, mask_token, pos_embed, cls_token, out_dtype)
    if backend == "cpp":
        return _cpu.scatter_masked(x_vis, ids_restore, mask_token, pos_embed, cls_token, out_dtype)
    return scatter_masked_ref(x_vis, ids_restore.long(), mask_token, pos_embed, cls_token).to(out_dtype)


def _out_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _scatter_check(x_vis, ids_restore, mask_token, pos_embed, cls_token) -> None:
    """The raw op's shapes: mask_token [D], pos_embed [N(+1), D], cls_token [B or 1, D] (the public function takes
    more forms and reshapes them)."""
    op = "scatter_masked"
    check_shape(op, "x_vis", x_vis, (None, None, None))
    b, k, d = x_vis.shape
    check_ids(op, "ids_restore", ids_restore, (b, None), x_vis.device)
    n = ids_restore.shape[1]
    if n < k:
        raise ValueError(f"{op}: ids_restore has {n} positions, fewer than the {k} visible tokens")
    check_shape(op, "mask_token", mask_token, (d,))
    check_shape(op, "pos_embed", pos_embed, (n + (cls_token is not None), d))
    check_shape(op, "cls_token", cls_token, (None, d))
    if cls_token is not None and cls_token.shape[0] not in (1, b):
        raise ValueError(f"{op}: cls_token has {cls_token.shape[0]} rows, expected 1 or B = {b}")
    for name, t in (("mask_token", mask_token), ("pos_embed", pos_embed), ("cls_token", cls_token)):
        if t is not None:
            check_device(op, name, t, x_vis.device)


_scatter_masked_op = custom_op("fastmim::scatter_masked", _scatter_fwd, _scatter_check)  # one output


@_scatter_masked_op.register_fake
def _(x_vis, ids_restore, mask_token, pos_embed, cls_token):
    rows = ids_restore.shape[1] + (1 if cls_token is not None else 0)
    dtype = _out_dtype(x_vis, mask_token, pos_embed, cls_token)
    return x_vis.new_empty((x_vis.shape[0], rows, x_vis.shape[2]), dtype=dtype)


def _scatter_bwd(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    k: int,
    has_cls: bool,
    need_pos: bool,
    x_dtype: torch.dtype,
    cls_dtype: torch.dtype,
    cls_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns grad_x_vis [B, K, D] (x_dtype), grad_mask_token [D] and grad_pos [R, D] ([0, D] if unused) in fp32
    (float64 for a float64 grad), grad_cls [cls_rows, D] in cls_dtype ([0, D] without a class token)."""
    backend = choose_backend("scatter_masked", grad.device, (grad.dtype, x_dtype))
    return _scatter_bwd_on(backend, grad, ids_restore, k, has_cls, need_pos, x_dtype, cls_dtype, cls_rows)


def _scatter_bwd_on(backend: str, grad, ids_restore, k, has_cls, need_pos, x_dtype, cls_dtype, cls_rows):
    gcls = None
    if backend == "cuda":
        gx, gmt, gpos, gcls = _cuda.scatter_masked_backward(
            grad, ids_restore, k, has_cls, need_pos, x_dtype, cls_dtype, cls_rows
        )
    elif backend == "triton":
        gx, gmt, gpos = _triton_tokens().scatter_masked_backward(grad, ids_restore, k, has_cls, need_pos, x_dtype)
    elif backend == "cpp":
        gx, gmt, gpos = _cpu.scatter_masked_backward(grad, ids_restore, k, has_cls, need_pos, x_dtype)
    else:
        gx, gmt, gpos = _scatter_backward_ref(grad, ids_restore, k, has_cls, need_pos, x_dtype)
    if gpos is None:
        gpos = grad.new_empty((0, grad.shape[2]), dtype=stat_dtype(grad))
    if gcls is None:
        if has_cls:  # [B, D] rows of the class token, summed over the batch for a broadcast one (a copy either way)
            g0 = grad[:, 0]
            g0 = g0 if cls_rows == grad.shape[0] else g0.to(stat_dtype(g0)).sum(0, keepdim=True)
            gcls = g0.to(cls_dtype, copy=True)
        else:
            gcls = grad.new_empty((0, grad.shape[2]), dtype=cls_dtype)
    return gx, gmt, gpos, gcls


def _scatter_backward_ref(grad, ids_restore, k, has_cls, need_pos, x_dtype):
    """Without boolean indexing or a host read (each a sync on CUDA, and a break in a captured CUDA graph): the
    hidden positions' rows go to a spare row k, dropped; the mask token's gradient is the hidden rows' masked sum."""
    b, r, d = grad.shape
    g = grad[:, int(has_cls) :].to(stat_dtype(grad))  # [B, N, D]
    ids = ids_restore.long()
    vis = ids < k
    dest = torch.where(vis, ids, k).unsqueeze(-1).expand_as(g)  # (visible ids are distinct: one write each)
    gx = torch.zeros((b, k + 1, d), dtype=g.dtype, device=grad.device).scatter_(1, dest, g)[:, :k]
    gmt = (g * (~vis).unsqueeze(-1).to(g.dtype)).sum((0, 1))
    gpos = grad.to(g.dtype).sum(0) if need_pos else None
    return gx.to(x_dtype).contiguous(), gmt, gpos  # (the spare row's slice: contiguous, as the kernels' outputs)


def _scatter_bwd_check(grad, ids_restore, k, has_cls, need_pos, x_dtype, cls_dtype, cls_rows) -> None:
    op = "scatter_masked_backward"
    check_shape(op, "grad", grad, (None, None, None))
    b, r, _ = grad.shape
    check_ids(op, "ids_restore", ids_restore, (b, r - int(has_cls)), grad.device)
    if not 0 <= k <= ids_restore.shape[1]:
        raise ValueError(f"{op}: k = {k} visible tokens of {ids_restore.shape[1]} positions")
    if has_cls and cls_rows not in (1, b):
        raise ValueError(f"{op}: cls_rows = {cls_rows}, expected 1 or B = {b}")
    # a permutation, as the forward's: a repeat would keep one of its gradients, -1 would wrap to the last row
    check_id_values(op, "ids_restore", ids_restore, ids_restore.shape[1], distinct=True)


_scatter_masked_backward_op = custom_op("fastmim::scatter_masked_backward", unaliased(_scatter_bwd), _scatter_bwd_check)


@_scatter_masked_backward_op.register_fake
def _(grad, ids_restore, k, has_cls, need_pos, x_dtype, cls_dtype, cls_rows):
    b, r, d = grad.shape
    gx = grad.new_empty((b, k, d), dtype=x_dtype)
    gmt = grad.new_empty((d,), dtype=stat_dtype(grad))
    gpos = grad.new_empty((r if need_pos else 0, d), dtype=stat_dtype(grad))
    gcls = grad.new_empty((cls_rows if has_cls else 0, d), dtype=cls_dtype)
    return gx, gmt, gpos, gcls


def _scatter_setup(ctx, inputs, output):
    x_vis, ids_restore, mask_token, pos_embed, cls_token = inputs
    ctx.save_for_backward(ids_restore)
    ctx.k = x_vis.shape[1]
    ctx.x_dtype = x_vis.dtype
    ctx.mt_dtype = mask_token.dtype
    ctx.has_cls = cls_token is not None
    ctx.cls_rows = 0 if cls_token is None else cls_token.shape[0]
    ctx.cls_dtype = x_vis.dtype if cls_token is None else cls_token.dtype
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype
    ctx.need_pos = pos_embed is not None and pos_embed.requires_grad


def _scatter_backward(ctx, grad, bwd=_scatter_masked_backward_op):
    (ids_restore,) = ctx.saved_tensors
    gx, gmt, gpos, gcls = bwd(grad, ids_restore, ctx.k, ctx.has_cls, ctx.need_pos, ctx.x_dtype, ctx.cls_dtype,
                              ctx.cls_rows)  # fmt: skip
    g_pos = gpos.to(ctx.pos_dtype) if ctx.need_pos else None
    g_mt = gmt if gmt.dtype == ctx.mt_dtype else gmt.to(ctx.mt_dtype)
    return gx, None, g_mt, g_pos, gcls if ctx.has_cls else None


_scatter_masked_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# the backward is linear in the output's gradient: its own backward is the scatter again, applied to the gradients
# of its outputs (visible rows, mask token, position embedding, class token), so the op differentiates any number of
# times
def _scatter_bwd_setup(ctx, inputs, output):
    grad, ids_restore, k, has_cls, need_pos = inputs[:5]
    ctx.save_for_backward(ids_restore)
    ctx.shape, ctx.dtype, ctx.k, ctx.has_cls, ctx.need_pos = tuple(grad.shape), grad.dtype, k, has_cls, need_pos


def _scatter_bwd_backward(ctx, ggx, ggmt, ggpos, ggcls, fwd=_scatter_masked_op):
    (ids_restore,) = ctx.saved_tensors
    b, _, d = ctx.shape
    dev = ids_restore.device
    ggx = ggx if ggx is not None else torch.zeros((b, ctx.k, d), device=dev, dtype=ctx.dtype)
    ggmt = ggmt if ggmt is not None else torch.zeros((d,), device=dev, dtype=stat_dtype(ggx))
    pos = ggpos if ctx.need_pos and ggpos is not None else None
    cls = None
    if ctx.has_cls:
        cls = ggcls if ggcls is not None else torch.zeros((1, d), device=dev, dtype=ctx.dtype)
    return fwd(ggx, ids_restore, ggmt, pos, cls).to(ctx.dtype), None, None, None, None, None, None, None


_scatter_masked_backward_op.register_autograd(_scatter_bwd_backward, setup_context=_scatter_bwd_setup)


_ScatterMasked = eager_function(
    "_ScatterMasked",
    _scatter_fwd,
    _scatter_setup,
    lambda ctx, grad: _scatter_backward(ctx, grad, _scatter_bwd),
    graph_backward=_scatter_backward,
)

_scatter_masked_twin = triton_twin(
    "scatter_masked_triton", _scatter_fwd, functools.partial(_scatter_fwd_on, "triton"), _scatter_check
)
_scatter_masked_backward_twin = triton_twin(
    "scatter_masked_backward_triton", _scatter_bwd, functools.partial(_scatter_bwd_on, "triton"), _scatter_bwd_check
)
if _scatter_masked_twin is not None:
    _scatter_masked_twin.register_autograd(
        lambda ctx, grad: _scatter_backward(ctx, grad, _scatter_masked_backward_twin), setup_context=_scatter_setup
    )
    _scatter_masked_backward_twin.register_autograd(
        lambda ctx, *g: _scatter_bwd_backward(ctx, *g, fwd=_scatter_masked_twin), setup_context=_scatter_bwd_setup
    )


def scatter_masked(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's decoder input in one pass: visible tokens unshuffled to their places, the mask token elsewhere, the
    class token in front and the position embedding added.

    Equal to ``scatter_masked_ref``: ``cat([x_vis, mask tokens])``, gathered by ``ids_restore``, class token
    prepended, ``+ pos_embed``; the output dtype is what those ops promote to.

    Args:
        x_vis: [B, K, D] visible tokens (without the class token).
        ids_restore: [B, N] int64 (or int32), a permutation of [0, N) per row: values < K pick ``x_vis`` rows,
            values >= K the mask token.
        mask_token: [D] or [1, 1, D].
        pos_embed: optional [N(+1), D] or [1, N(+1), D]; with a class token its row 0 is the class token's.
        cls_token: optional [B, 1, D] (MAE: the encoder's class token after the decoder embedding) or [1, 1, D].
    Returns: [B, N(+1), D]. Gradients flow to x_vis, mask_token, cls_token and (when it requires grad) pos_embed.
    """
    if _functorch_active():  # torch.func transforms: the plain-PyTorch reference (kernels read plain tensors)
        return _reference.scatter_masked_ref(x_vis, ids_restore, mask_token, pos_embed, cls_token)
    op = "scatter_masked"
    check_tensors(op, x_vis=x_vis, ids_restore=ids_restore, mask_token=mask_token)
    if x_vis.dim() != 3:
        raise ValueError(f"{op}: x_vis must be [B, K, D], got shape {tuple(x_vis.shape)}")
    b, k, d = x_vis.shape
    device = x_vis.device
    check_float(op, "x_vis", x_vis)
    if d == 0:
        raise ValueError(f"{op}: x_vis has no channels (shape {tuple(x_vis.shape)})")
    if ids_restore.dim() != 2:
        raise ValueError(f"{op}: ids_restore must be [B, N], got shape {tuple(ids_restore.shape)}")
    check_ids(op, "ids_restore", ids_restore, (b, None), device)
    n = ids_restore.shape[1]
    if n < k:
        raise ValueError(f"{op}: ids_restore has {n} positions, fewer than the {k} visible tokens")
    check_float(op, "mask_token", mask_token)
    check_device(op, "mask_token", mask_token, device)
    if mask_token.numel() != d or (mask_token.dim() > 1 and mask_token.shape[-1] != d):
        raise ValueError(f"{op}: mask_token has shape {tuple(mask_token.shape)}, expected [D] or [1, 1, D], D={d}")
    rows = n + (cls_token is not None)
    if pos_embed is not None:
        check_float(op, "pos_embed", pos_embed)
        check_device(op, "pos_embed", pos_embed, device)
        if tuple(pos_embed.shape) not in ((rows, d), (1, rows, d)):
            extra = " (with a class token, pos_embed has a row for it)" if cls_token is not None else ""
            if pos_embed.shape[-1] == d and pos_embed.dim() in (2, 3) and pos_embed.numel() // d != rows:
                # the rows disagree: the sequence length N comes from ids_restore, which may be the wrong one
                extra += (f"; ids_restore says N = {n} positions: if pos_embed is right, ids_restore should be "
                          f"[B, {pos_embed.numel() // d - (cls_token is not None)}] (argsort of the masking noise, "
                          "not ids_keep)")  # fmt: skip
            raise ValueError(
                f"{op}: pos_embed has shape {tuple(pos_embed.shape)}, expected [{rows}, {d}] or [1, {rows}, {d}]{extra}"
            )
        if pos_embed.dim() == 3:
            pos_embed = pos_embed.reshape(rows, d)
    if cls_token is not None:
        check_float(op, "cls_token", cls_token)
        check_device(op, "cls_token", cls_token, device)
        ok = cls_token.shape[-1] == d and cls_token.numel() in (d, b * d) and cls_token.dim() in (1, 2, 3)
        if cls_token.dim() == 3:
            ok = ok and cls_token.shape[1] == 1
        if not ok:
            raise ValueError(f"{op}: cls_token has shape {tuple(cls_token.shape)}, expected [B, 1, D] or [1, 1, D]")
        if cls_token.dim() != 2:
            cls_token = cls_token.reshape(-1, d)
    args = (x_vis, ids_restore, mask_token if mask_token.dim() == 1 else mask_token.reshape(d), pos_embed, cls_token)
    if use_custom_op():
        dtypes = tuple(t.dtype for t in args if t is not None and t.is_floating_point())
        return traced_op("scatter_masked", _scatter_masked_op, _scatter_masked_twin, device, dtypes)(*args)
    return (
        _ScatterMasked.apply(*args) if needs_autograd(x_vis, mask_token, pos_embed, cls_token) else _scatter_fwd(*args)
    )
