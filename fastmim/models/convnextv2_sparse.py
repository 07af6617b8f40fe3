"""ConvNeXt V2 on masked input, where masked regions cost nothing (FCMAE's sparse encoder).

``sparse_forward(model, imgs, visible, backend)`` runs a dense ``ConvNeXtV2``'s own modules on the visible patches
only; every backend computes the same function (SparK's and FCMAE's semantics: each layer's output is kept at visible
positions and is zero at masked ones, and masked inputs read as zero):

- ``dense_masked``: the reference. Dense ops on the whole image, then masked positions set to zero after every layer
  whose output would be non-zero there (convs, LayerNorm, the pointwise layers, GRN). Cost: the dense model.
- ``fastmim``: the visible pixels of each stage as rows [M, C] (``fastmim.ops.SparseLayout``). The stem and the 2x2
  downsampling convs are matmuls on the patches of active pixels only; the depthwise 7x7 conv is
  ``fastmim.ops.sparse_dwconv`` (active outputs only, masked taps read as zero; Triton on GPUs); LayerNorm, the
  pointwise MLP and GRN (its global statistic over each sample's visible pixels) run on the rows. Cost: proportional
  to the visible fraction.
- ``spconv``: the ``fastmim`` rows path with the stem and the 2x2 downsampling convs as regular sparse convolutions of
  the library spconv (an optional dependency: ``pip install spconv-cu120``, which runs on CPU too; algorithm
  ``ConvAlgo.Native``), on the model's own conv weights. spconv has no depthwise conv, so the 7x7 one and everything
  after it are the ``fastmim`` backend's. spconv has no bf16 kernels: under bf16 autocast its convs take bf16-rounded
  inputs and compute in fp32 (a bf16 GEMM's result); its index building syncs with the host, and it does not trace
  under torch.compile.

Masks are patch-structured: a patch of P pixels (P a multiple of the model's total stride, 32) is P/4 x P/4 pixels
at stage 0, P/8 at stage 1, ... , P/32 at the last stage, so a stage-i pixel is either wholly visible or wholly masked
and the 2x2 downsampling never mixes the two.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.models.convnextv2 import Block, ConvNeXtV2, drop_path_keep
from fastmim.models.vit import checkpointed
from fastmim.ops import SparseLayout, sparse_dwconv
from fastmim.ops import grn as fused_grn
from fastmim.ops import layer_norm as fused_layer_norm

BACKENDS = ("dense_masked", "fastmim", "spconv")


def stage_masks(visible: torch.Tensor, img_size: tuple[int, int], model: ConvNeXtV2) -> list[torch.Tensor]:
    """The patch mask upsampled to each stage's resolution: a list of [B, H_i, W_i] bool (True = visible).

    Raises:
        ValueError: the mask grid does not tile the image into patches that are a multiple of the total stride.
    """
    if visible.dim() != 3 or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool mask [B, gh, gw], got {visible.dtype} {tuple(visible.shape)}")
    (h, w), (gh, gw) = img_size, visible.shape[1:]
    if gh == 0 or gw == 0 or h % gh or w % gw or (h // gh) % model.stride or (w // gw) % model.stride:
        raise ValueError(
            f"a {gh}x{gw} mask grid does not fit a {h}x{w} image: each patch must be a whole multiple of the "
            f"encoder's total stride {model.stride} px (e.g. 32-px patches: a {h // 32}x{w // 32} grid)"
        )
    masks, scale = [], 4
    for _ in model.stages:
        fy, fx = h // gh // scale, w // gw // scale
        masks.append(visible.repeat_interleave(fy, dim=1).repeat_interleave(fx, dim=2))
        scale *= 2
    return masks


def sparse_forward(
    model: ConvNeXtV2,
    imgs: torch.Tensor,
    visible: torch.Tensor,
    backend: str = "fastmim",
    visible_per_sample: int | None = None,
):
    """Last-stage features [B, C, H/32, W/32] of ``imgs`` [B, C, H, W] seen through ``visible`` [B, gh, gw] (bool,
    True = visible patch); zero at masked positions. ``backend``: "dense_masked", "fastmim" or "spconv" (same values).
    ``visible_per_sample``: the number of visible patches in every sample, when the caller knows it (FCMAE's masks
    keep the same count per sample): the fastmim backend then runs without host syncs and traces under
    torch.compile(fullgraph=True); otherwise it finds the counts from the mask (a few host syncs).

    Raises:
        ImportError: backend "spconv" without the spconv package (``pip install spconv-cu120``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"sparse backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "spconv":
        _spconv()  # the optional dependency: fail before any work, naming the package
    if imgs.dim() != 4 or imgs.shape[1] != model.in_chans:
        raise ValueError(f"expected images [B, {model.in_chans}, H, W], got {tuple(imgs.shape)}")
    if visible.shape[0] != imgs.shape[0]:
        raise ValueError(f"the mask has {visible.shape[0]} samples, the images {imgs.shape[0]}")
    masks = stage_masks(visible.to(imgs.device), tuple(imgs.shape[-2:]), model)
    if backend == "dense_masked":
        return _dense_masked(model, imgs, masks)
    if backend == "spconv":
        return _sparse_rows(model, imgs, masks, visible_per_sample, _stem_spconv, _downsample_spconv)
    return _sparse_rows(model, imgs, masks, visible_per_sample)


# --- dense_masked: the reference ------------------------------------------------------------------------------------


def _masked(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """y with masked positions zeroed, in y's own dtype (a float mask of another dtype would promote bf16 to fp32)."""
    return y * m.to(y.dtype)


def _dense_masked(model: ConvNeXtV2, imgs: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    m = [mk.unsqueeze(1) for mk in masks]  # [B, 1, H_i, W_i] bool, True = visible
    x = _masked(model.stem[0](imgs), m[0])
    x = _masked(model.stem[1](x), m[0])
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            x = _masked(stage.downsample[0](x), m[i - 1])
            x = _masked(stage.downsample[1](x), m[i])
        mc = m[i].permute(0, 2, 3, 1)  # [B, H, W, 1]
        for blk in stage.blocks:
            x = checkpointed(blk.call_with, _dense_masked_block, x, m[i], mc, enabled=model.grad_ckpt)
    return x


def _dense_masked_block(blk: Block, x: torch.Tensor, m: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
    y = _masked(blk.conv_dw(x), m).permute(0, 2, 3, 1)  # [B, H, W, C]
    y = _masked(blk.norm(y), mc)
    y = blk.mlp.act(_masked(blk.mlp.fc1(y), mc))  # GELU(0) = 0
    y = _masked(blk.mlp.grn(y), mc)  # masked positions are zero, so GRN's norm is over the visible ones
    y = _masked(blk.mlp.fc2(y), mc)
    return x + blk.drop_path(y.permute(0, 3, 1, 2))


# --- fastmim: visible pixels as rows ---------------------------------------------------------------------------------


StemFn = Callable[[torch.Tensor, SparseLayout, nn.Conv2d], torch.Tensor]  # (imgs, layout 0, conv) -> rows [M0, C0]
DownsampleFn = Callable[[torch.Tensor, SparseLayout, SparseLayout, nn.Conv2d], torch.Tensor]  # (x, prev, cur, conv)


def _sparse_rows(
    model: ConvNeXtV2,
    imgs: torch.Tensor,
    masks: list[torch.Tensor],
    per_sample: int | None,
    stem: StemFn | None = None,
    downsample: DownsampleFn | None = None,
) -> torch.Tensor:
    """The rows path; ``stem`` and ``downsample`` compute the stem and 2x2 downsampling convs (default: matmuls on
    the active patches, ``_stem_rows`` and ``_downsample_rows``; the spconv backend passes its own)."""
    stem, downsample = stem or _stem_rows, downsample or _downsample_rows
    b = imgs.shape[0]
    if per_sample is None:
        layouts = [SparseLayout.from_mask(mk) for mk in masks]
        counts = masks[-1].flatten(1).sum(1)  # visible last-stage pixels per sample (one host sync)
        uniform = bool((counts == counts[0]).all())  # FCMAE: the same count in every sample
    else:  # the row counts are known: no host sync
        gh, gw = masks[-1].shape[1:]
        layouts = []
        for mk in masks:
            pixels_per_patch = (mk.shape[1] // gh) * (mk.shape[2] // gw)
            layouts.append(SparseLayout.from_mask(mk, num_rows=b * per_sample * pixels_per_patch))
        uniform = True
    stem_conv, stem_norm = model.stem[0], model.stem[1]
    x = stem(imgs, layouts[0], stem_conv)  # [M0, C0]
    x = F.layer_norm(x, stem_norm.normalized_shape, stem_norm.weight, stem_norm.bias, stem_norm.eps)
    for i, stage in enumerate(model.stages):
        layout = layouts[i]
        if not isinstance(stage.downsample, nn.Identity):
            norm, conv = stage.downsample
            x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            x = downsample(x, layouts[i - 1], layout, conv)
        if len(stage.blocks):
            k = stage.blocks[0].conv_dw.kernel_size[0]
            nbr = layout.neighbors(k)  # [k*k, M], shared by the stage's blocks, forward and backward
        for blk in stage.blocks:
            x = checkpointed(blk.call_with, _rows_block, x, nbr, layout.batch, b, uniform, model.fused_norm,
                             enabled=model.grad_ckpt)  # fmt: skip
    return layouts[-1].scatter(x).permute(0, 3, 1, 2)  # [B, C, H/32, W/32]


def _stem_rows(imgs: torch.Tensor, layout: SparseLayout, conv: nn.Conv2d) -> torch.Tensor:
    """The 4x4 stride-4 stem conv at the active pixels of ``layout``: a matmul on each one's 4x4 image patch, in
    (c, ky, kx) order. -> [M0, C0]"""
    b, c, h, w = imgs.shape
    patches = imgs.reshape(b, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 4, w // 4, c * 16)
    return F.linear(layout.gather(patches), conv.weight.flatten(1), conv.bias)


def _downsample_rows(x: torch.Tensor, prev: SparseLayout, cur: SparseLayout, conv: nn.Conv2d) -> torch.Tensor:
    """2x2 stride-2 conv at the active pixels of ``cur``: each reads the 2x2 block of ``prev`` rows below it (all
    active, as masks are patch-aligned; a masked one would read as zero)."""
    bsz, h2, w2 = prev.index.shape
    blocks = prev.index.view(bsz, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 2, 4).reshape(bsz, h2 // 2, w2 // 2, 4)
    ids = cur.gather(blocks).long()  # [M, 4] rows of prev in (ky, kx) order, -1 = masked
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row -1 reads the zero row
    g = x_pad[ids].permute(0, 2, 1).reshape(ids.shape[0], x.shape[1] * 4)  # [M, C * 4] in (c, ky, kx) order
    return F.linear(g, conv.weight.flatten(1), conv.bias)


# --- spconv: the stem and the downsampling convs through spconv, the rest as in fastmim -----------------------------

_SPCONV_DTYPES = (torch.float16, torch.float32, torch.float64)  # spconv 2.3 has no bf16 kernels


@functools.cache
def _spconv():
    """(spconv.pytorch.ops, spconv.pytorch.functional, ConvAlgo), imported on first use: an optional dependency."""
    try:
        with warnings.catch_warnings():  # import-time noise: torch.cuda.amp.custom_fwd, locale.getdefaultlocale
            warnings.filterwarnings("ignore", r".*torch\.cuda\.amp\.custom_(fwd|bwd)", FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ccimport\.")
            from spconv.pytorch import ConvAlgo, functional, ops
    except ImportError as e:
        raise ImportError(
            'sparse backend "spconv" needs the spconv package: pip install spconv-cu120 (it runs on CPU too), or '
            f'pip install "fastmim[sparse]" ({e})'
        ) from e
    return ops, functional, ConvAlgo


def _stem_spconv(imgs: torch.Tensor, layout: SparseLayout, conv: nn.Conv2d) -> torch.Tensor:
    """The stem conv (kernel = stride, no padding) through spconv, on the image pixels under the active pixels of
    ``layout`` (all of each one's receptive field, as masks are patch-aligned). -> [M0, C0] in ``layout``'s rows."""
    b, c, h, w = imgs.shape
    (kh, kw), (_, hs, ws) = conv.kernel_size, layout.shape
    yx = layout.pixel % (hs * ws)
    ky = torch.arange(kh, device=imgs.device).view(1, kh, 1)
    kx = torch.arange(kw, device=imgs.device).view(1, 1, kw)
    ys = ((yx // ws) * kh).view(-1, 1, 1) + ky  # [M0, kh, 1] image rows under each active pixel
    xs = ((yx % ws) * kw).view(-1, 1, 1) + kx  # [M0, 1, kw]
    bs = layout.batch.view(-1, 1, 1)
    bs, ys, xs = (t.expand(-1, kh, kw).reshape(-1) for t in (bs, ys, xs))  # [M0 * kh * kw] each
    feats = imgs[bs, :, ys, xs]  # [M0 * kh * kw, C] pixels (masked ones are never read: they read as zero)
    coords = torch.stack([bs, ys, xs], dim=1).int()  # spconv's indices: int32 (batch, y, x)
    return _spconv_conv(feats, coords, (b, h, w), conv, layout)


def _downsample_spconv(x: torch.Tensor, prev: SparseLayout, cur: SparseLayout, conv: nn.Conv2d) -> torch.Tensor:
    """The 2x2 stride-2 downsampling conv through spconv: rows [M, C] of ``prev`` -> rows of ``cur``."""
    _, h, w = prev.shape
    yx = prev.pixel % (h * w)
    coords = torch.stack([prev.batch, yx // w, yx % w], dim=1).int()  # [M, 3] (batch, y, x)
    return _spconv_conv(x, coords, prev.shape, conv, cur)


def _spconv_conv(
    feats: torch.Tensor, coords: torch.Tensor, in_shape: tuple[int, int, int], conv: nn.Conv2d, out: SparseLayout
) -> torch.Tensor:
    """``conv`` (no padding, dilation 1, groups 1) as an spconv regular sparse convolution (``SparseConv2d``'s own
    op path: ``ops.get_indice_pairs`` + ``functional.indice_conv``, ``ConvAlgo.Native``) on the sparse tensor
    ``feats`` [N, C_in] at ``coords`` [N, 3] int32 (batch, y, x) of a [B, H, W] map (``in_shape``), with ``conv``'s
    own weight and bias, so their gradients land there. -> [M, C_out] in the rows of ``out``, its active set."""
    ops, functional, algo = _spconv()
    bsz, h, w = in_shape
    dev = feats.device.type
    # the dtype the dense conv computes in: the autocast dtype under autocast, which spconv's own cuda custom_fwd
    # would override with fp16 (so autocast is off around the call and the casts are explicit)
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else feats.dtype
    compute = dtype if dtype in _SPCONV_DTYPES else torch.float32  # bf16: bf16-rounded inputs, fp32 GEMM
    weight = conv.weight.permute(0, 2, 3, 1)  # [C_out, kh, kw, C_in]: spconv's KRSC layout (a view of ours)
    if out.num_rows == 0 or feats.shape[0] == 0:  # spconv rejects an empty set; keep feats and conv in the graph
        return F.linear(feats[:0].repeat(1, weight[0, ..., 0].numel()), weight.flatten(1), conv.bias)  # [0, C_out]
    outids, pairs, pair_num = ops.get_indice_pairs(
        coords, bsz, [h, w], algo.Native, list(conv.kernel_size), list(conv.stride), [0, 0], [1, 1], [0, 0]
    )
    with torch.autocast(dev, enabled=False):
        f = feats.to(dtype).to(compute).contiguous()
        k = weight.to(dtype).to(compute).contiguous()  # spconv's backward needs a contiguous weight
        y = functional.indice_conv(f, k, pairs, pair_num, outids.shape[0], algo.Native)  # [M, C_out]
        if conv.bias is not None:
            y = y + conv.bias.to(dtype).to(compute)
        y = y.to(dtype)
    if y.shape[0] != out.num_rows:
        raise RuntimeError(f"spconv gave {y.shape[0]} output pixels, the mask has {out.num_rows} (not patch-aligned?)")
    # spconv numbers its outputs in its own order; put each at its (b, y, x) raster row of ``out`` (no host sync)
    _, ho, wo = out.shape
    flat = (outids[:, 0].long() * ho + outids[:, 1]) * wo + outids[:, 2]  # [M] flat output pixel
    dest = out.index.view(-1)[flat].long()  # [M] its row in ``out``
    return y.new_empty(y.shape).index_copy(0, dest, y)


def _rows_block(
    blk: Block, x: torch.Tensor, nbr: torch.Tensor, batch: torch.Tensor, bsz: int, uniform: bool, fused_norm: bool
) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):  # as autocast casts the dense conv's input (the residual may be fp32)
        x_in = x.to(torch.get_autocast_dtype(x.device.type))
    else:
        x_in = x
    y = sparse_dwconv(x_in, nbr, blk.conv_dw.weight, blk.conv_dw.bias)  # [M, C]
    if fused_norm:  # in the autocast dtype (fc1's input) directly: no fp32 copy and cast, forward and backward
        y = fused_layer_norm(y, blk.norm.weight, blk.norm.bias, blk.norm.eps)
    else:
        y = blk.norm(y)
    y = blk.mlp.act(blk.mlp.fc1(y))
    y = grn_rows(blk.mlp.grn, y, batch, bsz, uniform)
    y = blk.mlp.fc2(y)
    if blk.drop_path.p > 0.0 and blk.training:  # the same per-sample draw as the dense DropPath
        y = y * drop_path_keep(bsz, blk.drop_path.p, y)[batch].unsqueeze(1)
    return x + y


def grn_rows(grn: nn.Module, y: torch.Tensor, batch: torch.Tensor, bsz: int, uniform: bool = False) -> torch.Tensor:
    """GRN on rows [M, C]: each sample's statistic over its own rows (its visible pixels).

    Rows are in (sample, y, x) order, so with the same number of rows in every sample (``uniform``, as FCMAE's masks
    give) it is the fused ``fastmim.ops.grn`` on a [B, M / B, C] view (Triton on GPUs: two launches forward, three
    backward, in y's dtype with fp32 statistics); otherwise a scatter-add by sample. The norm is computed in fp32
    (autocast runs the dense GRN's norm in fp32 too).
    """
    if uniform and bsz > 0 and y.shape[0] % bsz == 0:
        return fused_grn(y.view(bsz, -1, y.shape[1]), grn.weight, grn.bias, grn.eps).view(y.shape)
    sq = torch.zeros(bsz, y.shape[1], device=y.device, dtype=torch.float32)
    sq = sq.index_add(0, batch, y.float().square())  # [B, C] sum of squares per sample and channel
    gx = sq.clamp_min(1e-30).sqrt()  # clamp: a zero norm gets the zero subgradient, as vector_norm's does
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)  # [B, C]
    return y + torch.addcmul(grn.bias, grn.weight, y * nx[batch])
