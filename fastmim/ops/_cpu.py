"""Calls into the C++ CPU kernels of ``fastmim._C``. Pointers cross the boundary, so every tensor is made contiguous
here and every shape was checked by the caller; the C++ side re-checks ids and sizes and never reads out of bounds.
"""

from __future__ import annotations

import torch

from fastmim import _ext
from fastmim.ops._dispatch import CPP_DTYPE


def _c():
    return _ext.require()


def _ids(ids: torch.Tensor) -> torch.Tensor:
    return ids.to(torch.int64).contiguous()


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    k = ids_keep.shape[1]
    x, ids = x.contiguous(), _ids(ids_keep)
    out = torch.empty((b, k, d), dtype=x.dtype)
    _c().gather_visible(x.data_ptr(), ids.data_ptr(), out.data_ptr(), b, n, k, d, x.element_size())
    return out


def gather_visible_backward(grad: torch.Tensor, ids_keep: torch.Tensor, n: int) -> torch.Tensor:
    b, k, d = grad.shape
    grad, ids = grad.contiguous(), _ids(ids_keep)
    out = torch.empty((b, n, d), dtype=grad.dtype)
    _c().gather_visible_backward(grad.data_ptr(), ids.data_ptr(), out.data_ptr(), b, n, k, d, grad.element_size())
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
    has_cls, has_pos = cls_token is not None, pos_embed is not None
    # one dtype inside the kernel: the output's (what torch.cat / + would promote to)
    x = x_vis.to(out_dtype).contiguous()
    mt = mask_token.to(out_dtype).contiguous()
    pos = pos_embed.to(out_dtype).contiguous() if has_pos else None
    cls = cls_token.to(out_dtype).contiguous() if has_cls else None
    out = torch.empty((b, n + int(has_cls), d), dtype=out_dtype)
    ids = _ids(ids_restore)
    _c().scatter_masked(
        x.data_ptr(), ids.data_ptr(), mt.data_ptr(), pos.data_ptr() if has_pos else 0,
        cls.data_ptr() if has_cls else 0, d if has_cls and cls.shape[0] > 1 else 0, out.data_ptr(),
        b, n, k, d, has_cls, has_pos, CPP_DTYPE[out_dtype],
    )  # fmt: skip
    return out


