"""data2vec 2.0 (Baevski et al. 2023; fairseq ``examples/data2vec/models/data2vec2.py``) on a ViT.

Mask: the inverse block mask (``fastmim.masking`` "inverse_block": a few 3x3 squares stay visible, exactly 39 of 196),
``num_masks`` (16) masks per image. Encoder: the ViT on the visible tokens of each mask; the patch embedding runs once
per image and is repeated (``clone_batch``). Target: an EMA teacher (``fastmim.targets.EMATeacher``, momentum 0.9998 ->
0.99999 over 100k updates, the n-th update at fairseq's count n, fp32) runs once per image on every token: the FFN
outputs (before the residual) of its top ``top_k`` blocks, each instance-normalised over the tokens, averaged,
layer-normalised; repeated for the masks. Head: the convolutional decoder (``fastmim.heads.ConvDecoder2d``) on the
encoder's outputs with the masked tokens filled by N(0, 0.01) noise (no learned mask token, no position embedding).
Loss: ``sum over masked tokens and channels of (pred - target)^2 / sqrt(D)``, divided by the masked count, plus the
class-token term: the student's class token regresses the mean of its image's targets, ``0.01 x 256 x the mean over
masked copies of sum over channels of (cls - mean target)^2 / sqrt(D)``. fairseq sums that term over each GPU's 256
copies (16 images x 16 masks; it scales it by the masked count before its gradient normalisation divides by it): the
mean times 256 is the same at that batch and does not change with how a batch is split over devices and micro-batches.

Deviations: pre-norm blocks (fastmim's, timm's) where data2vec 2.0's are post-norm, so that the encoder exports to timm
like MAE's: a block's FFN target is ``mlp(norm2(x))`` of its input (fairseq's: ``mlp(norm1(x + attn(x)))``), there is no
LayerNorm on the embedded patches before the first block (fairseq has one) and the decoder and the class-token term read
the final LayerNorm's output (fairseq's: the last block's, which ends in a norm); MAE's initialisation (xavier-uniform
linears, a class token of std 0.02) where fairseq's is BERT's (linears N(0, 0.02), a class token N(0, 1), which its
input LayerNorm tames); the first two blocks (fairseq's "prenet", not part of the targets) are ordinary blocks of the
ViT: ``top_k = depth - 2`` averages the other ten, as fairseq's ten main blocks; MAE's fixed sin-cos position embedding.
Those are ViT-B's settings; ``data2vec2_vit_large_*`` and ``data2vec2_vit_huge_*`` take fairseq's ViT-L and ViT-H image
configs (``DATA2VEC2_SIZES``: no prenet, so top 18 of 24 and 24 of 32; mask 0.75 with adjust 0.1; a 3-layer kernel-5
decoder 1024 wide; 8 x 16 class-token rows; their momentum schedules). Smaller sizes take ViT-B's. The trainer calls
``after_step()`` after each optimizer step: the teacher's EMA update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastmim._args import check_int, check_momentum, check_number
from fastmim.heads import ConvDecoder2d
from fastmim.masking import MaskInfo, build_mask
from fastmim.masking.base import MaskStrategy, as_mask_info
from fastmim.masking.random import check_mask_ratio
from fastmim.methods.mae import register_vit_family
from fastmim.models.vit import VisionTransformer
from fastmim.ops import gather_visible, gather_visible_ref, masked_mse_loss_patchified, masked_mse_loss_patchified_ref
from fastmim.targets.teacher import DATA2VEC2_MOMENTUM, TeacherOfEncoder

DATA2VEC2_MASK = dict(ratio=0.8, block=3, adjust=0.07)  # fairseq: inverse_mask, mask_prob, mask_length, adjust
DATA2VEC2_NUM_MASKS = 16  # clone_batch
DATA2VEC2_CLS_WEIGHT = 0.01  # cls_loss
DATA2VEC2_CLS_ROWS = 16 * 16  # fairseq sums the class-token term over a GPU's 16 images x 16 masks
DATA2VEC2_NOISE_STD = 0.01  # mask_noise_std
DATA2VEC2_MAX_MASKS = 256  # each mask is one more student pass of the batch (fairseq: 16 at every size)
# fairseq's ViT-L/16 and ViT-H/14 image configs (large_images_only_task.yaml, huge_images14_only_task.yaml) where they
# differ from ViT-B's: no prenet (top_k of 24 and 32 blocks), 75% masked, a 3-layer decoder of kernel 5 (1024 wide),
# 8 images x 16 masks per GPU (the class-token term's rows), a longer momentum schedule (ViT-H's ends at 1)
_LARGE_IMAGES = dict(mask_ratio=0.75, mask_adjust=0.1, decoder_dim=1024, decoder_layers=3, decoder_kernel=5,
                     cls_rows=8 * 16)  # fmt: skip
DATA2VEC2_SIZES = {
    "large": dict(_LARGE_IMAGES, top_k=18, momentum=(0.9998, 0.99999, 150_000)),
    "huge": dict(_LARGE_IMAGES, top_k=24, momentum=(0.9998, 1.0, 300_000)),
}


def teacher_targets(teacher: VisionTransformer, imgs: torch.Tensor, top_k: int) -> torch.Tensor:
    """data2vec 2.0's targets from a ViT on every token: the FFN output (before the residual) of each of the last
    ``top_k`` blocks without the class token, instance-normalised over the tokens (no affine), averaged, then
    layer-normalised (no affine). [B, C, H, W] -> [B, N, D] fp32."""
    x = teacher.patch_embed(imgs) + teacher.pos_embed[:, 1:, :]
    cls = (teacher.cls_token + teacher.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    first = len(teacher.blocks) - top_k
    y = None
    for i, blk in enumerate(teacher.blocks):
        x, t = blk.forward_with_ffn(x)
        if i >= first:
            t = F.instance_norm(t[:, 1:].float().transpose(1, 2)).transpose(1, 2)  # over the tokens, per channel
            y = t if y is None else y + t
    y = y / top_k
    return F.layer_norm(y, y.shape[-1:])


class Data2Vec2ViT(TeacherOfEncoder, VisionTransformer):
    """data2vec 2.0 with a ViT encoder; its encoder keys are the ViT's (exports to timm like MAE's).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT.
        mask_ratio: hidden fraction of the inverse block mask (0.8: 157 of 196 hidden).
        mask_adjust: fairseq's mask_prob_adjust (0.07; ViT-L/H 0.1): the visible squares' centres are drawn for
            1 - mask_ratio + mask_adjust of the tokens, then the count is trimmed or topped up.
        num_masks: masks per image (fairseq's clone_batch, 16).
        top_k: teacher blocks averaged into the target (None: depth - 2, fairseq's ten main blocks of twelve).
        decoder_dim, decoder_layers, decoder_kernel, decoder_groups: the convolutional decoder (None: embed_dim; 6, 3,
            16).
        cls_weight: weight of the class-token term (0.01, on fairseq's per-GPU sum over ``cls_rows`` copies: 16
            images x 16 masks = 256 for ViT-B, 8 x 16 for ViT-L/H; see above).
        momentum: the teacher's (start, end, updates) schedule.
        fused_ops: fastmim.ops for the gather and the loss (False: the plain PyTorch path, the same values).
        attn_impl, fused_norm: see VisionTransformer.
    """

    predicts_pixels = False  # feature targets: no reconstruction images

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mask_ratio: float = DATA2VEC2_MASK["ratio"],
        mask_adjust: float = DATA2VEC2_MASK["adjust"],
        num_masks: int = DATA2VEC2_NUM_MASKS,
        top_k: int | None = None,
        decoder_dim: int | None = None,
        decoder_layers: int = 6,
        decoder_kernel: int = 3,
        decoder_groups: int = 16,
        cls_weight: float = DATA2VEC2_CLS_WEIGHT,
        cls_rows: int = DATA2VEC2_CLS_ROWS,
        momentum: tuple[float, float, int] = DATA2VEC2_MOMENTUM,
        fused_ops: bool = True,
        attn_impl: str = "auto",
        fused_norm: bool = False,
    ):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl=attn_impl,
                         fused_norm=fused_norm)  # fmt: skip
        who = "data2vec 2.0"
        check_mask_ratio(mask_ratio)
        mask_adjust = check_number(who, "mask_adjust", mask_adjust, lo=0.0, hi=1.0)
        check_int(who, "num_masks", num_masks, hi=DATA2VEC2_MAX_MASKS)
        cls_rows = check_int(who, "cls_rows", cls_rows)
        self.top_k = max(1, depth - 2) if top_k is None else check_int(who, "top_k", top_k, 1, depth)
        cls_weight = check_number(who, "cls_weight", cls_weight, lo=0.0)
        momentum = check_momentum(who, momentum, with_updates=True)
        if self.num_patches < 2:  # the targets' instance norm runs over the tokens
            raise ValueError(f"{who}: needs at least 2 patches; img_size {img_size} at patch {patch_size} gives "
                             f"{self.num_patches}")  # fmt: skip
        self.mask_ratio, self.mask_adjust, self.num_masks = float(mask_ratio), mask_adjust, num_masks
        self.cls_weight, self.cls_rows, self.fused_ops = cls_weight, cls_rows, fused_ops
        self.decoder = ConvDecoder2d(embed_dim, self.grid_size, decoder_dim or embed_dim, decoder_layers,
                                     decoder_kernel, decoder_groups)  # fmt: skip
        encoder = VisionTransformer(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                    attn_impl=attn_impl)  # fmt: skip
        self.init_teacher(encoder, *momentum, count_from=1)  # fairseq reads its schedule after the count's increment

    # --- Mask ---
    def mask_strategy(self, seed: int = 0, ratio: float | None = None) -> MaskStrategy:
        """The inverse block mask, ``num_masks`` per sample, a pure function of (seed, epoch, index, mask number)."""
        params = {**DATA2VEC2_MASK, "ratio": self.mask_ratio if ratio is None else ratio, "adjust": self.mask_adjust}
        return build_mask("inverse_block", self.grid_size, seed=seed, num_masks=self.num_masks, **params)

    def make_mask(self, batch: int, device: torch.device, mask_ratio: float | None = None) -> MaskInfo:
        return self.mask_strategy(ratio=mask_ratio).draw(batch, device).info()

    # --- Target: the EMA teacher ---
    @torch.no_grad()
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the teacher's targets [B, N, D] fp32, once per image."""
        return teacher_targets(self.teacher.model, imgs, self.top_k)

    # --- Head and loss ---
    def decoder_input(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The encoder's visible outputs [B', K, D] and N(0, 0.01) noise at the masked positions, in token order."""
        b, k, d = visible.shape
        noise = torch.randn(b, ids_restore.shape[1] - k, d, device=visible.device, dtype=visible.dtype)
        x = torch.cat([visible, noise * DATA2VEC2_NOISE_STD], dim=1)
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))

    def forward_loss(
        self, pred: torch.Tensor, cls_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, num_masks: int
    ) -> torch.Tensor:
        """pred [B*M, N, D], cls_pred [B*M, D], targets y [B, N, D], mask [B*M, N] (1 = masked)."""
        d = y.shape[-1]
        loss_fn = masked_mse_loss_patchified if self.fused_ops else masked_mse_loss_patchified_ref
        # the mean over masked tokens of the mean over D, times D / sqrt(D): sum over D of (x - y)^2 / sqrt(D)
        reg = loss_fn(pred, y.repeat_interleave(num_masks, 0), mask, norm_pix=False) * math.sqrt(d)
        if not self.cls_weight:
            return reg
        cls_target = y.mean(dim=1).repeat_interleave(num_masks, 0)
        cls = (cls_pred.float() - cls_target).square().sum(-1).mean() / math.sqrt(d)
        return reg + self.cls_weight * self.cls_rows * cls

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: MaskInfo | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [B*M, N, D], mask [B*M, N] with 1 = hidden); ``mask`` holds M masks per image,
        sample-major."""
        self.check_teacher_follows()
        b = imgs.shape[0]
        if mask is None:
            mask = self.make_mask(b, imgs.device, mask_ratio)
        else:
            mask = as_mask_info(mask, True, self.num_patches, type(self).__name__, grid=self.grid_size)
        if mask.ids_keep is None:
            raise ValueError("data2vec 2.0 drops the masked tokens: it needs the masks' index form (Masks.info())")
        if b == 0 or mask.ids_keep.shape[0] % b:
            raise ValueError(f"data2vec 2.0: {mask.ids_keep.shape[0]} masks for {b} images; expected M per image")
        m = mask.ids_keep.shape[0] // b
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # once per image
        if m > 1:
            x = x.repeat_interleave(m, 0)
        x = (gather_visible if self.fused_ops else gather_visible_ref)(x, mask.ids_keep)
        latent = self.encode_tokens(x)  # [B*M, 1 + K, D]
        pred = self.decoder(self.decoder_input(latent[:, 1:], mask.ids_restore))
        loss = self.forward_loss(pred, latent[:, 0], self.targets(imgs), mask.mask, m)
        return loss, pred, mask.mask

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """fairseq's data2vec 2.0 exempts 1-D parameters and biases: the class token decays."""
        return p.ndim <= 1 or name.endswith(".bias")

    # --- Export ---
    def encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The student encoder alone (no decoder, no teacher): loads into timm's VisionTransformer."""
        state = self.state_dict() if state is None else state  # (or a whole state gathered from FSDP shards)
        return {k: v for k, v in state.items() if not k.startswith(("decoder.", "teacher."))}


register_vit_family("data2vec2", Data2Vec2ViT, light_decoder=False, size_defaults=DATA2VEC2_SIZES)
