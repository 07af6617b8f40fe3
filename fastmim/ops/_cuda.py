"""Calls into the CUDA kernels of ``fastmim._cuda`` (kernels/*.cu). Pointers, element strides and dtype codes cross
the boundary, so no input is copied; the callers (the op modules) have validated shapes, dtypes and devices, and the
kernels stay in bounds whatever the index values. Launches go on the current stream of the tensors' device.

Host time is the point of this layer: each function allocates its outputs, reads the stream and makes one call into
the extension, nothing else.
"""

from __future__ import annotations

import functools

import torch

from fastmim import _ext
from fastmim.ops._dispatch import CPP_DTYPE

_cu = _ext._cuda

try:  # what torch.cuda.current_stream(i).cuda_stream returns, without building a Stream object
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - older or CPU-only builds

    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


@functools.cache
def _loss_blocks(index: int) -> int:
    """Most blocks the loss forward launches on device ``index`` (its workspace holds two floats per block)."""
    return _cu.LOSS_BLOCKS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _scatter_workspace(b: int, n: int, k: int, d: int, has_cls: bool, need_pos: bool) -> int:
    return _cu.scatter_masked_workspace(b, n, k, d, has_cls, need_pos)


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    k = ids_keep.shape[1]
    out = torch.empty((b, k, d), dtype=x.dtype, device=x.device)
    dev = x.get_device()
    sx = x.stride()
    si = ids_keep.stride()
    _cu.gather_visible(
        x.data_ptr(), CPP_DTYPE[x.dtype], sx[0], sx[1], sx[2], ids_keep.data_ptr(), ids_keep.dtype == torch.int64,
        si[0], si[1], out.data_ptr(), b, n, k, d, dev, _raw_stream(dev),
    )  # fmt: skip
    return out


def gather_visible_backward(grad: torch.Tensor, ids_keep: torch.Tensor, n: int) -> torch.Tensor:
    b, k, d = grad.shape
    out = torch.empty((b, n, d), dtype=grad.dtype, device=grad.device)  # every row is written: rows or zeros
    dev = grad.get_device()
    sg = grad.stride()
    si = ids_keep.stride()
    _cu.gather_visible_backward(
        grad.data_ptr(), CPP_DTYPE[grad.dtype], sg[0], sg[1], sg[2], ids_keep.data_ptr(),
        ids_keep.dtype == torch.int64, si[0], si[1], out.data_ptr(), b, n, k, d, dev, _raw_stream(dev),
    )  # fmt: skip
    return out


def scatter_masked(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,  # [D]
    pos_embed: torch.Tensor | None,  # [R, D]
    cls_token: torch.Tensor | None,  # [B or 1, D]
    out_dtype: torch.dtype,
) -> torch.Tensor:
    b, k, d = x_vis.shape
    n = ids_restore.shape[1]
    has_cls = cls_token is not None
    out = torch.empty((b, n + int(has_cls), d), dtype=out_dtype, device=x_vis.device)
    dev = x_vis.get_device()
    sx, si = x_vis.stride(), ids_restore.stride()
    if pos_embed is not None:
        pos, pos_dt, (sp_r, sp_d) = pos_embed.data_ptr(), CPP_DTYPE[pos_embed.dtype], pos_embed.stride()
    else:
        pos, pos_dt, sp_r, sp_d = 0, 0, 0, 0
    if has_cls:
        cls, cls_dt = cls_token.data_ptr(), CPP_DTYPE[cls_token.dtype]
        sc_b = cls_token.stride(0) if cls_token.shape[0] > 1 else 0
        sc_d = cls_token.stride(1)
    else:
        cls, cls_dt, sc_b, sc_d = 0, 0, 0, 0
    _cu.scatter_masked(
        x_vis.data_ptr(), CPP_DTYPE[x_vis.dtype], sx[0], sx[1], sx[2], ids_restore.data_ptr(),
        ids_restore.dtype == torch.int64, si[0], si[1], mask_token.data_ptr(), CPP_DTYPE[mask_token.dtype],
        mask_token.stride(0), pos, pos_dt, sp_r, sp_d, cls, cls_dt, sc_b, sc_d, out.data_ptr(), CPP_DTYPE[out_dtype],
        b, n, k, d, dev, _raw_stream(dev),
    )  # fmt: skip
    return out


