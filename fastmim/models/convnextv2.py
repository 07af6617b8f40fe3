"""ConvNeXt V2 (Woo et al., 2023) with timm's parameter names, for dense use (fine-tuning) and as FCMAE's encoder.

A state dict from fastmim loads into ``timm.create_model("convnextv2_<size>", num_classes=...)`` with strict key and
shape matching, and vice versa: the small sizes (atto ... nano) store their pointwise layers as 1x1 convolutions
[out, in, 1, 1] as timm does (``conv_mlp``), the larger ones as linear weights [out, in]. Every block computes in
channels-last layout either way. Sparse execution on masked input (FCMAE) lives in ``convnextv2_sparse.py`` and runs
these same modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.ops.modules import GRN


def drop_path_keep(batch: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """The per-sample keep scale [B] of stochastic depth: 0 or 1 / (1 - p)."""
    return like.new_empty(batch).bernoulli_(1.0 - p) / (1.0 - p)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * drop_path_keep(x.shape[0], self.p, x).view((x.shape[0],) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``; same parameters as ``nn.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PointwiseLinear(nn.Module):
    """A per-pixel linear layer on channels-last input whose weight is stored as timm stores it: [out, in] or, for
    timm's ``conv_mlp`` sizes, as a 1x1 convolution [out, in, 1, 1]."""

    def __init__(self, in_features: int, out_features: int, conv_shape: bool = False):
        super().__init__()
        shape = (out_features, in_features, 1, 1) if conv_shape else (out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.weight.flatten(1), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, weight {tuple(self.weight.shape)}"


class GlobalResponseNorm(GRN):
    """GRN on channels-last input [B, H, W, C]: gx = ||x||_2 over H, W per channel; nx = gx / (mean_c gx + eps);
    out = x + bias + weight * (x * nx). Parameters ``weight``/``bias`` [C] (timm's names; the paper's gamma/beta).
    The dense encoder's formulation in plain PyTorch ops; ``fastmim.ops.GRN`` is the fused kernel's module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias, self.weight, x * nx)


class GrnMlp(nn.Module):
    """fc1 -> GELU -> GRN -> fc2 (timm's ``GlobalResponseNormMlp``: children ``fc1``, ``grn``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, conv_shape: bool = False):
        super().__init__()
        self.fc1 = PointwiseLinear(dim, hidden, conv_shape)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden)
        self.fc2 = PointwiseLinear(hidden, dim, conv_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        return self.fc2(self.grn(self.act(self.fc1(x))))


class Block(nn.Module):
    """ConvNeXt V2 block: depthwise 7x7 conv -> LayerNorm -> fc1 -> GELU -> GRN -> fc2, plus the residual."""

    fsdp_unit = True  # sharded on its own under --fsdp (fastmim.train.fsdp)

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, conv_shape: bool = False,
                 kernel_size: int = 7):  # fmt: skip
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GrnMlp(dim, int(mlp_ratio * dim), conv_shape)
        self.drop_path = DropPath(drop_path)

    def call_with(self, fn, *args):
        """``fn(self, *args)``: the sparse encoders' own computations of the block (on visible rows, masked), made
        through the block so that FSDP gathers its weights for them."""
        return fn(self, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], conv_shape: bool, downsample: bool):
        super().__init__()
        if downsample:  # LayerNorm + 2x2 stride-2 conv (timm: stages.i.downsample.{0,1}); every stage but the first
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, drop_paths[j], conv_shape=conv_shape) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> linear (timm's ``head.norm``, ``head.fc``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, num_classes or C]
        return self.fc(self.norm(x.mean(dim=(2, 3), keepdim=True)).flatten(1))


class ConvNeXtV2(nn.Module):
    grad_ckpt = False  # per-block activation checkpointing of the masked (FCMAE) paths (``--grad-ckpt``)
    # the sparse (FCMAE) paths' block LayerNorms through fastmim.ops.layer_norm: written in the autocast dtype, which
    # fc1 reads, instead of fp32 and a cast (``FCMAE(fused_norm=True)``, ``--fused-norm``)
    fused_norm = False

    """ConvNeXt V2: a 4x4 stride-4 stem, four stages of ConvNeXt V2 blocks with 2x downsampling between them.

    Args:
        in_chans: image channels.
        depths, dims: blocks and widths per stage.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
        num_classes: classifier size (0: features only; the pooled, normalised features, as timm's num_classes=0).
        conv_mlp: store the pointwise layers as 1x1 conv weights (timm's atto ... nano); None picks timm's choice
            (True when dims[0] <= 80).
        head: build ``head.norm`` (and ``head.fc``); FCMAE's encoder has none (its decoder reads the last stage).
    """

    def __init__(
        self,
        in_chans: int = 3,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        conv_mlp: bool | None = None,
        head: bool = True,
    ):
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {depths} and dims {dims} must be non-empty and of the same length")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.in_chans = in_chans
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.conv_mlp = default_conv_mlp(dims[0]) if conv_mlp is None else conv_mlp
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        n = sum(depths)
        rates = [drop_path_rate * j / max(n - 1, 1) for j in range(n)]  # linear from 0 (as torch.linspace)
        self.stages = nn.ModuleList()
        start, prev = 0, dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            self.stages.append(Stage(prev, dim, depth, rates[start : start + depth], self.conv_mlp, i > 0))
            start, prev = start + depth, dim
        self.num_features = dims[-1]
        self.head = ClassifierHead(dims[-1], num_classes) if head else None
        self.apply(_init_weights)

    @property
    def stride(self) -> int:
        """Total downsampling factor of the last stage (32 for four stages)."""
        return 4 * 2 ** (len(self.stages) - 1)

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (H, W divisible by ``stride``) -> last-stage features [B, dims[-1], H / 32, W / 32]."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the total stride {self.stride}")
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return x if self.head is None else self.head(x)


