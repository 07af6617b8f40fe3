"""A lean Vision Transformer encoder whose parameter names match timm's ``VisionTransformer``.

An encoder state dict from fastmim loads into ``timm.models.vision_transformer.VisionTransformer`` (and
``timm.create_model("vit_base_patch16_224", num_classes=0)``) with strict key matching, and vice versa. An encoder with
BEiT's relative position bias (SimMIM's and A2MIM's) loads into timm's ``Beit`` through ``to_beit_state_dict``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fastmim._args import as_int
from fastmim.models.convnextv2 import DropPath
from fastmim.models.pos_embed import sincos_2d
from fastmim.ops.attention import attention
from fastmim.ops.bias_gelu import bias_gelu
from fastmim.ops.layer_norm import add_layer_norm

try:  # optional: used for fp16/bf16 CUDA tensors when installed (pip install fastmim[flash])
    from flash_attn import flash_attn_qkvpacked_func as _flash_qkvpacked
except Exception:  # ImportError, or a broken build that fails at import
    _flash_qkvpacked = None

ATTN_IMPLS = ("auto", "sdpa", "flash", "math", "fastmim")


def to_2tuple(x: int | tuple[int, int], name: str = "size") -> tuple[int, int]:
    """An int (numpy's too) as (x, x), or a pair of ints as a tuple."""
    if as_int(x) is not None:
        return (as_int(x), as_int(x))
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__") or len(x) != 2 or None in map(as_int, x):
        raise ValueError(f"{name} must be an int or a pair of ints, got {x!r}")
    return (as_int(x[0]), as_int(x[1]))


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, gh*gw, D] with a stride-p convolution (timm's ``patch_embed.proj``)."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        for side, p in zip(self.img_size, self.patch_size, strict=True):
            if side % p:
                raise ValueError(f"image size {self.img_size} is not divisible by the patch size {patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def check(self, x: torch.Tensor) -> None:
        """ValueError naming the expected [B, C, H, W] when ``x`` is not a batch of this embedding's images."""
        c = self.proj.in_channels
        if x.dim() != 4 or x.shape[1] != c or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected images [B, {c}, {self.img_size[0]}, {self.img_size[1]}], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


REL_POS_BIAS = (None, "shared", "block")
ABS_POS = ("sincos", "learned", "none")  # abs_pos_embed: True is "sincos", False "none"


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """BEiT's relative position index [1 + h*w, 1 + h*w] into a table of (2h - 1)(2w - 1) + 3 rows: a patch pair's row
    is its offset (dy, dx), the last three rows are class token -> patch, patch -> class token and class token ->
    itself (the class token is token 0)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    offsets = (2 * h - 1) * (2 * w - 1)
    index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    index[0, :] = offsets
    index[:, 0] = offsets + 1
    index[0, 0] = offsets + 2
    return index


def _rel_pos_table(module: nn.Module, grid: tuple[int, int], num_heads: int) -> None:
    """Gives ``module`` BEiT's ``relative_position_bias_table`` (zeros, as BEiT and SimMIM start it) and its index (a
    non-persistent buffer, derived from the grid)."""
    rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    module.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
    module.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)


def _rel_pos_bias(module: nn.Module) -> torch.Tensor:
    """The bias [1, H, 1 + N, 1 + N] added to the attention logits, read from ``module``'s table."""
    index = module.relative_position_index
    n = index.shape[0]
    return module.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


class RelativePositionBias(nn.Module):
    """One relative position bias shared by every block (BEiT's and SimMIM's ``use_shared_rel_pos_bias``; timm's
    ``Beit.rel_pos_bias``): ``forward()`` -> [1, H, 1 + N, 1 + N]."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        _rel_pos_table(self, grid, num_heads)

    def forward(self) -> torch.Tensor:
        return _rel_pos_bias(self)


class Attention(nn.Module):
    """Multi-head self-attention. ``rel_pos_grid``: a relative position bias of its own over this patch grid (BEiT's
    ``use_rel_pos_bias``, A2MIM's ``use_window``; the keys of timm's ``Beit`` attention); a shared one is passed to
    ``forward`` as ``attn_bias``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "auto",
                 rel_pos_grid: tuple[int, int] | None = None):  # fmt: skip
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if attn_impl == "flash" and _flash_qkvpacked is None:
            raise ValueError("attn_impl='flash' needs the flash-attn package (pip install fastmim[flash])")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rel_pos_grid is not None:
            _rel_pos_table(self, rel_pos_grid, num_heads)
        else:
            self.relative_position_bias_table = None

    def _use_flash(self, x: torch.Tensor) -> bool:
        if _flash_qkvpacked is None or self.attn_impl in ("sdpa", "math"):
            return False
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.head_dim <= 256

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]; ``attn_bias`` [1, H, N, N] (a shared relative position bias) is added to the
        scaled logits, as is this block's own."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, hd]
        if self.relative_position_bias_table is not None:
            own = _rel_pos_bias(self)
            attn_bias = own if attn_bias is None else attn_bias + own
        if attn_bias is not None:  # flash-attn and fastmim's kernels take no bias: SDPA (or the explicit math)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
            if self.attn_impl == "math":
                attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + attn_bias  # [B, H, N, N]
                out = attn.softmax(dim=-1) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
            return self.proj(out.transpose(1, 2).reshape(b, n, d))
        if self._use_flash(qkv):
            out = _flash_qkvpacked(qkv, 0.0, self.head_dim**-0.5, False)  # [B, N, H, hd]
            return self.proj(out.reshape(b, n, d))
        if self.attn_impl == "fastmim":  # reads the packed qkv, writes [B, N, H, hd]: no permute copies
            return self.proj(attention(qkv, self.head_dim**-0.5).reshape(b, n, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
        if self.attn_impl == "math":
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    fused_gelu = False  # fc1's bias and the GELU as one op (``fastmim.ops.bias_gelu``); ``set_fused_gelu``

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu:  # fc1's matmul alone (autocast casts as for the linear), then bias + GELU in one pass
            return self.fc2(bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


def set_fused_gelu(model: nn.Module, on: bool = True) -> nn.Module:
    """Every ViT MLP in ``model`` computes fc1's bias and GELU with ``fastmim.ops.bias_gelu`` (``on``) or as
    ``nn.Linear`` + ``nn.GELU`` (off): the same function and parameters, one pass less over the hidden activations
    in the backward (the bias gradient is summed with the GELU's backward). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, (Mlp, VisionTransformer)):
            m.fused_gelu = bool(on)
    return model


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT's layer scale; timm's ``LayerScale``: ``gamma``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block``). ``drop_path``: stochastic depth, each branch's output dropped
    per sample in training (timm's ``DropPath``, the same draws in the same order). ``init_values``: layer scale
    (each branch times a learned per-channel ``ls1.gamma`` / ``ls2.gamma`` starting at this value; SimMIM's ViT 0.1),
    None: none. ``rel_pos_grid``: a relative position bias of the block's own (``Attention``); the forward methods take
    a shared one as ``attn_bias``."""

    fsdp_unit = True  # sharded on its own under --fsdp (fastmim.train.fsdp)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, attn_impl="auto",
                 drop_path: float = 0.0, init_values: float | None = None,
                 rel_pos_grid: tuple[int, int] | None = None):  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl, rel_pos_grid=rel_pos_grid)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)  # no parameters: the state dict is timm's either way

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), attn_bias)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def forward_with_ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``forward(x)``, the MLP's output before its residual add (and its layer scale)): data2vec 2.0's teacher
        targets. A method of the block (not its parts called from outside) so that FSDP gathers the block's weights
        for it."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        t = self.mlp(self.norm2(x))
        return x + self.drop_path(self.ls2(t)), t

    def forward_fused(
        self, x: torch.Tensor, delta: torch.Tensor | None, attn_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the stream ``x + delta`` (``delta``: the previous block's MLP output, not yet added; None for
        the first block) with each residual add fused into the LayerNorm after it (``fastmim.ops.add_layer_norm``).
        Returns (stream, this block's MLP output, after drop path): ``forward(x + delta) == stream + mlp_out``."""
        if delta is None:
            h, y = x, self.norm1(x)
        else:
            y, h = add_layer_norm(delta, x, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        branch = self.drop_path(self.ls1(self.attn(y, attn_bias)))
        y, h = add_layer_norm(branch, h, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return h, self.drop_path(self.ls2(self.mlp(y)))


def checkpointed(fn, *args, enabled: bool = True):
    """``fn(*args)``, its activations recomputed in the backward instead of kept (``torch.utils.checkpoint``,
    non-reentrant, the RNG state replayed) when ``enabled`` and autograd records: activation checkpointing."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    norm: nn.LayerNorm,
    fused_norm: bool = False,
    grad_ckpt: bool = False,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(blocks(x))``; with ``fused_norm`` every residual add is fused with the LayerNorm that follows it, the
    last one with ``norm`` (whose output keeps the stream's dtype, as LayerNorm's under autocast); with ``grad_ckpt``
    each block's activations are recomputed in the backward (per-block activation checkpointing). ``attn_bias``: a
    shared relative position bias, given to every block."""
    extra = () if attn_bias is None else (attn_bias,)
    if not fused_norm or not len(blocks):
        for blk in blocks:
            x = checkpointed(blk, x, *extra, enabled=grad_ckpt)
        return norm(x)
    delta = None
    for blk in blocks:
        x, delta = checkpointed(blk.forward_fused, x, delta, *extra, enabled=grad_ckpt)
    s_dtype = torch.promote_types(x.dtype, delta.dtype)
    return add_layer_norm(delta, x, norm.weight, norm.bias, norm.eps, out_dtype=s_dtype)[0]


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


VIT_INITS = ("mae", "beit", "trunc")


def trunc_normal_02(tensor: torch.Tensor, init: str) -> torch.Tensor:
    """A normal of std 0.02 truncated as ``init``'s official code truncates it: BEiT's and SimMIM's pretraining models
    ("beit") cut it at one standard deviation (their ``_trunc_normal_``: a=-std, b=std, so the draw's own std is
    0.0108), mmpretrain's and openmixup's ("trunc", and the rest) at +-2, where it is in effect not cut."""
    cut = 0.02 if init == "beit" else 2.0
    return nn.init.trunc_normal_(tensor, std=0.02, a=-cut, b=cut)


def init_weights_beit(module: nn.Module, init: str = "beit") -> None:
    """BEiT's and SimMIM's initialisation: truncated-normal (std 0.02, ``trunc_normal_02``) linears and
    convolutions, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        trunc_normal_02(module.weight, init)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    grad_ckpt = False  # per-block activation checkpointing (``fastmim.models.vit.set_grad_ckpt``, ``--grad-ckpt``)

    """ViT encoder with a class token and fixed 2-D sin-cos position embeddings.

    Args:
        img_size: input side (or (H, W)), divisible by patch_size.
        patch_size: patch side (14 and 16 are the usual ones).
        in_chans: image channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        num_classes: size of a linear classifier on the class token (0: none, as timm's ``.mae`` models).
        class_token: a class token in front of the patch tokens (MAE, timm's default); False (I-JEPA): none, the
            position embedding has a row per patch only, and ``forward`` pools by averaging the tokens (timm's
            ``class_token=False, global_pool="avg", fc_norm=False``).
        attn_impl: "auto" (flash-attn for fp16/bf16 CUDA tensors when installed, else SDPA), "sdpa", "flash",
            "math" (explicit softmax(QK^T)V, for checking), "fastmim" (``fastmim.ops.attention``: Triton kernels
            for short sequences reading the packed qkv; not the default until it measures faster in the step).
        fused_norm: fuse each residual add with the LayerNorm after it (``fastmim.ops.add_layer_norm``); the same
            function, fewer passes over the activations. Off until it measures faster in the training step.
        fused_gelu: each MLP's fc1 bias and GELU as one op (``fastmim.ops.bias_gelu``, ``set_fused_gelu``); the
            same function. Off until it measures faster in the training step.
        fc_norm: the shape of a fine-tuning with MAE's global pool (timm's ``global_pool="avg", fc_norm=True``): no
            final norm on the tokens; ``forward`` normalises the mean of the patch tokens with ``fc_norm``.
        drop_path_rate: stochastic depth, rising linearly over the blocks from 0 to this value (timm's
            ``drop_path_rate``; SimMIM and A2MIM pretrain with 0.1). No parameters: the state dict is unchanged.
        init_values: layer scale, every block's branches times a learned per-channel gamma starting at this value
            (timm's ``init_values``, the same ``blocks.N.ls1.gamma`` keys; SimMIM's and A2MIM's ViT-B: 0.1); None:
            none.
        abs_pos_embed: the absolute position embedding added to the tokens: "sincos" (or True) fixed sin-cos, MAE's;
            "learned", started from a truncated normal 0.02 (MaskFeat's in mmpretrain, A2MIM's in openmixup; the class
            token's row too); "none" (or False), SimMIM's ViT-B, whose positions come from its relative position bias
            alone (``pos_embed`` is then None).
        rel_pos_bias: BEiT's relative position bias on the attention logits, a learned table of (2h - 1)(2w - 1) + 3
            rows per head started at zero: "shared" by all blocks (SimMIM's ViT-B, ``rel_pos_bias.*``), one per
            "block" (A2MIM's, openmixup's ``use_window``: ``blocks.N.attn.*``), None: none. Needs the class token;
            attention then runs in SDPA with the bias (not flash-attn or ``fastmim``). Such an encoder loads into
            timm's ``Beit`` (``to_beit_state_dict``), not its VisionTransformer.
        init: the encoder's initialisation: "mae" (xavier-uniform linears and patch embedding, MAE's and most
            recipes'), "beit" (BEiT's and SimMIM's: a normal of std 0.02 cut at one std for the linears, the patch
            embedding and the tokens, then each block's attn.proj and mlp.fc2 weights divided by sqrt(2 x its depth
            from 1)), "trunc" (mmpretrain's MaskFeat, openmixup's A2MIM: a normal of std 0.02 cut at +-2, without
            the rescaling; the patch embedding's bias PyTorch's uniform draw).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_classes: int = 0,
        attn_impl: str = "auto",
        fused_norm: bool = False,
        class_token: bool = True,
        fused_gelu: bool = False,
        fc_norm: bool = False,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        abs_pos_embed: bool | str = True,
        rel_pos_bias: str | None = None,
        init: str = "mae",
    ):
        super().__init__()
        abs_pos = ("sincos" if abs_pos_embed else "none") if isinstance(abs_pos_embed, bool) else abs_pos_embed
        if abs_pos not in ABS_POS:
            raise ValueError(f"abs_pos_embed must be one of {ABS_POS} (or True / False), got {abs_pos_embed!r}")
        if init not in VIT_INITS:
            raise ValueError(f"init must be one of {VIT_INITS}, got {init!r}")
        if rel_pos_bias not in REL_POS_BIAS:
            raise ValueError(f"rel_pos_bias must be one of {REL_POS_BIAS}, got {rel_pos_bias!r}")
        if rel_pos_bias is not None and not class_token:
            raise ValueError("rel_pos_bias: BEiT's relative position bias has rows for the class token; this ViT has "
                             "none (class_token=False)")  # fmt: skip
        if rel_pos_bias is not None and attn_impl in ("flash", "fastmim"):
            raise ValueError(f"attn_impl={attn_impl!r} takes no attention bias: a ViT with a relative position bias "
                             "runs SDPA (auto, sdpa) or math")  # fmt: skip
        if abs_pos == "none" and rel_pos_bias is None:
            raise ValueError("abs_pos_embed none (False) without a rel_pos_bias leaves the ViT no position information")
        if init_values is not None and (isinstance(init_values, bool) or not isinstance(init_values, int | float)
                                        or not math.isfinite(init_values) or init_values <= 0):  # fmt: skip
            raise ValueError(f"init_values (layer scale) must be a finite number > 0 or None, got {init_values!r}")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, int | float) or not (
                0.0 <= drop_path_rate < 1.0):  # fmt: skip
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}")
        if fc_norm and fused_norm:
            raise ValueError("fused_norm fuses the final norm, which a ViT with fc_norm does not have")
        self.fused_norm = fused_norm
        self.fused_gelu = fused_gelu
        self.class_token = bool(class_token)
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_size = as_int(patch_size) if as_int(patch_size) is not None else patch_size  # (numpy's int)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_patches = self.patch_embed.num_patches
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_parameter("cls_token", None)
        # sin-cos: fixed, but a parameter (requires_grad=False) so that it is in the state dict as in MAE and timm
        rows = self.num_patches + self.num_prefix_tokens
        self.abs_pos = abs_pos
        if abs_pos != "none":
            self.pos_embed = nn.Parameter(torch.zeros(1, rows, embed_dim), requires_grad=abs_pos == "learned")
        else:
            self.register_parameter("pos_embed", None)
        self.rel_pos_mode = rel_pos_bias
        grid = self.patch_embed.grid_size
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if rel_pos_bias == "shared" else None
        own = grid if rel_pos_bias == "block" else None
        rates = [float(drop_path_rate) * j / max(depth - 1, 1) for j in range(depth)]  # as torch.linspace(0, rate)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_impl, rate, init_values, own) for rate in rates]
        )
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if fc_norm else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init = init
        self._init_encoder()
        set_fused_gelu(self, fused_gelu)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def _init_encoder(self) -> None:
        if self.abs_pos == "sincos":
            self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid_size, cls_token=self.class_token)[None])
        elif self.abs_pos == "learned":
            trunc_normal_02(self.pos_embed, self.init)
        if self.init in ("beit", "trunc"):
            self.apply(partial(init_weights_beit, init=self.init))
            if self.class_token:
                trunc_normal_02(self.cls_token, self.init)
            if self.init == "trunc":  # mmpretrain's MaskFeat and openmixup leave the patch embedding's bias PyTorch's
                fan_in = self.patch_embed.proj.weight[0].numel()
                nn.init.uniform_(self.patch_embed.proj.bias, -(fan_in**-0.5), fan_in**-0.5)
            for depth, blk in enumerate(self.blocks if self.init == "beit" else [], start=1):  # BEiT's fix_init_weight
                blk.attn.proj.weight.data.div_(math.sqrt(2.0 * depth))
                blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * depth))
            return
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, as MAE
        if self.class_token:
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def with_pos(self, x: torch.Tensor) -> torch.Tensor:
        """Every patch token [B, N, D] plus its position embedding (as it is without one)."""
        return x if self.pos_embed is None else x + self.pos_embed[:, self.num_prefix_tokens :, :]

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens that carry their position embedding [B, K, D] (all of them, or the visible ones; all of them
        with a relative position bias) -> [B, 1 + K, D]: the class token in front (none without one: [B, K, D]), the
        blocks, the final norm."""
        if self.class_token:
            cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        bias = None
        if self.rel_pos_mode is not None:
            if x.shape[1] != self.num_patches + 1:
                raise ValueError(f"a ViT with a relative position bias sees every token ({self.num_patches} patches), "
                                 f"got {x.shape[1] - 1}")  # fmt: skip
            bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        return run_blocks(self.blocks, x, self.norm, self.fused_norm, self.grad_ckpt, bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + N, D] normalised tokens, class token first ([B, N, D] without one; with
        ``fc_norm``, not normalised)."""
        return self.encode_tokens(self.with_pos(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token features [B, D] (the tokens' mean without a class token; with ``fc_norm``, the normalised mean
        of the patch tokens), or logits [B, num_classes] when a head is configured."""
        feats = self.forward_features(x)
        if self.fc_norm is not None:
            return self.head(self.fc_norm(feats[:, self.num_prefix_tokens :].mean(dim=1)))
        return self.head(feats[:, 0] if self.class_token else feats.mean(dim=1))


def to_beit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fastmim ViT's state dict in the keys of timm's ``Beit`` (for an encoder with a relative position bias, which
    timm's VisionTransformer cannot hold): ``qkv.bias`` becomes ``q_bias`` and ``v_bias`` (BEiT has no key bias: a key
    bias adds the same q.b to every logit of a row, which the softmax cancels, so the function is unchanged) and
    ``ls1.gamma`` / ``ls2.gamma`` become ``gamma_1`` / ``gamma_2``. Build the timm model with ``beit_kwargs``."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.qkv.bias"):
            d = v.shape[0] // 3
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = v[:d], v[2 * d :]
        elif k.endswith((".ls1.gamma", ".ls2.gamma")):
            out[k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = v
        else:
            out[k] = v
    return out


def from_beit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``to_beit_state_dict`` undone: timm's ``Beit`` keys (BEiT's and SimMIM's checkpoints) in fastmim's, the key
    bias zero; ``relative_position_index`` buffers are dropped (fastmim derives them)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.q_bias"):
            v_bias = state[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
        elif k.endswith((".attn.v_bias", ".attn.k_bias", "relative_position_index")):
            continue
        elif k.endswith((".gamma_1", ".gamma_2")):
            out[k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = v
        else:
            out[k] = v
    return out


def beit_kwargs(encoder: VisionTransformer) -> dict:
    """The arguments of timm's ``Beit`` of ``encoder``'s shape (no classifier; its pooled output the class token
    after the final norm, or, for a fine-tuning with MAE's global pool, ``fc_norm`` of the patch tokens' mean)."""
    blk = encoder.blocks[0]
    gamma = getattr(blk.ls1, "gamma", None)
    return dict(
        img_size=encoder.patch_embed.img_size, patch_size=encoder.patch_embed.patch_size, in_chans=encoder.in_chans,
        embed_dim=encoder.embed_dim, depth=len(encoder.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / encoder.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        init_values=None if gamma is None else 1.0, use_abs_pos_emb=encoder.pos_embed is not None,
        use_rel_pos_bias=encoder.rel_pos_mode == "block", use_shared_rel_pos_bias=encoder.rel_pos_mode == "shared",
        num_classes=0, global_pool="avg" if encoder.fc_norm is not None else "token",
        use_fc_norm=encoder.fc_norm is not None, norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )  # fmt: skip


def vit_sizes() -> dict[str, dict]:
    """Width, depth and heads of the standard ViT sizes."""
    return {
        "tiny": dict(embed_dim=192, depth=12, num_heads=3),
        "small": dict(embed_dim=384, depth=12, num_heads=6),
        "base": dict(embed_dim=768, depth=12, num_heads=12),
        "large": dict(embed_dim=1024, depth=24, num_heads=16),
        "huge": dict(embed_dim=1280, depth=32, num_heads=16),
        "giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),  # timm's vit_giant_patch14
    }


def set_grad_ckpt(model: nn.Module, enabled: bool = True) -> int:
    """Turns per-block activation checkpointing on (or off) in every part of ``model`` that supports it (the ViTs'
    encoder, decoder and predictor blocks; ConvNeXt V2's blocks); returns how many parts it set."""
    parts = [m for m in model.modules() if hasattr(type(m), "grad_ckpt")]
    for m in parts:
        m.grad_ckpt = bool(enabled)
    return len(parts)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "Block",
    "PatchEmbed",
    "RelativePositionBias",
    "VisionTransformer",
    "checkpointed",
    "init_weights",
    "num_params",
    "run_blocks",
    "beit_kwargs",
    "from_beit_state_dict",
    "relative_position_index",
    "set_grad_ckpt",
    "to_beit_state_dict",
    "vit_sizes",
]
