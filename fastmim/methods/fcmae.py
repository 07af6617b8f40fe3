"""FCMAE (ConvNeXt V2): random patch mask + sparse ConvNeXt V2 + norm-pix target + a light ConvNeXt decoder.

Mask: 32-px patches (a 7x7 grid at 224), 60% removed per sample (MAE's noise + argsort). Encoder: ConvNeXt V2 on
the visible patches only (``fastmim.models.convnextv2_sparse``: "fastmim" rows backend, "spconv" (the same with
the stem and downsampling through the optional spconv library) or the "dense_masked" reference). Head: a 1x1
projection to the decoder width, mask tokens at the removed positions, ``decoder_depth`` dense ConvNeXt V2 blocks and
a 1x1 conv to the patch pixels. Loss: MSE against norm-pix targets on the removed
patches (``fastmim.ops.masked_mse_loss``, read straight from the images). The encoder keeps timm's parameter names;
the rest keeps the official implementation's (``proj``, ``mask_token``, ``decoder``, ``pred``).

Where this differs from the official code (facebookresearch/ConvNeXt-V2), on purpose: GRN's statistic is taken per
sample over its visible pixels, as the dense model computes it (the official MinkowskiGRN pools over the whole batch,
a known upstream issue); weights start from timm's ConvNeXt initialisation (truncated normal, std 0.02) rather than
the official FCMAE's re-initialisation (``trunc_normal_`` without a std: timm's 1.0, cut at +-2, for the stem, the
depthwise kernels, the block linears, ``proj``, ``pred`` and the decoder's depthwise conv; PyTorch's default for the
decoder's linears). Weight decay follows the official code by default (``--decay-exempt official``: timm 0.3.2's
rule, which decays GRN's parameters and the mask token); ``--decay-exempt tokens`` exempts them, as timm's
fine-tuning recipes do.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fastmim import _ext
from fastmim.masking import MaskInfo, random_masking
from fastmim.masking.base import MaskStrategy, as_mask_info
from fastmim.masking.random import check_mask_ratio
from fastmim.masking.strategies import build_mask
from fastmim.models.convnextv2 import Block, ConvNeXtV2, convnextv2_sizes
from fastmim.models.convnextv2_sparse import BACKENDS, sparse_forward
from fastmim.models.registry import register_model
from fastmim.models.vit import to_2tuple
from fastmim.targets import PixelTarget

ENCODER_HEAD_KEYS = ("head.norm.weight", "head.norm.bias")


class FCMAE(PixelTarget, nn.Module):
    """Fully convolutional masked autoencoder on ConvNeXt V2.

    Args:
        img_size: input side (or (H, W)), divisible by patch_size.
        patch_size: mask patch side in pixels: the encoder's total stride (32), one patch per last-stage pixel.
        in_chans, depths, dims, drop_path_rate: the ConvNeXt V2 encoder.
        decoder_embed_dim, decoder_depth: decoder width and blocks (official: 512, 1).
        mask_ratio: fraction of patches removed per sample (official 0.6).
        norm_pix_loss: normalise each target patch by its mean and std.
        sparse_backend: "fastmim" (visible pixels only), "spconv" (the same, with the stem and downsampling convs
            as spconv sparse convolutions; needs ``pip install spconv-cu120``, raises ImportError at the first
            forward without it) or "dense_masked" (the dense reference); "auto" picks "fastmim" where its depthwise
            kernel is compiled (Triton on CUDA, the C++ extension on CPU), else "dense_masked" (CPU without
            ``fastmim._C``: the pure-PyTorch sparse conv is slower than the dense one). "auto" never picks "spconv".
        fused_ops: the loss through fastmim.ops (False: the plain reference, same value).
        fused_norm: the sparse encoder's block LayerNorms through ``fastmim.ops.layer_norm``, written in the autocast
            dtype that fc1 reads (no fp32 copy and cast; same values up to that rounding). The dense_masked
            reference and the decoder keep nn.LayerNorm.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 32,
        in_chans: int = 3,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 1,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = True,
        sparse_backend: str = "auto",
        fused_ops: bool = True,
        fused_norm: bool = False,
    ):
        super().__init__()
        check_mask_ratio(mask_ratio)
        if sparse_backend not in (*BACKENDS, "auto"):
            raise ValueError(f"sparse_backend must be one of {(*BACKENDS, 'auto')}, got {sparse_backend!r}")
        self.img_size = to_2tuple(img_size, "img_size")
        self.encoder = ConvNeXtV2(in_chans, depths, dims, drop_path_rate, head=False)
        self.encoder.fused_norm = fused_norm
        stride = self.encoder.stride
        if patch_size != stride:  # the decoder predicts one patch per last-stage pixel, as in the official code
            raise ValueError(f"patch_size must equal the encoder's total stride {stride}, got {patch_size}")
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"image size {self.img_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if self.num_patches < 2:  # nothing could be both hidden and seen: the loss would have no patch
            raise ValueError(f"a {self.img_size[0]}x{self.img_size[1]} image is one {patch_size}-px mask patch: FCMAE "
                             f"hides some patches and sees others, so it needs at least two (an image of "
                             f"{2 * patch_size} px or more)")  # fmt: skip
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.sparse_backend = sparse_backend
        self.fused_ops = fused_ops
        # --- Head: projection, mask tokens, ConvNeXt V2 decoder blocks, per-patch pixel prediction ---
        self.proj = nn.Conv2d(dims[-1], decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size**2 * in_chans, kernel_size=1)
        self._init_head()

    def _init_head(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.proj, self.decoder, self.pred):
            for mod in m.modules():
                if isinstance(mod, nn.Conv2d | nn.Linear):
                    nn.init.trunc_normal_(mod.weight, std=0.02)
                    nn.init.zeros_(mod.bias)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def official_no_decay(self, name: str, p: torch.Tensor) -> bool:
        """ConvNeXt V2's pretraining exempts 1-D parameters and biases (timm 0.3.2's add_weight_decay): the mask token
        decays, and so do GRN's gamma and beta, which are (1, C) and (1, 1, 1, C) there (1-D ``grn.weight`` and
        ``grn.bias`` here)."""
        return (p.ndim <= 1 or name.endswith(".bias")) and ".grn." not in name

    def backend_for(self, device: torch.device) -> str:
        if self.sparse_backend != "auto":
            return self.sparse_backend
        if device.type == "cuda" or (device.type == "cpu" and _ext.available()):
            return "fastmim"
        return "dense_masked"

    # --- Mask ---
    def make_mask(self, batch: int, device: torch.device, mask_ratio: float | None = None) -> MaskInfo:
        """The masks of a forward given none (the reconstruction pictures): random, or those of a subclass's own
        ``mask_strategy`` (the trainer's: the pictures showed random masks where it trained on others)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if type(self).mask_strategy is not FCMAE.mask_strategy:
            return self.mask_strategy(ratio=ratio).draw(batch, device).info()
        return random_masking(batch, self.num_patches, ratio, device=device)

    def mask_strategy(self, seed: int = 0, ratio: float | None = None) -> MaskStrategy:
        """FCMAE's random patch masks as a ``fastmim.masking`` strategy: a pure function of (seed, epoch, sample
        index), which the trainer calls with each batch's dataset indices."""
        return build_mask("random", self.grid_size, ratio=self.mask_ratio if ratio is None else ratio, seed=seed)

    # --- Encoder ---
    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor, num_visible: int | None = None) -> torch.Tensor:
        """[B, C, H, W], mask [B, L] (1 = removed) -> [B, dims[-1], H/32, W/32], zero at removed patches.
        ``num_visible``: visible patches per sample when known (the same in every sample): no host syncs."""
        visible = (mask < 0.5).view(-1, *self.grid_size)
        return sparse_forward(self.encoder, imgs, visible, self.backend_for(imgs.device), num_visible)

    # --- Head ---
    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> predicted patches [B, L, p*p*C] (MAE's (p, q, c) order)."""
        x = self.proj(latent)  # [B, Dd, gh, gw]
        m = mask.view(x.shape[0], 1, *self.grid_size).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        x = self.decoder(x).permute(0, 2, 3, 1)  # [B, gh, gw, Dd]
        # the 1x1 pred conv as a linear on channels-last pixels: [B, L, p*p*C] comes out contiguous, so the loss reads
        # each patch's pixels in one run (a transposed conv output would be read with stride L)
        x = F.linear(x, self.pred.weight.flatten(1), self.pred.bias)  # [B, gh, gw, p*p*C]
        return x.flatten(1, 2)  # [B, L, p*p*C]

    # --- Target and loss: PixelTarget (patchify, unpatchify, forward_loss, reconstruct) ---

    # --- Forward ---
    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: MaskInfo | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred [B, L, p*p*C], mask [B, L] with 1 = removed)."""
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != (self.in_chans, *self.img_size):
            raise ValueError(f"expected images [B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}], "
                             f"got {tuple(imgs.shape)}")  # fmt: skip
        if mask is None:
            mask = self.make_mask(imgs.shape[0], imgs.device, mask_ratio)
        else:
            mask = as_mask_info(
                mask, True, self.num_patches, type(self).__name__, grid=self.grid_size, batch=imgs.shape[0]
            )
        latent = self.forward_encoder(imgs, mask.mask, mask.ids_keep.shape[1])
        pred = self.forward_decoder(latent, mask.mask)
        return self.forward_loss(imgs, pred, mask.mask), pred, mask.mask

    # --- Export ---
    def encoder_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """The encoder alone with timm's names; loads into ``timm.create_model("convnextv2_<size>", num_classes=0)``.
        timm's classifier-head LayerNorm, which pretraining never uses, is included at its initial values (ones,
        zeros) so the load is strict."""
        state = self.state_dict() if state is None else state  # (or a whole state gathered from FSDP shards)
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        dim = self.encoder.num_features
        ref = state["stem.0.weight"]
        state[ENCODER_HEAD_KEYS[0]] = torch.ones(dim, dtype=ref.dtype, device=ref.device)
        state[ENCODER_HEAD_KEYS[1]] = torch.zeros(dim, dtype=ref.dtype, device=ref.device)
        return state


def _fcmae(size: str, **kwargs) -> FCMAE:
    return FCMAE(**{**convnextv2_sizes()[size], **kwargs})


for _size in convnextv2_sizes():
    register_model(f"fcmae_convnextv2_{_size}", functools.partial(_fcmae, _size))
