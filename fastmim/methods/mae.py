"""MAE: random mask + ViT on the visible tokens + norm-pix target + transformer decoder, MSE on masked patches.

This is the plain PyTorch path: readable, and the reference that fused ops must match. The state dict has the keys
and shapes of the official implementation (facebookresearch/mae ``models_mae.py``), so its checkpoints load here, and
``encoder_state_dict()`` loads into timm's VisionTransformer.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastmim.masking import MaskInfo, random_masking
from fastmim.masking.base import Masks, MaskStrategy, as_mask_info
from fastmim.masking.random import check_mask_ratio
from fastmim.masking.strategies import build_mask
from fastmim.models.pos_embed import sincos_2d
from fastmim.models.registry import register_model
from fastmim.models.vit import Block, VisionTransformer, init_weights, run_blocks, set_fused_gelu, vit_sizes
from fastmim.ops import gather_visible, scatter_masked
from fastmim.ops.reference import gather_visible_ref, scatter_masked_ref
from fastmim.targets import PixelTarget
from fastmim.targets.choice import TargetChoice

MASK_TYPES = ("random", "block", "simmim", "uniform")  # strategies with the same hidden count in every sample
# state-dict prefixes that are not timm's encoder: the head's, and UM-MAE's secondary mask token (pretraining only)
DECODER_KEYS = ("decoder_", "mask_token", "vis_mask_token")


def add_mae_decoder(model: nn.Module, embed_dim: int, decoder_embed_dim: int, decoder_depth: int,
                    decoder_num_heads: int, mlp_ratio: float, out_dim: int,
                    attn_impl: str = "auto") -> None:  # fmt: skip
    """MAE's head on ``model`` (which has ``num_patches`` and ``grid_size``), under MAE's names: ``decoder_embed``,
    ``mask_token``, ``decoder_pos_embed`` (fixed sin-cos, a class-token row first), ``decoder_blocks``,
    ``decoder_norm``, ``decoder_pred``; initialised as MAE's."""
    model.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    model.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    model.decoder_pos_embed = nn.Parameter(torch.zeros(1, model.num_patches + 1, decoder_embed_dim),
                                           requires_grad=False)  # fmt: skip
    model.decoder_blocks = nn.ModuleList(
        [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_impl=attn_impl) for _ in range(decoder_depth)]
    )
    model.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
    model.decoder_pred = nn.Linear(decoder_embed_dim, out_dim)
    model.decoder_pos_embed.data.copy_(sincos_2d(decoder_embed_dim, model.grid_size, cls_token=True).unsqueeze(0))
    nn.init.normal_(model.mask_token, std=0.02)
    for m in (model.decoder_embed, model.decoder_blocks, model.decoder_norm, model.decoder_pred):
        m.apply(init_weights)


def require_two_patches(model: nn.Module, img_size, patch_size) -> None:
    """A recipe hides some patches and predicts them from others: an image of one patch leaves its loss nothing."""
    if model.num_patches < 2:
        raise ValueError(
            f"a {img_size}-px image is one {patch_size}-px patch: {type(model).__name__} hides some "
            "patches and sees others, so it needs at least two (a larger image or a smaller patch)"
        )


def refuse_norm_pix_off_for_hog(model: nn.Module, target: str, norm_pix_loss: bool) -> None:
    """MAE's norm_pix_loss is about pixel patches: turning it off with the HOG target (compared as it is) would be a
    setting silently ignored."""
    if target == "hog" and not norm_pix_loss:
        raise ValueError(f"{type(model).__name__}: norm_pix_loss applies to pixel targets, not target='hog'")


