"""Plain PyTorch references: the semantics every fused backend of ``fastmim.ops`` must match (MAE conventions)."""

from __future__ import annotations

import math

import torch

# the normalisation fastmim's images carry (fastmim.data.transforms uses these)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_images(imgs: torch.Tensor, patch_size: int) -> tuple[int, int]:
    if imgs.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(imgs.shape)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    h, w = imgs.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    return h // patch_size, w // patch_size


def patchify_ref(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patch vectors in (p, q, c) order (channels last), as MAE."""
    gh, gw = _check_images(imgs, patch_size)
    b, c, p = imgs.shape[0], imgs.shape[1], patch_size
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # [B, gh, gw, p, p, C]
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify_ref(x: torch.Tensor, patch_size: int, grid: int | tuple[int, int], channels: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W]; the inverse of ``patchify_ref``. ``grid``: (gh, gw), or one int (square)."""
    gh, gw = grid if isinstance(grid, (tuple, list)) else (grid, grid)  # one int (or SymInt): a square grid
    b, n, d = x.shape
    p = patch_size
    if n != gh * gw or d != p * p * channels:
        raise ValueError(f"tokens {tuple(x.shape)} do not match grid {gh}x{gw}, patch {p}, channels {channels}")
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def patch_stats_ref(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std for MAE's norm-pix target: ``var`` is unbiased, std = sqrt(var + eps).

    Args:
        target: [B, L, D] patchified images.
    Returns: mean [B, L, 1], std [B, L, 1], in fp32 (float64 for a float64 target).
    """
    t = target.to(torch.promote_types(target.dtype, torch.float32))  # (float64 stays float64: 1e30-pixel patches)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)  # unbiased, as torch.var in MAE
    return mean, (var + eps) ** 0.5


def gather_visible_ref(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Keeps the visible tokens: [B, N, D] -> [B, K, D] with ``out[b, k] = x[b, ids_keep[b, k]]`` (MAE's encoder)."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_masked_ref(
    x_vis: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's decoder input: visible tokens back in their places, the mask token everywhere else.

    Args:
        x_vis: [B, K, D] visible tokens (no class token).
        ids_restore: [B, N]; ``ids_restore[b, n] < K`` picks ``x_vis[b, ids_restore[b, n]]``, larger values the mask
            token (MAE's argsort of the shuffle).
        mask_token: [D] or [1, 1, D].
        pos_embed: optional [N(+1), D] or [1, N(+1), D], added to every row (row 0 is the class token's).
        cls_token: optional [B or 1, 1, D] (or [B or 1, D], [D]) put in front as row 0.
    Returns: [B, N(+1), D] in the promoted dtype of the inputs.
    """
    b, k, d = x_vis.shape
    n = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, d).expand(b, n - k, d)
    x = torch.cat([x_vis, mask_tokens], dim=1)  # [B, N, D] (promotes dtypes as MAE's cat does)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # unshuffle
    if cls_token is not None:
        cls = cls_token.reshape(-1, 1, d).expand(b, 1, d)
        x = torch.cat([cls, x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, -1, d)
    return x


def masked_mse_loss_patchified_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix: bool = True,
    eps: float = 1e-6,
    p: int = 2,
) -> torch.Tensor:
    """MAE's reconstruction loss on already-patchified targets: mean over masked patches of the per-patch mean error.

    Args:
        pred: [B, L, D] predicted patches.
        target: [B, L, D] target patches.
        mask: [B, L] weights, 1 for masked patches (the only ones that count), 0 for visible: patches with weight 0
            are ignored entirely, even NaN or infinite ones.
        norm_pix: normalise each target patch by its own mean and std (MAE's norm_pix_loss).
        eps: added to the per-patch variance.
        p: 2 for squared error (MAE), 1 for absolute error (SimMIM).
    Returns: the 0-d loss, in float32 (float64 for a float64 ``pred``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, the target patches {tuple(target.shape)}")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(pred.shape[:2])}")
    dt = torch.promote_types(pred.dtype, torch.float32)  # fp32, float64 for a float64 pred
    target = target.to(dt)
    if norm_pix:
        mean, std = patch_stats_ref(target, eps)
        target = (target - mean) / std
    diff = pred.to(dt) - target
    err = diff.abs() if p == 1 else diff.square()
    loss = err.mean(dim=-1)  # [B, L] mean error per patch
    mask = mask.to(dt)
    denom = mask.sum()
    # checked on CPU only: on an accelerator the check would cost a host sync every step
    if denom.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(denom > 0):
        raise ValueError(f"masked loss (reference): the mask's weights sum to {float(denom):g}, not a positive number "
                         "(no masked patch, or negative or NaN weights): the masked loss is undefined")  # fmt: skip
    # patches with weight 0 do not count even when not finite (the fused kernels never read them); MAE's
    # (loss * mask) would turn a NaN there into a NaN loss
    return torch.where(mask != 0, loss * mask, 0.0).sum() / denom


def masked_mse_loss_ref(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    p: int = 2,
) -> torch.Tensor:
    """MAE's reconstruction loss from images: ``masked_mse_loss_patchified_ref(pred, patchify_ref(imgs), ...)``.

    Args:
        pred: [B, L, p*p*C] predicted patches.
        imgs: [B, C, H, W] images.
        mask: [B, L], 1 for masked patches (the only ones that count), 0 for visible.
        patch_size: patch side.
        norm_pix, eps, p: as ``masked_mse_loss_patchified_ref``.
    """
    target = patchify_ref(imgs, patch_size)  # [B, L, D]
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, the patchified images {tuple(target.shape)}")
    return masked_mse_loss_patchified_ref(pred, target, mask, norm_pix, eps, p)


def sparse_dwconv_ref(
    x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Submanifold depthwise KxK convolution on the active pixels of a feature map, stored as rows (FCMAE's sparse
    ConvNeXt): ``out[r, c] = bias[c] + sum_t weight[c, 0, t // K, t % K] * x[nbr[t, r], c]``, taps with
    ``nbr = -1`` (masked or outside the image) reading zero.

    Equal to scattering the rows into a zero [B, C, H, W] map, ``F.conv2d(dense, weight, bias, padding=K // 2,
    groups=C)`` and reading the result back at the active pixels.

    Args:
        x: [M, C] active rows.
        nbr: [K*K, M] int row id of tap t's input pixel, -1 for none (``SparseLayout.neighbors``).
        weight: [C, 1, K, K], a depthwise ``nn.Conv2d`` weight.
        bias: optional [C].
    Returns: [M, C] in x's dtype, computed in fp32 (float64 where an input is float64) and rounded once, as the
    kernels do.
    """
    m, c = x.shape
    kk = nbr.shape[0]
    stat = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    rows = torch.cat([x.to(stat), x.new_zeros(1, c, dtype=stat)])  # [M + 1, C]: row M is the zero empty taps read
    ids = torch.where(nbr < 0, m, nbr.long())  # [K*K, M]
    w = weight.reshape(c, kk).to(stat)  # [C, K*K]
    out = None
    for t in range(kk):  # one tap at a time: [M, C] memory, not [K*K, M, C]
        term = rows.index_select(0, ids[t]) * w[:, t]
        out = term if out is None else out + term
    if out is None:  # K*K = 0 cannot happen (odd K); keeps the type checker honest
        out = x.new_zeros(m, c, dtype=stat)
    if bias is not None:
        out = out + bias.to(stat)
    return out.to(x.dtype)


def grn_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global Response Norm (ConvNeXt V2) of each sample's rows: ``gx[b, c] = ||x[b, :, c]||_2``,
    ``nx = gx / (mean_c gx[b] + eps)``, ``out = x * (1 + weight * nx) + bias``.

    Args:
        x: [B, N, C], N rows per sample (its visible pixels, or all H*W of a dense map).
        weight: [C] (the paper's gamma).
        bias: [C] (the paper's beta).
        eps: added to the mean norm.
    Returns: [B, N, C] in x's dtype, computed in fp32 (float64 for float64 input) and rounded once. The norm's
    gradient is zero where a channel is zero in a sample (``vector_norm``'s subgradient).
    """
    stat = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(stat)
    gx = torch.linalg.vector_norm(xf, ord=2, dim=1, keepdim=True)  # [B, 1, C]
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)  # [B, 1, C]
    out = xf * (1 + weight.to(stat) * nx) + bias.to(stat)  # [B, N, C]
    return out.to(x.dtype)


def default_norm_dtype(x: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    """add_layer_norm's output dtype when none is given: the autocast dtype when autocast is on for x's device (what
    the next matmul casts to), else the dtype of x + residual."""
    dev = x.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device autocast does not know (meta): no autocast there
        on = False
    return torch.get_autocast_dtype(dev) if on else torch.promote_types(x.dtype, residual.dtype)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm transformer's residual add and the LayerNorm after it: ``s = x + residual`` (in their promoted
    dtype), ``y = LayerNorm(s)`` over the last dim with fp32 statistics, cast to ``out_dtype`` (default: the
    autocast dtype when autocast is on, else s's dtype: what the next matmul would cast it to). Returns (y, s)."""
    s = x + residual
    out_dtype = out_dtype or default_norm_dtype(x, residual)
    stat = torch.promote_types(s.dtype, torch.float32)
    y = torch.nn.functional.layer_norm(s.to(stat), (s.shape[-1],), weight.to(stat), bias.to(stat), eps)
    return y.to(out_dtype), s


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``LayerNorm(x)`` over the last dim with fp32 statistics (float64 for float64 x), cast to ``out_dtype``
    (default: the autocast dtype when autocast is on, else x's dtype): ``add_layer_norm_ref`` without the add."""
    out_dtype = out_dtype or default_norm_dtype(x, x)
    stat = torch.promote_types(x.dtype, torch.float32)
    y = torch.nn.functional.layer_norm(x.to(stat), (x.shape[-1],), weight.to(stat), bias.to(stat), eps)
    return y.to(out_dtype)


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A transformer MLP's first activation with its bias: ``gelu(x + bias)`` (the exact, erf form of nn.GELU) over
    the last dim, computed in fp32 (float64 for float64 x) and returned in x's dtype. ``x`` is ``fc1``'s matmul
    without its bias."""
    stat = torch.promote_types(x.dtype, torch.float32)
    return torch.nn.functional.gelu(x.to(stat) + bias.to(stat)).to(x.dtype)


def attention_ref(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Multi-head self-attention from a packed qkv [B, N, 3, H, hd] (a ViT's qkv projection, reshaped): per sample and
    head ``softmax(q k^T * scale) v`` (scale default hd^-0.5), non-causal, no mask, computed in fp32 and returned in
    qkv's dtype as [B, N, H, hd] (``.reshape(B, N, H * hd)`` is the output projection's input)."""
    scale = qkv.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return (p @ v).transpose(1, 2).to(qkv.dtype)  # [B, N, H, hd]


def hog_gaussian_window(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MaskFeat's (mmpretrain's) Gaussian window: ``size`` x ``size``, std size / 2, centred, summing to 1."""
    n = torch.arange(size, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    w = g[:, None] * g[None, :]
    return (w / w.sum()).to(dtype)


def hog_target_ref(
    imgs: torch.Tensor, patch_size: int = 16, cell_size: int = 8, nbins: int = 9, gaussian_window: int = 0
) -> torch.Tensor:
    """MaskFeat's HOG target of every patch, computed on the whole image as the official code does (SlowFast's
    ``HOGLayerC``, mmpretrain's ``HOGGenerator``): reflect-pad 1, per-channel Sobel ``gx`` (kernel
    [[1, 0, -1], [2, 0, -2], [1, 0, -1]]) and ``gy`` (its transpose), magnitude ``|(gx, gy)|``, orientation bin
    ``floor(atan2(gx, gy) / pi * nbins) mod nbins`` (unsigned, hard assignment of the magnitude), optionally times a
    ``gaussian_window``-px Gaussian window (std half its size, normalised, tiled), summed over ``cell_size`` cells,
    L2-normalised over the bins of each (channel, cell). Returns [B, L, C * nbins * (patch_size / cell_size)^2] fp32
    (float64 for float64 images), each patch's values in the order [channel, bin, cell row, cell col].

    A gradient exactly on a bin boundary (angle k * pi / nbins: with an even nbins, the vertical gradients of the top
    and bottom rows, where reflect padding zeroes gy) falls in the bin above it in exact arithmetic; fp32 ``atan2``
    may round it below, platform by platform. Float64 images give the exact bins (the fused kernels decide
    boundaries exactly too)."""
    b, c, h, w = imgs.shape
    dt = torch.promote_types(imgs.dtype, torch.float32)
    x = torch.nn.functional.pad(imgs.to(dt), (1, 1, 1, 1), mode="reflect")
    wx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=imgs.device, dtype=dt)
    kx = wx.view(1, 1, 3, 3).repeat(c, 1, 1, 1)
    gx = torch.nn.functional.conv2d(x, kx, groups=c)
    gy = torch.nn.functional.conv2d(x, kx.transpose(2, 3).contiguous(), groups=c)
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1)  # [B, C, H, W]
    phase = torch.atan2(gx, gy) / math.pi * nbins
    if gaussian_window:
        win = hog_gaussian_window(gaussian_window, imgs.device, dt)
        mag = mag * win.repeat(h // gaussian_window, w // gaussian_window)
    out = torch.zeros(b, c, nbins, h, w, device=imgs.device, dtype=dt)
    out.scatter_add_(2, (phase.floor().long() % nbins).unsqueeze(2), mag.unsqueeze(2))
    out = out.unfold(3, cell_size, cell_size).unfold(4, cell_size, cell_size).sum(dim=(-1, -2))  # [B, C, bins, h, w]
    out = torch.nn.functional.normalize(out, p=2, dim=2)
    k = patch_size // cell_size  # cells per patch side
    out = out.flatten(1, 2).permute(0, 2, 3, 1)  # [B, H/cell, W/cell, C * bins]
    out = out.unfold(1, k, k).unfold(2, k, k)  # [B, gh, gw, C * bins, k, k]
    return out.flatten(1, 2).flatten(2)


def fft_loss_ref(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, patch_size: int | None = None
) -> torch.Tensor:
    """A2MIM's focal frequency loss (openmixup ``A2MIMHead`` with ``fft_focal=True``, ``fft_unmask_replace='mixed'``;
    ``FocalFrequencyLoss(alpha=1, ave_spectrum=True, log_matrix=True, batch_matrix=True)``), written as the official
    code computes it.

    With a mask (``[B, L]`` tokens of ``patch_size`` px, 1 = masked): the prediction's visible pixels are replaced
    by ``0.5 * pred.detach() + 0.5 * target``. Each image's full complex 2-D FFT (orthonormal), spectra averaged
    over the batch, ``d2 = |F_pred - F_target|^2``, weights ``log(1 + sqrt(d2))`` divided by their maximum, NaN set to
    0, clamped to [0, 1] and detached; the loss is ``mean(w * d2)``. pred, target: [B, C, H, W]."""
    pred, target = pred.float(), target.float()
    if mask is not None:
        b, _, h, w = pred.shape
        m = mask.reshape(b, h // patch_size, w // patch_size).float()
        m = m.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
        pred = pred * m + (0.5 * pred.detach() + 0.5 * target) * (1 - m)
    fp = torch.fft.fft2(pred.unsqueeze(1), norm="ortho")
    ft = torch.fft.fft2(target.unsqueeze(1), norm="ortho")
    fp = torch.stack([fp.real, fp.imag], -1).mean(0, keepdim=True)
    ft = torch.stack([ft.real, ft.imag], -1).mean(0, keepdim=True)
    d2 = ((fp - ft) ** 2).sum(-1)
    w = torch.log(torch.sqrt(d2) + 1.0)
    w = w / w.max()
    w = torch.nan_to_num(w, nan=0.0).clamp(0.0, 1.0).detach()
    return (w * d2).mean()


def low_pass_filter(h: int, w: int, radius: float, device: torch.device | str | None = None) -> torch.Tensor:
    """PixMIM's ideal circular filter [h, w] fp32 in ``fftshift``'s layout: 1 where
    ``(i - (h-1)/2)^2 + (j - (w-1)/2)^2 <= radius^2``, else 0."""
    if not radius >= 0:
        raise ValueError(f"low_pass_filter: radius must be >= 0, got {radius!r}")
    i = torch.arange(h, dtype=torch.float64).view(-1, 1) - (h - 1) / 2
    j = torch.arange(w, dtype=torch.float64).view(1, -1) - (w - 1) / 2
    r = min(float(radius), float(h + w))  # past the corners: the whole spectrum (and no overflow of radius^2)
    return (i.square() + j.square() <= r * r).to(device=device, dtype=torch.float32)


def low_pass_target_ref(
    imgs: torch.Tensor,
    radius: float,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """PixMIM's low-frequency target (mmselfsup ``LowFreqTargetGenerator``), written as the official code computes
    it: the normalised images [B, C, H, W] un-normalised with ``mean`` / ``std``, ``fft2``, ``fftshift``, times
    ``low_pass_filter(H, W, radius)``, ``ifft2`` (no ``ifftshift``: the ``abs`` removes the modulation the shift
    leaves), ``abs``, normalised again. fp32 (float64 for float64 images)."""
    dt = torch.promote_types(imgs.dtype, torch.float32)
    m = torch.tensor(mean, dtype=dt, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dt, device=imgs.device).view(1, -1, 1, 1)
    x = imgs.to(dt) * s + m
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    spec = spec * low_pass_filter(x.shape[-2], x.shape[-1], radius, x.device).to(dt)
    return (torch.fft.ifft2(spec).abs() - m) / s


def patch_fft_loss_ref(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    alpha: float = 1.0,
    log_weights: bool = True,
) -> torch.Tensor:
    """The patch-based focal frequency loss (Jiang et al. 2021, the official ``FocalFrequencyLoss`` with
    ``patch_factor`` = one patch per token, ``ave_spectrum=False``, ``batch_matrix=False``), on masked patches only,
    written as the official code computes it.

    The predicted patches are put back into an image; both images are cut into their ``patch_size`` patches (row
    major, the token order), each patch's full complex 2-D FFT is taken (orthonormal), ``d2 = |F_pred - F_img|^2``
    per frequency, weights ``|F_pred - F_img|^alpha`` (then ``log(1 + .)`` if ``log_weights``) divided by their
    maximum over each (image, patch, channel) spectrum, NaN set to 0, clamped to [0, 1] and detached. Each patch's
    loss is the mean of ``w * d2`` over its channels and frequencies; the result is ``sum(mask * patch_loss) /
    sum(mask)`` as for ``masked_mse_loss_ref``. pred: [B, L, p*p*C] (MAE's (p, q, c) order), imgs: [B, C, H, W],
    mask: [B, L] weights (1 = masked)."""
    b, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    dt = torch.promote_types(pred.dtype, torch.float32)
    pred_img = unpatchify_ref(pred.to(dt), p, (gh, gw), c)

    def to_freq(x: torch.Tensor) -> torch.Tensor:
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
        f = torch.fft.fft2(patches, norm="ortho")
        return torch.stack([f.real, f.imag], -1)

    tmp = (to_freq(pred_img) - to_freq(imgs.to(dt))) ** 2
    d2 = tmp[..., 0] + tmp[..., 1]  # [B, L, C, p, p]
    wts = torch.sqrt(d2) ** alpha
    if log_weights:
        wts = torch.log(wts + 1.0)
    wts = wts / wts.max(-1).values.max(-1).values[..., None, None]
    wts = torch.nan_to_num(wts, nan=0.0).clamp(0.0, 1.0).detach()
    per_patch = (wts * d2).mean(dim=(2, 3, 4))  # [B, L]
    mask = mask.to(dt)
    return torch.where(mask != 0, per_patch * mask, 0.0).sum() / mask.sum()


def resized_crop_ref(
    images: list[torch.Tensor],
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interp: str = "bicubic",
) -> torch.Tensor:
    """Batched random-resized-crop augmentation of decoded images, one image at a time: image n ([C, H_n, W_n], uint8
    0-255 or float on that scale) cropped to ``boxes[n] = (top, left, height, width)``, resized to ``size x size``
    with the antialiased bicubic (or ``interp="bilinear"``) filter (PIL's convention, as
    ``torchvision.transforms.RandomResizedCrop`` on PIL images: separable, bicubic ``a = -0.5``, the support widened
    by the shrink factor; rows first, each pass clamped to [0, 255] as PIL's are, without its rounding to integers),
    mirrored left-right where ``flips[n]``, then ``(x / 255 - mean_c) / std_c``. Returns [N, C, size, size] fp32."""
    out = []
    for n, img in enumerate(images):
        top, left, h, w = (int(v) for v in boxes[n])
        x = img[:, top : top + h, left : left + w].to(torch.float32)[None]  # [1, C, h, w]
        for shape in ((h, size), (size, size)):  # rows, then columns, each clamped as PIL's 8-bit passes are
            x = torch.nn.functional.interpolate(x, size=shape, mode=interp, antialias=True, align_corners=False)
            x = x.clamp_(0, 255)
        if bool(flips[n]):
            x = x.flip(-1)
        out.append(x)
    return normalize_255(torch.cat(out) if out else torch.empty(0, len(mean), size, size), mean, std)


def normalize_255(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x / 255 - mean_c) / std_c`` of images [N, C, H, W] on the 0-255 scale."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x / 255 - m) / s
