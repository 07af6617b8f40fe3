"""What benchmarks/throughput.py can time: each recipe's model builder, its reference and its FLOP formula.

A recipe builds one model per mode from the same seed (so every mode starts from the same weights) and counts the
model FLOPs of one training image. ``reference`` is the straightforward PyTorch implementation the recipe's paper
describes, written here so that the speedups are measured against it and not against fastmim's own plain path.
Recipes: ``mae`` (ViT; reference = the MAE paper's code path), ``pixmim``, ``simmim``, ``a2mim`` and ``maskfeat`` (ViT;
reference = the recipe on plain PyTorch ops) and ``fcmae`` (ConvNeXt V2; reference = the dense model times the mask,
fastmim = visible pixels only) ``data2vec2`` (ViT; reference = M separate teacher + student passes per image,
fastmim = one patch embedding and one teacher pass for the M masks) and ``ijepa`` (ViT; reference = plain PyTorch
ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import fastmim
from fastmim.masking.random import num_visible
from fastmim.models.vit import checkpointed


class PaperMAE(nn.Module):
    """MAE's forward pass as the paper's code writes it, over the parameters of a fastmim MAE model.

    The same encoder and decoder blocks (SDPA attention, as timm uses today) and the same weights as fastmim's model;
    what differs is everything around them, done the straightforward way: random masking by noise + argsort with
    ``torch.gather`` over an index expanded D times, the decoder input built by concatenating mask tokens, an
    expanded-index gather to unshuffle and a concatenation for the class token, and the norm-pix loss computed on
    all patches and multiplied by the mask. Returns (loss, pred, mask) like the fastmim model.
    """

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def no_weight_decay(self) -> set[str]:
        return {f"mae.{n}" for n in self.mae.no_weight_decay()}

    def random_masking(self, x: torch.Tensor, ids_shuffle: torch.Tensor | None = None):
        b, n, d = x.shape  # [B, N, D]
        len_keep = num_visible(n, self.mae.mask_ratio)
        if ids_shuffle is None:
            noise = torch.rand(b, n, device=x.device)  # [B, N]
            ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))  # [B, K, D]
        mask = torch.ones(b, n, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor | None = None):
        m = self.mae
        x = m.patch_embed(imgs) + m.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, ids_shuffle)
        cls = (m.cls_token + m.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in m.blocks:  # (--grad-ckpt: checkpointed per block as fastmim's, so that modes compare alike)
            x = checkpointed(blk, x, enabled=m.grad_ckpt)
        return m.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        m = self.mae
        x = m.decoder_embed(x)
        mask_tokens = m.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no class token
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # append the class token
        x = x + m.decoder_pos_embed
        for blk in m.decoder_blocks:
            x = checkpointed(blk, x, enabled=m.grad_ckpt)
        x = m.decoder_pred(m.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.mae.patchify(imgs)
        if self.mae.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [B, N], mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean loss on removed patches

    def forward(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor | None = None):
        """imgs [B, C, H, W]; ``ids_shuffle`` [B, N] fixes the mask (for comparisons), drawn when None."""
        latent, mask, ids_restore = self.forward_encoder(imgs, ids_shuffle)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _transformer_flops(depth: int, width: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks on ``tokens`` tokens: qkv (3 w^2) + proj (w^2) + MLP (2 r w^2)
    multiply-adds per token, and QK^T + AV (2 t w each per token). 2 FLOPs per multiply-add."""
    per_token = (4 + 2 * mlp_ratio) * width * width
    return depth * (2.0 * per_token * tokens + 2.0 * 2.0 * tokens * tokens * width)


def mae_flops_per_image(model: nn.Module, forward_only: bool = False) -> float:
    """Model FLOPs of one MAE training image (forward + backward), counting matmuls only.

    Forward = patch embedding of all N patches (2 N p^2 C D) + encoder blocks on the K + 1 visible tokens +
    decoder_embed (2 (K+1) D Dd) + decoder blocks on N + 1 tokens + decoder_pred (2 (N+1) Dd p^2 C).
    Backward costs twice the forward (gradients for inputs and for weights), except the patch embedding, whose input
    (the images) needs no gradient: 1x. Recomputation (flash attention's backward) is not model FLOPs and is not
    counted, nor are norms, activations, the loss and the optimizer (under 1% together). Cross-checked against
    torch.utils.flop_counter in tests/test_benchmarks.py.
    """
    n = model.num_patches
    k = num_visible(n, model.mask_ratio)
    d, dd = model.embed_dim, model.decoder_embed.out_features
    p2c = model.patch_size**2 * model.in_chans
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / d
    dec_mlp_ratio = model.decoder_blocks[0].mlp.fc1.out_features / dd if len(model.decoder_blocks) else 4.0
    embed = 2.0 * n * p2c * d
    fwd = _transformer_flops(len(model.blocks), d, k + 1, mlp_ratio)
    fwd += 2.0 * (k + 1) * d * dd + _transformer_flops(len(model.decoder_blocks), dd, n + 1, dec_mlp_ratio)
    fwd += 2.0 * (n + 1) * dd * p2c
    return fwd + embed if forward_only else 3.0 * fwd + 2.0 * embed