def mask_strategy_for(mask_type: str, grid: tuple[int, int], patch_size: int, seed: int, ratio: float) -> MaskStrategy:
    """The strategy of a recipe's ``mask_type`` (one of MASK_TYPES) over a token grid: "simmim" masks 2x2-token cells
    (SimMIM's 32-px mask patches at patch 16; 28 px at patch 14); "uniform" hides 75% by construction."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    if mask_type == "uniform" and abs(ratio - 0.75) > 1e-9:
        raise ValueError(f"uniform masking hides 75% of the tokens (one visible per 2x2 cell), got {ratio=}: give "
                         "it mask_ratio=0.75 (--mask-ratio 0.75)")  # fmt: skip
    params = {"secondary_ratio": 0.0} if mask_type == "uniform" else {"ratio": ratio}
    if mask_type == "simmim":
        params.update(mask_patch_size=2 * patch_size, patch_size=patch_size)
    return build_mask(mask_type, grid, seed=seed, **params)


class MaskedAutoencoderViT(TargetChoice, PixelTarget, VisionTransformer):
    """MAE with a ViT encoder (inherited, so its parameters keep timm's names) and a transformer decoder.

    Args:
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder shape (MAE default 512, 8, 16).
        mask_ratio: fraction of patches removed per sample.
        mask_type: "random" (MAE), "block" (BEiT-style block-wise masks with the same count), "simmim" (random
            2x2-token mask patches: SimMIM's 32 px at patch 16, 28 px at patch 14) or "uniform" (UM-MAE's one
            visible token per 2x2 cell: 75% hidden); see ``fastmim.masking.strategies``.
        norm_pix_loss: normalise each target patch by its mean and std (pixel targets).
        target: "pixels" (MAE's), "lowpass" (PixMIM's low-frequency image, ``low_pass_radius``, and ``image_mean`` /
            ``image_std``, the normalisation the images carry, None: ImageNet's; the same norm-pix loss) or "hog"
            (MaskFeat's target on MAE's encoder and decoder: the decoder predicts each masked patch's HOG features,
            ``fastmim.targets.HOGTarget`` with ``hog_cell`` (None: half the patch), ``hog_bins`` (None: 9) and
            ``gaussian_window`` (None: none), an unnormalised MSE on the masked patches); see
            ``fastmim.targets.choice``.
        fused_ops: use fastmim.ops (fused gather, decoder-input scatter and loss); False keeps the plain PyTorch
            reference path, which computes the same values.
        vis_mask_ratio: UM-MAE's secondary masking (its ``--vis_mask_ratio``; 0.25 in its paper, with
            ``mask_type="uniform"``): of the K visible tokens, K - int(K * (1 - vis_mask_ratio)) per sample enter
            the encoder as a learned ``vis_mask_token`` plus their position embedding; the loss stays on the hidden
            patches. Drawn at each forward from torch's generator, as UM-MAE's code does (a resume restores it), or
            taken from a given ``Masks``' ``secondary`` (which then decides which tokens and how many, its strategy's
            ``secondary_ratio``). 0 (default): off, no extra parameter.
        Other arguments as ``VisionTransformer`` (``fused_norm`` and ``fused_gelu`` apply to the encoder and the
        decoder).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        mask_type: str | None = "random",
        norm_pix_loss: bool = True,
        attn_impl: str = "auto",
        fused_ops: bool = True,
        fused_norm: bool = False,
        fused_gelu: bool = False,
        target: str = "pixels",
        hog_cell: int | None = None,
        hog_bins: int | None = None,
        gaussian_window: int | None = None,
        low_pass_radius: float | None = None,
        vis_mask_ratio: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        image_mean: tuple[float, ...] | None = None,  # (last: the positions of the arguments before stay)
        image_std: tuple[float, ...] | None = None,
    ):
        check_mask_ratio(mask_ratio)
        if isinstance(vis_mask_ratio, bool) or not isinstance(vis_mask_ratio, int | float) or not (
                0.0 <= vis_mask_ratio < 1.0):  # fmt: skip
            raise ValueError(f"vis_mask_ratio must be a number in [0, 1), got {vis_mask_ratio!r}")
        mask_type = "random" if mask_type is None else mask_type  # None: MAE's own, as the other recipes take it
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl=attn_impl,
                         fused_norm=fused_norm, fused_gelu=fused_gelu, drop_path_rate=drop_path_rate,
                         init_values=init_values)  # fmt: skip
        require_two_patches(self, img_size, patch_size)
        refuse_norm_pix_off_for_hog(self, target, norm_pix_loss)
        self.mask_ratio = float(mask_ratio)
        self.mask_type = mask_type
        self.norm_pix_loss = norm_pix_loss
        self.fused_ops = fused_ops
        out_dim = self.set_target(target, hog_cell, hog_bins, gaussian_window, low_pass_radius, image_mean, image_std)
        add_mae_decoder(self, embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, out_dim,
                        attn_impl)  # fmt: skip
        set_fused_gelu(self, fused_gelu)  # the decoder's MLPs too
        self.vis_mask_ratio = float(vis_mask_ratio)
        if self.vis_mask_ratio > 0:  # UM-MAE's name, so its checkpoints load
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.normal_(self.vis_mask_token, std=0.02)
        self._mask_strategy: MaskStrategy | None = None
        self._mask_strategy_ratio: float | None = None
        self.mask_strategy()  # a ratio or an image size its masks cannot take: refused here, not at the first forward

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed", "vis_mask_token"}

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """MAE's pretraining (and UM-MAE's) exempts 1-D parameters and biases only: timm 0.3.2's add_weight_decay with
        no skip list, so the class and mask tokens decay (the position embeddings are fixed)."""
        return p.ndim <= 1 or name.endswith(".bias")

    # --- Target and loss: PixelTarget (patchify, unpatchify, forward_loss, reconstruct) ---

    # --- Mask ---
    def make_mask(self, batch: int, device: torch.device, mask_ratio: float | None = None) -> MaskInfo:
        """The masks of a forward given none (the reconstruction pictures, a plain ``model(imgs)``): MAE's random
        masking, or this model's ``mask_strategy`` (a subclass's own too: the pictures showed random masks where the
        trainer drew others)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if self.mask_type == "random" and type(self).mask_strategy is MaskedAutoencoderViT.mask_strategy:
            return random_masking(batch, self.num_patches, ratio, device=device)
        if self._mask_strategy is None or self._mask_strategy_ratio != ratio:
            self._mask_strategy = self.mask_strategy(ratio=ratio)
            self._mask_strategy_ratio = ratio
        return self._mask_strategy.draw(batch, device).info()

    def mask_strategy(self, seed: int = 0, ratio: float | None = None) -> MaskStrategy:
        """This model's masks as a ``fastmim.masking`` strategy: a pure function of (seed, epoch, sample index), which
        the trainer calls with each batch's dataset indices."""
        ratio = self.mask_ratio if ratio is None else ratio
        return mask_strategy_for(self.mask_type, self.grid_size, self.patch_embed.patch_size[0], seed, ratio)

    # --- Encoder ---
    def forward_encoder(
        self, imgs: torch.Tensor, ids_keep: torch.Tensor, secondary: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encodes only the visible patches: [B, C, H, W], [B, K] -> [B, 1 + K, D]. ``secondary`` [B, K] bool: the
        visible tokens replaced by ``vis_mask_token`` (UM-MAE's secondary masking)."""
        gather = gather_visible if self.fused_ops else gather_visible_ref
        x = gather(self.patch_embed(imgs) + self.pos_embed[:, 1:, :], ids_keep)  # [B, K, D]
        if secondary is not None:  # the mask token at those tokens' positions, as UM-MAE's encoder
            pos = gather(self.pos_embed[:, 1:, :].expand(x.shape[0], -1, -1), ids_keep)
            x = torch.where(secondary.unsqueeze(-1), (self.vis_mask_token + pos).to(x.dtype), x)
        return self.encode_tokens(x)  # [B, 1 + K, D]

    def secondary_mask(self, ids_keep: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K] bool: which visible tokens the encoder sees as ``vis_mask_token``: ``given`` ([B, N] or [B, h, w],
        True at visible tokens to replace) read at ``ids_keep``, else drawn: K - int(K * (1 - vis_mask_ratio)) per
        sample, uniformly (UM-MAE's count)."""
        b, k = ids_keep.shape
        if given is not None:
            given = given.to(ids_keep.device).flatten(1)
            if given.shape != (b, self.num_patches):
                h, w = self.grid_size
                raise ValueError(f"{type(self).__name__}: the Masks' secondary must be [B, {self.num_patches}] or "
                                 f"[B, {h}, {w}], got {tuple(given.shape)}")  # fmt: skip
            return torch.gather(given.bool(), 1, ids_keep.long())
        keep = int(k * (1 - self.vis_mask_ratio))
        order = torch.rand(b, k, device=ids_keep.device).argsort(dim=1)
        return torch.zeros(b, k, dtype=torch.bool, device=ids_keep.device).scatter_(1, order[:, keep:], True)

    # --- Head ---
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """[B, 1 + K, D], [B, N] -> predicted patches [B, N, p*p*C]."""
        x = self.decoder_embed(latent)  # [B, 1 + K, Dd]
        # unshuffle + mask tokens + class token + position embedding (fused: in one pass)
        scatter = scatter_masked if self.fused_ops else scatter_masked_ref
        x = scatter(x[:, 1:, :], ids_restore, self.mask_token, self.decoder_pos_embed, x[:, :1, :])  # [B, 1 + N, Dd]
        x = run_blocks(self.decoder_blocks, x, self.decoder_norm, self.fused_norm, self.grad_ckpt)
        x = self.decoder_pred(x)  # [B, 1 + N, p*p*C]
        return x[:, 1:, :]

    # --- Forward ---
    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: MaskInfo | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [B, N, p*p*C], mask [B, N] with 1 = removed).

        Args:
            imgs: [B, C, H, W] normalised images.
            mask_ratio: overrides the model's ratio for this call.
            mask: a given mask (e.g. to compare two implementations on the same mask): a ``MaskInfo``, a ``Masks``, or
                a bool tensor [B, N] or [B, h, w] (True = hidden, the same count in every sample); drawn when None.
                The other recipes take the same forms (SimMIM, MaskFeat, A2MIM: any count per sample).
        """
        given = mask.secondary if isinstance(mask, Masks) else None
        if mask is None:
            mask = self.make_mask(imgs.shape[0], imgs.device, mask_ratio)
        else:
            mask = as_mask_info(
                mask, True, self.num_patches, type(self).__name__, grid=self.grid_size, batch=imgs.shape[0]
            )
        if mask.ids_keep is None:
            raise ValueError(f"{type(self).__name__} drops the masked tokens: it needs the masks' index form "
                             "(Masks.info()), with the same hidden count in every sample")  # fmt: skip
        if getattr(self, "vis_mask_ratio", 0):  # UM-MAE's secondary masking (TimmMAE shares this forward)
            latent = self.forward_encoder(imgs, mask.ids_keep, self.secondary_mask(mask.ids_keep, given))
        else:
            latent = self.forward_encoder(imgs, mask.ids_keep)
        pred = self.forward_decoder(latent, mask.ids_restore)
        loss = self.forward_loss(imgs, pred, mask.mask)
        return loss, pred, mask.mask

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masked patches' error against the target: pixels or low-pass pixels (PixelTarget's norm-pix MSE), or
        HOG features."""
        if self.target == "hog":
            return self.hog_loss(pred, imgs, mask)
        # (PixelTarget's, named: TimmMAE borrows this)
        return PixelTarget.forward_loss(self, self.checked_target_images(imgs), pred, mask)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The prediction as an image (norm-pix undone with the target's own patch statistics)."""
        return PixelTarget.reconstruct(self, self.checked_target_images(imgs), pred)

    def encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The encoder's weights alone (no decoder, no mask token): loads into timm's VisionTransformer."""
        state = self.state_dict() if state is None else state  # (or a whole state gathered from FSDP shards)
        return {k: v for k, v in state.items() if not k.startswith(DECODER_KEYS)}


# Decoders: MAE's default (512 wide, 8 blocks, 16 heads) for small and up; ViT-tiny, the CPU demo model, gets a light
# one (256 wide, 2 blocks) so the decoder does not cost several times the encoder. All are overridable.
LIGHT_DECODER = dict(decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=8)


def _build(cls: type, light_decoder: bool, size: str, patch: int, **kwargs) -> nn.Module:
    decoder = LIGHT_DECODER if light_decoder and size == "tiny" else {}
    return cls(**{"patch_size": patch, **vit_sizes()[size], **decoder, **kwargs})


def register_vit_family(prefix: str, cls: type, light_decoder: bool = True, size_defaults: dict | None = None) -> None:
    """Registers ``{prefix}_vit_{size}_patch{14,16}`` for a ViT recipe class (MAE, PixMIM, SimMIM, ...);
    ``light_decoder``: ViT-tiny gets MAE's light transformer decoder; ``size_defaults``: {size: the recipe's own
    defaults at that size} (the caller's arguments override them)."""
    for size in vit_sizes():
        for patch in (14, 16):
            build = functools.partial(_build, cls, light_decoder, size, patch, **(size_defaults or {}).get(size, {}))
            register_model(f"{prefix}_vit_{size}_patch{patch}", build)


register_vit_family("mae", MaskedAutoencoderViT)
