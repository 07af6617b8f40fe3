"""MAE around a timm ViT the user already has: ``fastmim.create_model("mae", encoder=timm.create_model(...))``; FCMAE
from a timm ConvNeXt V2: ``fastmim.create_model("fcmae", encoder=timm.create_model("convnextv2_atto", ...))``.

The encoder is timm's own module (its weights, registers, class-token and position-embedding choices, a pretrained
checkpoint); fastmim adds MAE's decoder and runs the masking gather, the decoder's scatter and the loss on its fused
ops. ``encoder_state_dict()`` loads back into the same timm model. Supported: timm ``VisionTransformer``s with a
learned or fixed absolute position embedding (``pos_embed``), with or without a class token, with register tokens or
DeiT's distillation token, with ``no_embed_class``; not: rotary-embedding ViTs (EVA-02, or no ``pos_embed``) and
``dynamic_img_size``.

FCMAE's encoder is fastmim's sparse ConvNeXt V2 (masked convolutions need their own implementation): the timm
model's weights are copied into it (any depths and widths), and ``encoder_state_dict()`` loads back into the timm
model (all of it for a model built with ``num_classes=0``; a classifier head is not part of the encoder: load with
``strict=False`` and the head keeps its own weights).
"""

from __future__ import annotations

import torch
from torch import nn

from fastmim.masking.random import check_mask_ratio
from fastmim.methods.mae import MaskedAutoencoderViT, add_mae_decoder, refuse_norm_pix_off_for_hog
from fastmim.models.registry import register_model
from fastmim.models.vit import checkpointed
from fastmim.ops import gather_visible, gather_visible_ref
from fastmim.targets.choice import TargetChoice
from fastmim.targets.pixel import PixelTarget


class TimmMAE(TargetChoice, PixelTarget, nn.Module):
    """Args: encoder: a timm ``VisionTransformer`` instance; decoder_*: MAE's decoder (its defaults: 512 wide, 8
    blocks, 16 heads); mask_ratio, mask_type, norm_pix_loss, fused_ops, attn_impl, and the target (``target``:
    pixels, lowpass or hog, with ``hog_cell``, ``hog_bins``, ``gaussian_window``, ``low_pass_radius``, ``image_mean``,
    ``image_std``): as
    ``MaskedAutoencoderViT``."""

    grad_ckpt = False
    fused_norm = False  # the decoder's blocks run plainly (timm's blocks are the user's)

    def __init__(self, encoder: nn.Module, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, mask_ratio: float = 0.75,
                 mask_type: str = "random", norm_pix_loss: bool = True, fused_ops: bool = True,
                 attn_impl: str = "auto", target: str = "pixels", hog_cell: int | None = None,
                 hog_bins: int | None = None, gaussian_window: int | None = None,
                 low_pass_radius: float | None = None, image_mean=None, image_std=None):  # fmt: skip
        super().__init__()
        _check_encoder(encoder)
        check_mask_ratio(mask_ratio)  # (mask_type is checked by mask_strategy below)
        refuse_norm_pix_off_for_hog(self, target, norm_pix_loss)
        self.encoder = encoder
        pe = encoder.patch_embed
        self.patch_size = pe.patch_size[0]
        self.in_chans = pe.proj.in_channels
        self.num_patches = pe.num_patches
        self.grid_size = tuple(pe.grid_size)
        self.mask_ratio, self.mask_type = mask_ratio, mask_type
        self.norm_pix_loss, self.fused_ops = norm_pix_loss, fused_ops
        self._mask_strategy = None
        self._mask_strategy_ratio = None
        out_dim = self.set_target(target, hog_cell, hog_bins, gaussian_window, low_pass_radius, image_mean, image_std)
        add_mae_decoder(self, encoder.embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                        out_dim, attn_impl)  # fmt: skip
        self.mask_strategy()  # masks it cannot draw: refused here, not at the first forward

    # the mask, the decoder, the forward and the target's loss are MAE's own
    make_mask = MaskedAutoencoderViT.make_mask
    mask_strategy = MaskedAutoencoderViT.mask_strategy
    forward_decoder = MaskedAutoencoderViT.forward_decoder
    forward = MaskedAutoencoderViT.forward
    forward_loss = MaskedAutoencoderViT.forward_loss
    reconstruct = MaskedAutoencoderViT.reconstruct

    @property
    def patch_embed(self):  # what MaskedAutoencoderViT.mask_strategy reads
        return self.encoder.patch_embed

    def no_weight_decay(self) -> set[str]:
        own = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in own} | {"mask_token", "decoder_pos_embed"}

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """MAE's rule (1-D parameters and biases: the class and mask tokens decay); the timm encoder's other
        ``no_weight_decay()`` names (a learned position embedding, register tokens: MAE's ViT has neither) keep
        timm's exemption."""
        own = getattr(self.encoder, "no_weight_decay", lambda: set())() - {"cls_token"}
        encoder_own = name.startswith("encoder.") and name.removeprefix("encoder.") in own
        return MaskedAutoencoderViT.official_no_decay(self, name, p) or encoder_own

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The visible patches through timm's encoder: [B, C, H, W], [B, K] -> [B, 1 + K, D] (the class token first;
        a model without one gets the visible tokens' mean there, for the decoder; register tokens are dropped after
        the encoder, as timm's pooling drops them)."""
        enc = self.encoder
        want = (self.in_chans, *enc.patch_embed.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != want:  # (timm's own check is an AssertionError from inside)
            raise ValueError(f"expected images [B, {want[0]}, {want[1]}, {want[2]}] (the timm encoder's img_size), "
                             f"got {tuple(imgs.shape)}")  # fmt: skip
        x = enc.patch_embed(imgs)  # [B, N, D]
        prefix = [t.expand(x.shape[0], -1, -1) for t in _prefix_tokens(enc)]
        prefix = torch.cat(prefix, dim=1) if prefix else None
        n_prefix = 0 if prefix is None else prefix.shape[1]
        if getattr(enc, "no_embed_class", False):  # the position embedding covers the patches only
            x = x + enc.pos_embed
        else:
            x = x + enc.pos_embed[:, n_prefix:]
            if prefix is not None:
                prefix = prefix + enc.pos_embed[:, :n_prefix]
        x = (gather_visible if self.fused_ops else gather_visible_ref)(x, ids_keep)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        ckpt = self.grad_ckpt or getattr(enc, "grad_checkpointing", False)
        for blk in enc.blocks:
            x = checkpointed(blk, x, enabled=ckpt)
        x = enc.norm(x)
        has_cls = enc.cls_token is not None
        first = x[:, :1] if has_cls else x[:, n_prefix:].mean(dim=1, keepdim=True)
        return torch.cat([first, x[:, n_prefix:]], dim=1)

    def encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """timm's encoder weights under timm's own names (``encoder.`` stripped): they load into the same timm model."""
        state = self.state_dict() if state is None else state
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}


