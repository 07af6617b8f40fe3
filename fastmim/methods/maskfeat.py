"""MaskFeat (Wei et al. 2022; SlowFast's image model, mmpretrain's ``MaskFeat``) on a ViT.

Mask: BEiT-style blocks, 40% of the tokens rounded down (78 of 196: ratio 78/196), blocks of at least 15 tokens
(``fastmim.masking`` "block").
Encoder: the ViT on every token, the masked patch embeddings replaced by a learned mask token before the position
embedding (``MaskTokenViT``, as SimMIM). Target: the HOG features of each masked patch (``fastmim.ops.hog_target``:
Sobel gradients, 9 unsigned orientation bins, 8-px cells, L2 per cell, 108 values per 16-px RGB patch), computed
from the normalised input image for the masked patches only. Head: one linear layer from the final-normed patch
tokens to the HOG dimension. Loss: MSE on the masked tokens (the mean over masked tokens of the mean over the 108
values). The masks are BEiT's own generator's (microsoft/unilm): when no further block fits, it stops a few tokens
short of 78 (about 1 in 196 on average; ``mask_exact=True`` grows the blocks to exactly 78 instead; on grids too small
for one block of 15 within the count, such as the 4 x 4 demo grid, the default grows them too). Deviations:
mmpretrain's port of that generator differs twice: numpy's exclusive ``randint`` never places a block on the last row
or column (27 of 196 tokens are never targets there), and it draws blocks until exactly 78; fastmim's masks are
BEiT's. The class default keeps MAE's fixed sin-cos position embedding (MaskFeat's is learned: the config sets it).
"""

from __future__ import annotations

import torch

from fastmim._args import check_bool
from fastmim.heads import LinearHead
from fastmim.masking import MaskInfo, build_mask
from fastmim.masking.base import MaskStrategy, as_mask_info
from fastmim.masking.strategies import exact_hidden
from fastmim.methods.mae import mask_strategy_for, register_vit_family
from fastmim.methods.simmim import MaskTokenViT

MASKFEAT_MIN_BLOCK = 15  # tokens per block (mmpretrain's MaskFeat: BEiTMaskGenerator(min_num_patches=15))


class MaskFeatViT(MaskTokenViT):
    """MaskFeat with a ViT encoder.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT.
        mask_ratio: fraction of tokens hidden in blocks (MaskFeat: 78 of 196, 40% rounded down).
        mask_type: None (MaskFeat's block masks) or another ``MaskedAutoencoderViT`` mask type ("random", "simmim",
            "uniform").
        mask_exact: grow the blocks until exactly that many are hidden; False (MaskFeat's and BEiT's generator) stops
            when no block fits, a few tokens short in some samples (the encoder keeps every token: any count works).
            None (default): False, unless the count is below the 15-token minimum block (tiny grids), where BEiT's
            generator would leave most masks nearly empty.
        hog_cell, hog_bins: HOG cell side in pixels (None: half the patch, MaskFeat's 8 at patch 16, 7 at 14) and
            orientation bins (9); patch_size must be a multiple of the cell.
        gaussian_window: side of the Gaussian window on the gradient magnitudes (0: none, the official image model;
            mmpretrain uses 16).
        fused_ops: fastmim.ops for the target and the loss (False: the official whole-image HOG and the plain
            loss: the same values except on flat regions, see ``fastmim.ops.hog``).
        attn_impl, fused_norm, drop_path_rate, init_values, abs_pos_embed, rel_pos_bias, init: see
            VisionTransformer.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 78 / 196,
        mask_exact: bool | None = None,
        hog_cell: int | None = None,
        hog_bins: int = 9,
        gaussian_window: int = 0,
        fused_ops: bool = True,
        attn_impl: str = "auto",
        fused_norm: bool = False,
        mask_type: str | None = None,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        abs_pos_embed: bool | str = True,
        rel_pos_bias: str | None = None,
        init: str = "mae",
    ):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, attn_impl, fused_norm,
                         drop_path_rate, init_values, abs_pos_embed, rel_pos_bias, init)  # fmt: skip
        self._set_mask_type(mask_type, "block")
        self.mask_ratio = mask_ratio
        if mask_exact is not None and self.mask_type != "block":
            raise ValueError(f"MaskFeatViT: mask_exact applies to block masks (MaskFeat's own), not mask_type "
                             f"{self.mask_type!r}")  # fmt: skip
        if mask_exact is None:
            mask_exact = exact_hidden(self.num_patches, mask_ratio) < MASKFEAT_MIN_BLOCK
        self.mask_exact = check_bool("MaskFeatViT", "mask_exact", mask_exact)  # ('false' was True)
        self.fused_ops = fused_ops
        self.target_dim = self.set_target("hog", hog_cell, hog_bins, gaussian_window)
        self.decoder = LinearHead(embed_dim, self.target_dim)
        self.mask_strategy()  # a ratio or an image size its masks cannot take: refused here, not at every forward

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """mmpretrain's MaskFeat (whose recipe the config follows) exempts the mask token and every 1-D parameter
        (norms, biases, layer scales: its paramwise_cfg's flat_decay_mult 0): the class token and the learned position
        embedding decay. SlowFast's decays the mask token too."""
        return p.ndim <= 1 or name.endswith(".bias") or name == "mask_token"

    # --- Mask ---
    def mask_strategy(self, seed: int = 0, ratio: float | None = None) -> MaskStrategy:
        """MaskFeat's block masks (another ``mask_type``'s when given) as a ``fastmim.masking`` strategy of (seed,
        epoch, sample index)."""
        ratio = self.mask_ratio if ratio is None else ratio
        if self.mask_type != "block":
            return mask_strategy_for(self.mask_type, self.grid_size, self.patch_size, seed, ratio)
        return build_mask("block", self.grid_size, seed=seed, ratio=ratio, min_num_patches=MASKFEAT_MIN_BLOCK,
                          exact=self.mask_exact)  # fmt: skip

    # --- Target: HOGTarget (fastmim.targets), the masked patches' HOG features (TargetChoice "hog") ---

    # --- Head and loss: MaskTokenViT.forward_hog ---
    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: MaskInfo | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [B, N, target_dim], mask [B, N] with 1 = hidden)."""
        if mask is None:
            mask = self.make_mask(imgs.shape[0], imgs.device, mask_ratio)
        else:
            mask = as_mask_info(
                mask, False, self.num_patches, type(self).__name__, grid=self.grid_size, batch=imgs.shape[0]
            )
        return self.forward_hog(imgs, mask)


register_vit_family("maskfeat", MaskFeatViT, light_decoder=False)