def scatter_masked_backward(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    k: int,
    has_cls: bool,
    need_pos: bool,
    x_dtype: torch.dtype,
    cls_dtype: torch.dtype | None,
    cls_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x_vis [B, K, D] x_dtype, grad_mask_token [D] fp32, grad_pos [R, D] fp32 or None, grad_cls [B, D] in
    cls_dtype or None). A per-sample class token's gradient comes out of the kernel; a broadcast one (cls_rows 1 < B,
    None here) is the sum of the class rows, which the caller takes."""
    b, r, d = grad.shape
    n = ids_restore.shape[1]
    dev = grad.get_device()
    gx = torch.empty((b, k, d), dtype=x_dtype, device=grad.device)  # zero-filled by the launcher
    ws_size = _scatter_workspace(b, n, k, d, has_cls, need_pos)
    buf = torch.empty(d + (r * d if need_pos else 0) + max(ws_size, 1), dtype=torch.float32, device=grad.device)
    gmt = buf[:d]
    gpos = buf[d : d + r * d].view(r, d) if need_pos else None
    per_sample_cls = has_cls and cls_rows == b
    gcls = torch.empty((b, d), dtype=cls_dtype, device=grad.device) if per_sample_cls else None
    sg, si = grad.stride(), ids_restore.stride()
    _cu.scatter_masked_backward(
        grad.data_ptr(), CPP_DTYPE[grad.dtype], sg[0], sg[1], sg[2], ids_restore.data_ptr(),
        ids_restore.dtype == torch.int64, si[0], si[1], b, n, k, d, has_cls, gx.data_ptr(), CPP_DTYPE[x_dtype],
        gmt.data_ptr(), gpos.data_ptr() if need_pos else 0, gcls.data_ptr() if per_sample_cls else 0,
        CPP_DTYPE[cls_dtype] if per_sample_cls else 0, buf.data_ptr() + 4 * (d + (r * d if need_pos else 0)),
        ws_size, dev, _raw_stream(dev),
    )  # fmt: skip
    return gx, gmt, gpos, gcls


def _loss_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask in a dtype the kernels read: float64 weights as float32 (bool and integer masks arrive as float32).
    The caller holds the result until the kernel is queued: freed earlier, its memory could be reused or returned
    before the kernel reads it (PYTORCH_NO_CUDA_MEMORY_CACHING=1, the cudaMallocAsync backend)."""
    return mask if mask.dtype in CPP_DTYPE else mask.float()


def _loss_args(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, geometry: tuple[int, ...]) -> tuple:
    """The kernels' shared arguments; ``mask`` already through ``_loss_mask`` (a pointer to it is taken)."""
    b, n, d = pred.shape
    sp, sm = pred.stride(), mask.stride()
    return (
        pred.data_ptr(), CPP_DTYPE[pred.dtype], sp[0], sp[1], sp[2], target.data_ptr(), CPP_DTYPE[target.dtype],
        geometry, mask.data_ptr(), CPP_DTYPE[mask.dtype], sm[0], sm[1], b, n, d,
    )  # fmt: skip


def masked_loss_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    geometry: tuple[int, ...],
    norm_pix: bool,
    eps: float,
    p: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask weight sum) as 0-d fp32 tensors (views of one small buffer: one allocation)."""
    dev = pred.get_device()
    blocks = _loss_blocks(dev)
    buf = torch.empty(2 + 2 * blocks, dtype=torch.float32, device=pred.device)
    ptr = buf.data_ptr()
    mask = _loss_mask(mask)
    _cu.masked_loss_forward(
        *_loss_args(pred, target, mask, geometry), eps, norm_pix, p, ptr, ptr + 8, blocks, dev, _raw_stream(dev)
    )
    return buf[0], buf[1]


def masked_loss_backward(
    grad_loss: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    denom: torch.Tensor,
    geometry: tuple[int, ...],
    norm_pix: bool,
    eps: float,
    p: int,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. pred, [B, L, D] contiguous in pred's dtype."""
    if grad_loss.dtype != torch.float32:
        grad_loss = grad_loss.float()
    grad = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    dev = pred.get_device()
    mask = _loss_mask(mask)
    _cu.masked_loss_backward(
        *_loss_args(pred, target, mask, geometry), eps, norm_pix, p, grad_loss.data_ptr(), denom.data_ptr(),
        grad.data_ptr(), dev, _raw_stream(dev),
    )  # fmt: skip
    return grad


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    out = torch.empty((b, gh * gw, p * p * c), dtype=imgs.dtype, device=imgs.device)
    dev = imgs.get_device()
    s = imgs.stride()
    _cu.patchify(
        imgs.data_ptr(), out.data_ptr(), imgs.element_size(), b, c, gh, gw, p, s[0], s[1], s[2], s[3],
        gh * gw * p * p * c, p * p * c, 1, True, dev, _raw_stream(dev),
    )  # fmt: skip
    return out


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    b = x.shape[0]
    gh, gw = grid
    h, w = gh * p, gw * p
    out = torch.empty((b, channels, h, w), dtype=x.dtype, device=x.device)
    dev = x.get_device()
    s = x.stride()
    _cu.patchify(
        x.data_ptr(), out.data_ptr(), x.element_size(), b, channels, gh, gw, p, channels * h * w, h * w, w, 1,
        s[0], s[1], s[2], False, dev, _raw_stream(dev),
    )  # fmt: skip
    return out


# one patch of P*P*C values must fit the patchify kernel's shared memory (it checks too, with a clear error)
PATCHIFY_MAX_BYTES = 200 * 1024
LOSS_MAX_D = _cu.LOSS_MAX_D if _cu is not None else 0