def simmim_flops_per_image(model: nn.Module, forward_only: bool = False) -> float:
    """Model FLOPs of one SimMIM training image, matmuls only: patch embedding of all N patches (2 N p^2 C D), the
    encoder blocks on all N + 1 tokens (the masked ones as the mask token), the 1x1-convolution head (2 N D p^2 C).
    Backward 2x forward except the patch embedding (1x), as for MAE."""
    n = model.num_patches
    d = model.embed_dim
    p2c = model.patch_size**2 * model.in_chans
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / d
    embed = 2.0 * n * p2c * d
    fwd = _transformer_flops(len(model.blocks), d, n + 1, mlp_ratio) + 2.0 * n * d * p2c
    return fwd + embed if forward_only else 3.0 * fwd + 2.0 * embed


def maskfeat_flops_per_image(model: nn.Module, forward_only: bool = False) -> float:
    """Model FLOPs of one MaskFeat training image, matmuls only: patch embedding of all N patches, the encoder blocks
    on all N + 1 tokens, the linear head (2 N D target_dim). The HOG target is not matmul work. Backward 2x forward
    except the patch embedding (1x), as for MAE."""
    n, d = model.num_patches, model.embed_dim
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / d
    embed = 2.0 * n * model.patch_size**2 * model.in_chans * d
    fwd = _transformer_flops(len(model.blocks), d, n + 1, mlp_ratio) + 2.0 * n * d * model.target_dim
    return fwd + embed if forward_only else 3.0 * fwd + 2.0 * embed