def _init_weights(m: nn.Module) -> None:
    """timm's ConvNeXt init: truncated normal (std 0.02) for conv and linear weights, zero biases."""
    if isinstance(m, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def default_conv_mlp(first_dim: int) -> bool:
    """timm's choice: the pointwise layers as 1x1 convolutions for the small sizes (atto ... nano, widths <= 80)."""
    return first_dim <= 80


def _official_kernel(v: torch.Tensor) -> torch.Tensor:
    """A MinkowskiEngine kernel of ConvNeXt V2's sparse FCMAE encoder as a dense conv weight, as its own fine-tuning
    reads it (``utils.remap_checkpoint_keys``): [K*K, in, out] -> [out, in, K, K], a depthwise [K*K, C] -> [C, 1, K,
    K]; the kernel offsets run column-major there, hence the last two axes swapped."""
    k = math.isqrt(v.shape[0])
    if v.dim() == 3:
        return v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], k, k).transpose(3, 2).contiguous()
    return v.permute(1, 0).reshape(v.shape[1], 1, k, k).transpose(3, 2).contiguous()


def is_official_state_dict(state: dict) -> bool:
    """Whether ``state`` has the keys of ConvNeXt V2's own code (facebookresearch/ConvNeXt-V2: ``downsample_layers``,
    ``stages.i.j``), the whole model's or an FCMAE checkpoint's (under ``encoder.``)."""
    return any(isinstance(k, str) and k.removeprefix("encoder.").startswith("downsample_layers.0.0.") for k in state)


def from_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ConvNeXt V2's own checkpoints in fastmim's (timm's) names and shapes: a fine-tuned dense model's (its final
    ``norm`` -> ``head.norm``, its classifier ``head`` -> ``head.fc``) and an FCMAE pretraining's, whose sparse encoder
    keeps MinkowskiEngine's layouts (kernels, ``.ln.`` and ``.linear.`` wrappers, (1, C) biases and GRN parameters)
    and whose ``proj``, ``mask_token``, ``decoder`` blocks and ``pred`` keep their names in fastmim's FCMAE. The
    pointwise layers of the encoder's stages take timm's shape for the size (1x1 convolutions up to width 80)."""
    first = next((v for k, v in state.items() if k.removeprefix("encoder.") == "downsample_layers.0.0.weight"), None)
    conv_mlp = first is not None and default_conv_mlp(first.shape[0])
    out = {}
    for key, v in state.items():
        prefix = "encoder." if key.startswith("encoder.") else ""
        parts = [p for p in key.removeprefix(prefix).split(".") if p not in ("ln", "linear")]
        if parts[-1] == "kernel":
            parts[-1], v = "weight", _official_kernel(v)
        elif parts[-1] == "bias" and v.dim() != 1:
            v = v.reshape(-1)
        if parts[-1] in ("gamma", "beta") and "grn" in parts:
            parts[-1], v = {"gamma": "weight", "beta": "bias"}[parts[-1]], v.reshape(-1)
        if parts[0] == "downsample_layers" and parts[1] == "0":
            parts = ["stem", *parts[2:]]
        elif parts[0] == "downsample_layers":
            parts = ["stages", parts[1], "downsample", *parts[2:]]
        elif parts[0] == "stages" and len(parts) > 2:
            parts = ["stages", parts[1], "blocks", *parts[2:]]
        elif parts[0] in ("norm", "head") and not prefix:  # the fine-tuned model's final norm and classifier
            parts = ["head", "norm" if parts[0] == "norm" else "fc", *parts[1:]]
        renames = {"dwconv": ["conv_dw"], "pwconv1": ["mlp", "fc1"], "pwconv2": ["mlp", "fc2"], "grn": ["mlp", "grn"]}
        parts = [q for p in parts for q in renames.get(p, [p])]
        if parts[0] == "stages" and parts[-2] in ("fc1", "fc2") and parts[-1] == "weight" and v.dim() == 2:
            v = v[:, :, None, None] if conv_mlp else v
        out[prefix + ".".join(parts)] = v
    return out


def convnextv2_sizes() -> dict[str, dict]:
    """Depths and widths of ConvNeXt V2's sizes (the paper's table; timm's names)."""
    return {
        "atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
        "femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
        "pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
        "nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
        "tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
        "base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
        "large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
        "huge": dict(depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816)),
    }


__all__ = ["Block", "ConvNeXtV2", "DropPath", "GlobalResponseNorm", "LayerNorm2d", "PointwiseLinear",
           "convnextv2_sizes", "default_conv_mlp", "drop_path_keep", "from_official_state_dict",
           "is_official_state_dict"]  # fmt: skip