def scatter_masked_backward(
    grad: torch.Tensor, ids_restore: torch.Tensor, k: int, has_cls: bool, need_pos: bool, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    b, r, d = grad.shape
    n = ids_restore.shape[1]
    grad, ids = grad.contiguous(), _ids(ids_restore)
    gx = torch.empty((b, k, d), dtype=grad.dtype)
    gmt = torch.empty(d, dtype=torch.float32)
    gpos = torch.empty((r, d), dtype=torch.float32) if need_pos else None
    _c().scatter_masked_backward(
        grad.data_ptr(), ids.data_ptr(), gx.data_ptr(), gmt.data_ptr(), gpos.data_ptr() if need_pos else 0,
        b, n, k, d, has_cls, need_pos, CPP_DTYPE[grad.dtype],
    )  # fmt: skip
    return gx.to(x_dtype), gmt, gpos


def _pred_target(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    """The pointer/dtype/size arguments the two loss kernels share."""
    return pred.data_ptr(), CPP_DTYPE[pred.dtype], target.data_ptr(), CPP_DTYPE[target.dtype], target.numel()


def masked_loss_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    geometry: tuple[int, ...],
    norm_pix: bool,
    eps: float,
    p: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``target`` and ``mask`` must already be contiguous (geometry was computed from their strides)."""
    pred = pred.contiguous()
    mask = mask.to(torch.float32).contiguous()
    loss_sum, mask_sum = _c().masked_loss_forward(
        *_pred_target(pred, target), mask.data_ptr(), *pred.shape, *geometry, norm_pix, eps, p
    )
    denom = torch.tensor(mask_sum, dtype=torch.float32)
    return torch.tensor(loss_sum / mask_sum if mask_sum else float("nan"), dtype=torch.float32), denom


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
    pred = pred.contiguous()
    mask = mask.to(torch.float32).contiguous()
    grad = torch.empty(pred.shape, dtype=pred.dtype)
    scale = float(grad_loss) / float(denom)
    _c().masked_loss_backward(
        scale, *_pred_target(pred, target), mask.data_ptr(), grad.data_ptr(), *pred.shape, *geometry, norm_pix, eps, p
    )
    return grad


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = imgs.shape
    imgs = imgs.contiguous()
    out = torch.empty((b, (h // p) * (w // p), p * p * c), dtype=imgs.dtype)
    _c().patchify(imgs.data_ptr(), out.data_ptr(), b, c, h, w, p, imgs.element_size())
    return out


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    gh, gw = grid
    x = x.contiguous()
    out = torch.empty((x.shape[0], channels, gh * p, gw * p), dtype=x.dtype)
    _c().unpatchify(x.data_ptr(), out.data_ptr(), x.shape[0], channels, gh * p, gw * p, p, x.element_size())
    return out


def _check_sparse(fn: str, x: torch.Tensor, nbr: torch.Tensor, k: int, *others: torch.Tensor | None) -> None:
    """The buffer sizes the sparse conv kernels derive from x [M, C] and K: nbr must be [K*K, M] int32, every tensor
    a CPU tensor of a kernel dtype (the pointers would otherwise be read past their end)."""
    m = x.shape[0]
    if nbr.dtype != torch.int32 or tuple(nbr.shape) != (k * k, m):
        raise ValueError(f"{fn}: nbr must be [K*K, M] = [{k * k}, {m}] int32, got {tuple(nbr.shape)} {nbr.dtype}")
    for t in (x, nbr, *others):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{fn}: the C++ kernels take CPU tensors, got one on {t.device}")
        if t is not None and t is not nbr and t.dtype not in CPP_DTYPE:
            raise ValueError(f"{fn}: the C++ kernels take float32, bfloat16 or float16, got {t.dtype}")


def sparse_dwconv(
    x: torch.Tensor,  # [M, C]
    nbr: torch.Tensor,  # [KK, M] int32
    weight: torch.Tensor,  # [C, 1, K, K]
    bias: torch.Tensor | None,  # [C]
    flip: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[M, C] in ``out_dtype`` (x's by default): ``bias + sum_t w[:, t] * x[nbr[t]]``; ``flip``: tap t uses weight
    tap KK-1-t (grad_x). Accumulates in fp32 whatever the input dtypes."""
    m, c = x.shape
    k = weight.shape[-1]
    if tuple(weight.shape) != (c, 1, k, k) or (bias is not None and tuple(bias.shape) != (c,)):
        raise ValueError(f"sparse_dwconv: weight must be [C, 1, K, K] and bias [C] for C = {c}")
    _check_sparse("sparse_dwconv", x, nbr, k, weight, bias)
    x, nbr, w = x.contiguous(), nbr.contiguous(), weight.reshape(c, k * k).contiguous()
    b = bias.contiguous() if bias is not None else None
    out = torch.empty((m, c), dtype=out_dtype or x.dtype)
    _c().sparse_dwconv_forward(
        x.data_ptr(), nbr.data_ptr(), w.data_ptr(), b.data_ptr() if b is not None else 0, out.data_ptr(), m, c, k,
        CPP_DTYPE[x.dtype], CPP_DTYPE[w.dtype], CPP_DTYPE[b.dtype] if b is not None else 0, CPP_DTYPE[out.dtype], flip,
    )  # fmt: skip
    return out


def sparse_dwconv_wgrad(
    grad: torch.Tensor, x: torch.Tensor, nbr: torch.Tensor, k: int, need_bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gw [C, K*K] fp32 ``= sum_r grad[r] * x[nbr[t, r]]`` and gb [C] fp32 ``= grad.sum(0)`` (None unless
    ``need_bias``) for grad, x [M, C] and nbr [K*K, M] int32."""
    m, c = x.shape
    if tuple(grad.shape) != (m, c):
        raise ValueError(f"sparse_dwconv_wgrad: grad has shape {tuple(grad.shape)}, x {tuple(x.shape)}")
    _check_sparse("sparse_dwconv_wgrad", x, nbr, k, grad)
    grad, x, nbr = grad.contiguous(), x.contiguous(), nbr.contiguous()
    gw = torch.empty((c, k * k), dtype=torch.float32)
    gb = torch.empty(c, dtype=torch.float32) if need_bias else None
    _c().sparse_dwconv_wgrad(
        grad.data_ptr(), x.data_ptr(), nbr.data_ptr(), gw.data_ptr(), gb.data_ptr() if need_bias else 0, m, c, k,
        CPP_DTYPE[grad.dtype], CPP_DTYPE[x.dtype],
    )  # fmt: skip
    return gw, gb