def fcmae_flops_per_image(model: nn.Module, visible: float | None = None, forward_only: bool = False) -> float:
    """Model FLOPs of one FCMAE training image (forward + backward), counting convolutions and matmuls only, on the
    visible pixels of the encoder (the work the sparse computation must do; the dense_masked reference does more).

    Encoder at visible fraction v: stem 2 (HW/16) v 48 C0 (a 4x4x3 patch per pixel); per stage i with P_i = v H_i W_i
    pixels of width d: downsampling 2 P_i 4 d_{i-1} d, and per block the depthwise conv 2 P_i k^2 d plus the MLP
    2 P_i 2 r d^2 (r = 4). Decoder on all L patches: proj 2 L C3 Dd, its blocks, pred 2 L Dd p^2 C. Backward 2x
    forward except the stem (the images need no gradient). ``visible`` defaults to the model's kept fraction.
    Cross-checked against torch.utils.flop_counter on the forward pass: the counter over-counts a grouped conv's
    weight gradient C times (it treats a depthwise conv's weight gradient as a dense one), so the backward is not
    comparable there.
    """
    enc = model.encoder
    h, w = model.img_size
    v = num_visible(model.num_patches, model.mask_ratio) / model.num_patches if visible is None else visible
    pixels = v * (h // 4) * (w // 4)
    stem = 2.0 * pixels * 16 * model.in_chans * enc.dims[0]
    fwd, prev = 0.0, enc.dims[0]
    for i, stage in enumerate(enc.stages):
        d = enc.dims[i]
        if i > 0:
            pixels /= 4
            fwd += 2.0 * pixels * 4 * prev * d
        fwd += len(stage.blocks) * _convnext_block_flops(pixels, d, stage.blocks[0] if len(stage.blocks) else None)
        prev = d
    dd, n = model.proj.out_channels, model.num_patches
    fwd += 2.0 * n * enc.dims[-1] * dd
    fwd += len(model.decoder) * _convnext_block_flops(n, dd, model.decoder[0] if len(model.decoder) else None)
    fwd += 2.0 * n * dd * model.pred.out_channels
    return fwd + stem if forward_only else 3.0 * fwd + 2.0 * stem


def _convnext_block_flops(pixels: float, d: int, block) -> float:
    if block is None:
        return 0.0
    k = block.conv_dw.kernel_size[0]
    hidden = block.mlp.fc1.out_features
    return 2.0 * pixels * k * k * d + 2.0 * pixels * 2 * d * hidden


def _build_fcmae(model_name: str, impl: str, **kwargs) -> nn.Module:
    """reference: the dense model times the mask after every layer, with the plain loss (the official code's dense
    path); fastmim: visible pixels only, fused loss."""
    backend = "dense_masked" if impl == "reference" else "fastmim"
    return fastmim.create_model(model_name, sparse_backend=backend, fused_ops=impl == "fastmim", **kwargs)


def _build_mae(model_name: str, impl: str, **kwargs) -> nn.Module:
    model = fastmim.create_model(model_name, fused_ops=impl == "fastmim", **kwargs)
    return PaperMAE(model) if impl == "reference" else model


def _build_plain(model_name: str, impl: str, **kwargs) -> nn.Module:
    """reference: the recipe on plain PyTorch ops (fused_ops=False, the same computation); fastmim: fused ops."""
    return fastmim.create_model(model_name, fused_ops=impl == "fastmim", **kwargs)


class SeparatePasses(nn.Module):
    """data2vec 2.0 without its amortisation: each of the M masked copies of an image is a sample of its own, so the
    patch embedding and the teacher run M times per image (the images repeated M times, one mask each), as a
    data2vec-1-style loop over masks would. The same model, masks, targets and loss otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def forward(self, imgs: torch.Tensor, mask=None):
        m = self.model.num_masks
        if mask is None:
            mask = self.model.mask_strategy().draw(imgs.shape[0] * m, imgs.device, num_masks=1).info()
        return self.model(imgs.repeat_interleave(m, 0), mask=mask)


def data2vec2_flops_per_image(model: nn.Module, forward_only: bool = False) -> float:
    """Model FLOPs of one data2vec 2.0 training image with M masks, matmuls and convolutions only: the patch
    embedding once (2 N p^2 C D), per mask the student's blocks on the K + 1 visible tokens and the decoder on all N
    tokens (its grouped convolutions 2 N k^2 C_in C_out / groups, the projection 2 N Dd D), and the teacher once on
    N + 1 tokens (embedding and blocks, forward only). Backward 2x forward for the student and the decoder, 1x for the
    patch embedding, none for the teacher."""
    n, d, m = model.num_patches, model.embed_dim, model.num_masks
    k = n - model.mask_strategy().exact_hidden
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / d
    embed = 2.0 * n * model.patch_size**2 * model.in_chans * d
    student = _transformer_flops(len(model.blocks), d, k + 1, mlp_ratio)
    for conv in model.decoder.convs:
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        student += 2.0 * n * taps * conv.in_channels * conv.out_channels / conv.groups
    student += 2.0 * n * model.decoder.proj.in_features * model.decoder.proj.out_features
    teacher = embed + _transformer_flops(len(model.blocks), d, n + 1, mlp_ratio)
    if forward_only:
        return m * student + embed + teacher
    return 3.0 * m * student + 2.0 * embed + teacher


def ijepa_counts(model: nn.Module) -> tuple[float, int, float]:
    """(context tokens, target blocks, tokens per block) of I-JEPA's masks: the model's last forward's where it ran,
    else the mean over 8 batches of 64 drawn with seed 0 (the counts vary from batch to batch)."""
    if getattr(model, "last_counts", None) is not None:
        return model.last_counts
    ctx, tgt = [], []
    with torch.device("cpu"):  # real masks, also while the model is built on the meta device
        strategy = model.mask_strategy()
        for i in range(8):
            m = strategy(indices=torch.arange(64) + 64 * i)
            ctx.append(model.num_patches - m.num_hidden)
            tgt.append(float(m.targets.flatten(2).sum(-1).min()))
    return sum(ctx) / len(ctx), strategy.num_targets, sum(tgt) / len(tgt)


def ijepa_flops_per_image(model: nn.Module, forward_only: bool = False) -> float:
    """Model FLOPs of one I-JEPA training image, matmuls only: the patch embedding (2 N p^2 C D), the encoder on the
    Nc context tokens (no class token), the predictor's embedding of the context (2 Nc D Dp), then per target block
    its blocks on Nc + T tokens and the projection (2 T Dp D), and the teacher once on N tokens (embedding and blocks,
    forward only). Backward 2x forward for the encoder and the predictor, 1x for the patch embedding, none for the
    teacher. Counts from ``ijepa_counts``."""
    nc, k, t = ijepa_counts(model)
    n, d = model.num_patches, model.embed_dim
    dp = model.predictor_embed.out_features
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / d
    embed = 2.0 * n * model.patch_size**2 * model.in_chans * d
    student = _transformer_flops(len(model.blocks), d, nc, mlp_ratio)  # no class token
    pred_mlp = model.predictor_blocks[0].mlp.fc1.out_features / dp if len(model.predictor_blocks) else 4.0
    student += 2.0 * nc * d * dp  # the predictor's embedding runs once, before the context is repeated per block
    student += k * (_transformer_flops(len(model.predictor_blocks), dp, nc + t, pred_mlp) + 2.0 * t * dp * d)
    teacher = embed + _transformer_flops(len(model.blocks), d, n, mlp_ratio)
    return student + embed + teacher if forward_only else 3.0 * student + 2.0 * embed + teacher


def _build_data2vec2(model_name: str, impl: str, **kwargs) -> nn.Module:
    """reference: M separate teacher + student passes per image (``SeparatePasses``, fused ops off); fastmim: one
    patch embedding and one teacher pass per image for its M masks, fused ops."""
    model = fastmim.create_model(model_name, fused_ops=impl == "fastmim", **kwargs)
    return SeparatePasses(model) if impl == "reference" else model


def core_model(model: nn.Module) -> nn.Module:
    """The fastmim model inside a reference wrapper."""
    if isinstance(model, PaperMAE):
        return model.mae
    return model.model if isinstance(model, SeparatePasses) else model


@dataclass(frozen=True)
class Recipe:
    """model_prefix + a --model name is a registered model; build(name, impl, **kwargs) makes it for one mode
    (impl "reference" or "fastmim"); flops_per_image(model, forward_only=False) is the formula; the model maps images
    to (loss, ...); count_kwargs build the model torch.utils.flop_counter counts (every FLOP visible to it), over
    forward and backward or, with count_backward False, the forward only."""

    name: str
    model_prefix: str
    build: Callable[..., nn.Module]
    flops_per_image: Callable[[nn.Module], float]
    count_kwargs: dict = field(default_factory=dict)
    count_backward: bool = True
    default_model: str = "vit_base_patch16"  # --model when not given

    def model_name(self, model: str) -> str:
        return model if model.startswith(self.model_prefix) else self.model_prefix + model

    def flops(self, model: nn.Module, forward_only: bool = False) -> float:
        return self.flops_per_image(core_model(model), forward_only=forward_only)


RECIPES = {
    "mae": Recipe("mae", "mae_", _build_mae, mae_flops_per_image, {"attn_impl": "math"}),
    # PixMIM is MAE's computation with another target (an FFT of the image: not matmul FLOPs); SimMIM runs its
    # encoder on every token; both against their plain-PyTorch path
    "pixmim": Recipe("pixmim", "pixmim_", _build_plain, mae_flops_per_image, {"attn_impl": "math"}),
    "simmim": Recipe("simmim", "simmim_", _build_plain, simmim_flops_per_image, {"attn_impl": "math"}),
    # A2MIM: SimMIM's matmuls (its frequency loss is FFT work, not counted)
    "a2mim": Recipe("a2mim", "a2mim_", _build_plain, simmim_flops_per_image, {"attn_impl": "math"}),
    # MaskFeat: SimMIM's encoder, a linear head; reference = the official whole-image HOG and the plain loss
    "maskfeat": Recipe("maskfeat", "maskfeat_", _build_plain, maskfeat_flops_per_image, {"attn_impl": "math"}),
    # the rows backend: its matmuls and the sparse depthwise conv (a registered flop formula) are what is counted
    "fcmae": Recipe(
        "fcmae", "fcmae_", _build_fcmae, fcmae_flops_per_image, count_backward=False, default_model="convnextv2_base"
    ),
    # data2vec 2.0: forward only in the count (the counter over-counts a grouped conv's weight gradient, see fcmae)
    "data2vec2": Recipe(
        "data2vec2",
        "data2vec2_",
        _build_data2vec2,
        data2vec2_flops_per_image,
        {"attn_impl": "math"},
        count_backward=False,
    ),
    # I-JEPA: reference = the recipe on plain PyTorch ops; the counts of the masks drawn in the counted forward
    "ijepa": Recipe("ijepa", "ijepa_", _build_plain, ijepa_flops_per_image, {"attn_impl": "math"}),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