def _prefix_tokens(encoder: nn.Module) -> list[torch.Tensor]:
    """The learned tokens in front of the patches, in timm's order: class, distillation (DeiT's), registers."""
    names = ("cls_token", "dist_token", "reg_token")
    return [t for t in (getattr(encoder, n, None) for n in names) if t is not None]


def _check_encoder(encoder: nn.Module) -> None:
    need = ("patch_embed", "blocks", "norm", "cls_token", "pos_embed")
    missing = [n for n in need if not hasattr(encoder, n)]
    if missing:
        raise TypeError(f"mae(encoder=...): expected a timm VisionTransformer; {type(encoder).__name__} has no "
                        f"{', '.join(missing)}")  # fmt: skip
    if encoder.pos_embed is None:
        raise ValueError("mae(encoder=...): this ViT has no absolute position embedding (rotary ViTs are not "
                         "supported: the visible tokens must carry their positions before the gather)")  # fmt: skip
    if getattr(encoder, "rope", None) is not None:  # (timm's Eva, EVA-02: an absolute embedding and a rotary one)
        raise ValueError(f"mae(encoder=...): {type(encoder).__name__} applies a rotary position embedding in its "
                         "blocks, which this wrapper does not pass on (rotary ViTs are not supported)")  # fmt: skip
    n_prefix = sum(t.shape[1] for t in _prefix_tokens(encoder))
    if n_prefix != getattr(encoder, "num_prefix_tokens", n_prefix):
        raise ValueError(f"mae(encoder=...): {type(encoder).__name__} has {encoder.num_prefix_tokens} prefix tokens, "
                         f"of which {n_prefix} are the class, distillation and register tokens this wrapper "
                         "knows")  # fmt: skip
    if getattr(encoder, "dynamic_img_size", False):
        raise ValueError("mae(encoder=...): build the timm model without dynamic_img_size (MAE masks a fixed grid)")
    if getattr(encoder.patch_embed, "patch_size", (0, 1))[0] != encoder.patch_embed.patch_size[1]:
        raise ValueError("mae(encoder=...): square patches only")


def build_mae(encoder: nn.Module | None = None, **kwargs) -> TimmMAE:
    """The ``"mae"`` entry of ``fastmim.create_model``: MAE around ``encoder``, a timm ViT instance."""
    if encoder is None:
        raise TypeError("create_model('mae', encoder=...) wraps your timm ViT: pass encoder=timm.create_model(...); "
                        "fastmim's own MAE models are mae_vit_<size>_patch<p>")  # fmt: skip
    return TimmMAE(encoder, **kwargs)


def build_fcmae(encoder: nn.Module | None = None, **kwargs) -> nn.Module:
    """The ``"fcmae"`` entry of ``fastmim.create_model``: FCMAE (fastmim's sparse ConvNeXt V2 encoder) holding the
    weights of ``encoder``, a timm ConvNeXt V2 instance."""
    from fastmim.methods.fcmae import FCMAE

    if encoder is None:
        raise TypeError("create_model('fcmae', encoder=...) starts from your timm ConvNeXt V2: pass encoder="
                        "timm.create_model('convnextv2_...'); fastmim's own are fcmae_convnextv2_<size>")  # fmt: skip
    stages = getattr(encoder, "stages", None)
    if stages is None or not all(hasattr(b, "mlp") and hasattr(b.mlp, "grn") for s in stages for b in s.blocks):
        raise TypeError(f"create_model('fcmae', encoder=...): expected a timm ConvNeXt V2 (its blocks have GRN); got "
                        f"{type(encoder).__name__}")  # fmt: skip
    if not isinstance(getattr(encoder, "norm_pre", None), nn.Identity | None):
        raise ValueError("create_model('fcmae', encoder=...): this ConvNeXt V2 was built with head_norm_first=True (a "
                         "norm_pre after the stages), which FCMAE's encoder has not; build it without")  # fmt: skip
    depths = tuple(len(s.blocks) for s in stages)
    dims = tuple(s.blocks[0].conv_dw.out_channels for s in stages)
    model = FCMAE(depths=depths, dims=dims, in_chans=encoder.stem[0].in_channels, **kwargs)
    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"create_model('fcmae', encoder=...): the timm weights do not fit fastmim's ConvNeXt V2 "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")  # fmt: skip
    return model


register_model("mae", build_mae)
register_model("fcmae", build_fcmae)
