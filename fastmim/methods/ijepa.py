"""I-JEPA (Assran et al. 2023; facebookresearch/ijepa ``src/train.py``, ``src/models/vision_transformer.py``) on a ViT.

Mask: multi-block (``fastmim.masking`` "multiblock" with ``batch_shared=True``, I-JEPA's collator): 4 target blocks
of 15-20% of the grid (aspect 0.75-1.5) and one context block (85-100%) without them, one size per batch, every
context and target truncated to the batch's smallest. Encoder: the ViT on the context tokens. Target: an EMA copy of
the encoder (``fastmim.targets.EMATeacher``, momentum 0.996 -> 1.0 over the run) on every token, its normed output
layer-normalised again (no affine), the target blocks' tokens. Head: the predictor, a narrow ViT: Linear(D -> 384) plus
its own sin-cos position embedding at the context positions, then for each target block a learned mask token plus
the position embedding at the block's positions, ``pred_depth`` blocks, LayerNorm, Linear(384 -> D) on the target
tokens. Loss: smooth L1 (beta 1), the mean over target tokens and channels.

The exported and evaluated encoder is the target encoder (the EMA teacher), as I-JEPA's evaluation (paper, appendix
A.1); ``export_encoder="context"`` exports the context encoder instead. It has no class token, as I-JEPA's; it exports
to timm's ``VisionTransformer(class_token=False,
global_pool="avg", fc_norm=False)``. Deviations: MAE's initialisation; the CLI's default crop is bicubic with flips
(I-JEPA's is bilinear without: ``configs/ijepa_vit_huge14_in1k.yaml`` sets both). On small grids the masks' fallback
(the collator's: after 20 failed draws a context stops excluding one more target block) lets a context overlap its
targets more often: rare on 14x14, common on the 64-px demo's 4x4; grids under 3x3 are refused. I-JEPA's
weight-decay and learning-rate schedules are the config's (``weight_decay_end``, ``warmup_lr``); fastmim's step n
takes the schedules' value at n (I-JEPA's schedulers step before they are read: n + 1; at most 3e-4 of the lr apart
over the 300-epoch run). The trainer calls
``set_total_steps`` (the momentum schedule's length) and ``after_step`` (the EMA update).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastmim._args import check_bool, check_int, check_momentum
from fastmim.masking import MaskInfo, Masks, build_mask
from fastmim.masking.base import MaskStrategy, as_bool, as_mask_info, smallest_block
from fastmim.methods.mae import register_vit_family
from fastmim.models.pos_embed import sincos_2d
from fastmim.models.vit import Block, VisionTransformer, checkpointed, init_weights
from fastmim.ops import gather_visible, gather_visible_ref
from fastmim.targets.teacher import TeacherOfEncoder

IJEPA_MASK = dict(num_targets=4, target_scale=(0.15, 0.2), aspect_range=(0.75, 1.5), context_scale=(0.85, 1.0),
                  min_keep=10)  # fmt: skip
IJEPA_MOMENTUM = (0.996, 1.0)  # linear over the whole run
EXPORTS = ("target", "context")
UNSET_UPDATES = 2**62  # the schedule's length before set_total_steps: the momentum stays at its start


def target_indices(targets: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
    """Target blocks [B, K, H, W] (or [B, K, N]) bool -> indices [B, K, T] of each block's first T tokens in raster
    order, T the smallest block of the batch (I-JEPA's truncation; its batch-shared blocks are all T already).
    ``tokens``: T where the caller knows it on the host (``Masks.target_tokens``); None: counted here, a host sync
    for targets on a GPU (and a graph break under torch.compile)."""
    flat = targets.flatten(2)
    t = smallest_block(targets) if tokens is None else tokens
    if tokens is not None and targets.device.type == "cpu" and tokens != smallest_block(targets):  # (no sync here)
        raise ValueError(f"I-JEPA: target_tokens={tokens} but the smallest target block holds "
                         f"{smallest_block(targets)} tokens (Masks.target_tokens must be that count)")  # fmt: skip
    if t == 0:  # (the count is read here anyway: checking it costs no extra sync)
        raise ValueError(f"I-JEPA: every target block must hold at least one token; the targets [B, K, ...] = "
                         f"{tuple(targets.shape[:2])} include an empty one (or K is 0)")  # fmt: skip
    return torch.argsort((~flat).to(torch.uint8), dim=-1, stable=True)[..., :t]


class IJEPAViT(TeacherOfEncoder, VisionTransformer):
    """I-JEPA with a ViT encoder without a class token; its encoder keys are timm's (``class_token=False``).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the context encoder.
        pred_dim, pred_depth: the predictor's width and depth (I-JEPA's released configs: 384, 12).
        batch_shared: I-JEPA's batch-shared block sizes and truncation (False: per-sample blocks, then truncated to the
            batch's smallest at the forward).
        momentum: the teacher's schedule (start, end); its length comes from ``set_total_steps``.
        export_encoder: the encoder ``encoder_state_dict`` exports and evaluation uses: "target" (the EMA teacher, as
            I-JEPA evaluates) or "context" (the student).
        fused_ops: fastmim's fused gather (False: the plain one, the same values).
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
        pred_dim: int = 384,
        pred_depth: int = 12,
        batch_shared: bool = True,
        momentum: tuple[float, float] = IJEPA_MOMENTUM,
        fused_ops: bool = True,
        attn_impl: str = "auto",
        fused_norm: bool = False,
        export_encoder: str = "target",
    ):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl=attn_impl,
                         fused_norm=fused_norm, class_token=False)  # fmt: skip
        self._warned_unset = False
        who = "I-JEPA"
        check_int(who, "pred_dim", pred_dim)
        check_int(who, "pred_depth", pred_depth)
        momentum = check_momentum(who, momentum, with_updates=False)
        if export_encoder not in EXPORTS:
            raise ValueError(f"{who}: export_encoder must be one of {', '.join(EXPORTS)}, got {export_encoder!r}")
        if min(self.grid_size) < 3:  # (the context would hold the targets: the predictor would see what it predicts)
            raise ValueError(f"{who}: needs a grid of at least 3x3 patches for target blocks and a context without "
                             f"them; img_size {img_size} at patch {patch_size} gives {self.grid_size[0]}x"
                             f"{self.grid_size[1]}")  # fmt: skip
        if pred_dim % num_heads or pred_dim % 4:
            raise ValueError(f"I-JEPA: pred_dim {pred_dim} must divide into {num_heads} heads and be a multiple of 4")
        self.batch_shared, self.fused_ops = check_bool(who, "batch_shared", batch_shared), fused_ops
        self.export_encoder = export_encoder
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.predictor_blocks = nn.ModuleList(
            Block(pred_dim, num_heads, mlp_ratio, attn_impl=attn_impl) for _ in range(pred_depth)
        )
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.register_buffer("predictor_pos_embed", sincos_2d(pred_dim, self.grid_size).unsqueeze(0), persistent=False)
        for m in (self.predictor_embed, self.predictor_blocks, self.predictor_norm, self.predictor_proj):
            m.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        encoder = VisionTransformer(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                    attn_impl=attn_impl, class_token=False)  # fmt: skip
        # the run's length comes from set_total_steps; until then the momentum stays at its start (after_step warns)
        self.init_teacher(encoder, *momentum, total_updates=UNSET_UPDATES)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """I-JEPA's init_opt exempts 1-D parameters and names holding "bias": the predictor's mask token decays."""
        return p.ndim <= 1 or "bias" in name

    # --- Mask ---
    def mask_strategy(self, seed: int = 0, ratio: float | None = None) -> MaskStrategy:
        """I-JEPA's multi-block masks (``ratio`` does not apply: the block scales set the amounts)."""
        # min_keep 10 is I-JEPA's for 14 x 14 (5% of the grid); tiny grids (the 64-px demo's 4 x 4) keep it <= 1/8
        params = {**IJEPA_MASK, "min_keep": min(IJEPA_MASK["min_keep"], self.num_patches // 8)}
        return build_mask("multiblock", self.grid_size, seed=seed, batch_shared=self.batch_shared,
                          truncate=not self.batch_shared, **params)  # fmt: skip

    def make_masks(self, batch: int, device: torch.device) -> Masks:
        return self.mask_strategy().draw(batch, device)

    # --- Target: the EMA teacher ---
    def set_total_steps(self, total: int) -> None:
        """The momentum schedule runs from 0.996 to 1.0 over the whole run: its number of optimizer steps (the trainer
        calls this; a training loop of one's own must too, before the first ``after_step``)."""
        self.teacher.total_updates = check_int("I-JEPA", "set_total_steps' total", total)

    def after_step(self) -> None:
        if self.teacher.total_updates == UNSET_UPDATES and not getattr(self, "_warned_unset", False):
            self._warned_unset = True
            warnings.warn("I-JEPA: set_total_steps(N) was not called, so the teacher's momentum stays at its start "
                          f"({self.teacher.start}) instead of reaching {self.teacher.end} at the run's end; call it "
                          "with the run's number of optimizer steps before training", stacklevel=2)  # fmt: skip
        super().after_step()

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The teacher on every token: its normed output layer-normalised again [B, N, D]."""
        h = self.teacher.model.forward_features(imgs)
        return F.layer_norm(h.float(), h.shape[-1:])

    # --- Head: the predictor ---
    def predict(self, context: torch.Tensor, ctx_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """Context tokens [B, Nc, D] at ``ctx_ids`` [B, Nc], target positions [B, K, T] -> predictions [B * K, T, D]
        (sample-major: row b * K + k is block k of sample b)."""
        b, k, t = tgt_ids.shape
        pos = self.predictor_pos_embed.expand(b, -1, -1)
        gather = gather_visible if self.fused_ops else gather_visible_ref
        x = self.predictor_embed(context) + gather(pos, ctx_ids).to(context.dtype)
        x = x.repeat_interleave(k, 0)  # [B * K, Nc, Dp]
        q = self.mask_token + gather(pos.repeat_interleave(k, 0), tgt_ids.flatten(0, 1))  # [B * K, T, Dp]
        x = torch.cat([x, q.to(x.dtype)], dim=1)
        for blk in self.predictor_blocks:
            x = checkpointed(blk, x, enabled=self.grad_ckpt)
        return self.predictor_proj(self.predictor_norm(x[:, -t:]))

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        mask: MaskInfo | None = None,
        targets: torch.Tensor | None = None,
        target_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, predictions [B * K, T, D], mask [B, N] with 1 = outside the context).

        Args:
            imgs: [B, C, H, W].
            mask: the multiblock strategy's ``Masks`` (context and target blocks), or the context alone
                (``Masks.info()`` or a bool [B, N] tensor, the same count in every sample) with ``targets``; drawn
                with ``targets`` when None.
            targets: [B, K, H, W] bool target blocks (``Masks.targets``).
            target_tokens: the smallest target block's token count where the host knows it (``Masks.target_tokens``,
                taken from ``mask`` when it is the Masks): no host sync to count it.
            mask_ratio: not taken (the block scales set the amounts; the argument keeps the recipes' call form).
        """
        self.check_teacher_follows()
        if mask_ratio is not None:
            raise ValueError("I-JEPA draws multi-block masks whose block scales set the amounts: mask_ratio does not "
                             "apply (build the strategy with other target_scale / context_scale instead)")  # fmt: skip
        if mask is None:
            drawn = self.make_masks(imgs.shape[0], imgs.device)
            mask, targets, target_tokens = drawn.info(), drawn.targets, drawn.target_tokens
        else:  # a multiblock strategy's Masks (its context and its target blocks), a MaskInfo or a bool tensor
            if isinstance(mask, Masks) and targets is None:
                targets = mask.targets
                target_tokens = mask.target_tokens if target_tokens is None else target_tokens
            mask = as_mask_info(mask, True, self.num_patches, "I-JEPA", grid=self.grid_size, batch=imgs.shape[0])
            if targets is not None and (targets.dim() != 4 or targets.shape[0] != imgs.shape[0]
                                        or tuple(targets.shape[2:]) != tuple(self.grid_size)):  # fmt: skip
                raise ValueError(f"I-JEPA: targets must be [B, K, H, W] = [{imgs.shape[0]}, K, {self.grid_size[0]}, "
                                 f"{self.grid_size[1]}] target blocks, got shape {tuple(targets.shape)}")  # fmt: skip
            if targets is not None:  # 0/1 blocks, as the masks may be given
                targets = as_bool(targets, "I-JEPA: targets hold True/1 at each block's tokens and False/0 "
                                           "elsewhere; these have other values")  # fmt: skip
        if targets is None:
            raise ValueError("I-JEPA needs the target blocks with the context: pass the multiblock strategy's Masks "
                             "(mask=masks), or mask=masks.info(), targets=masks.targets")  # fmt: skip
        if mask.ids_keep is None:
            raise ValueError("I-JEPA drops the tokens outside the context: it needs the masks' index form (info())")
        tgt_ids = target_indices(targets, target_tokens)  # [B, K, T]
        self.last_counts = (mask.ids_keep.shape[1], *tgt_ids.shape[1:])  # (context, blocks, block tokens): FLOP counts
        x = self.patch_embed(imgs) + self.pos_embed  # no class token: a position row per patch
        x = (gather_visible if self.fused_ops else gather_visible_ref)(x, mask.ids_keep)
        context = self.encode_tokens(x)  # [B, Nc, D]
        pred = self.predict(context, mask.ids_keep, tgt_ids)
        h = self.targets(imgs)  # [B, N, D]
        k = tgt_ids.shape[1]
        h = torch.gather(h.repeat_interleave(k, 0), 1, tgt_ids.flatten(0, 1).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return F.smooth_l1_loss(pred.float(), h, beta=1.0), pred, mask.mask

    # --- Export ---
    def encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The encoder that is exported and evaluated (``encoder.safetensors``, the kNN monitor, convert): I-JEPA's
        target encoder, the EMA teacher, as the paper evaluates ("export_encoder": "target"), or the context encoder
        ("context"). Either loads into timm's VisionTransformer(class_token=False)."""
        state = self.state_dict() if state is None else state  # (or a whole state gathered from FSDP shards)
        if self.export_encoder == "context":
            return self.context_encoder_state_dict(state)
        prefix = "teacher.model."
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    def context_encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The context encoder alone (the student: no predictor, no teacher)."""
        state = self.state_dict() if state is None else state
        skip = ("teacher.", "predictor_", "mask_token")
        return {k: v for k, v in state.items() if not k.startswith(skip)}


register_vit_family("ijepa", IJEPAViT, light_decoder=False)
