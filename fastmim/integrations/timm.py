"""A timm ViT's blocks on fastmim's fused ops, one call:

    import timm
    from fastmim.integrations.timm import fuse_timm_vit
    model = fuse_timm_vit(timm.create_model("vit_base_patch16_224", pretrained=True))

Three parts of every block change, each to the same values and gradients (the weights, their names and the state
dict are timm's own; ``unfuse_timm_vit`` gives the model back exactly as it was; fusing twice changes nothing):

- ``norm1`` and ``norm2`` (``nn.LayerNorm``): ``fastmim.ops.layer_norm``, fp32 statistics, the output written once
  in the next matmul's dtype (under autocast bf16: bf16, where LayerNorm writes fp32 and the matmul casts it back).
  The model's final norm is left as it is: its output is what the caller reads (fp32 under autocast, as timm's);
- ``attn`` (timm's ``Attention``): the packed qkv read by ``fastmim.ops.attention``, no permute copies, for the short
  sequences of a ViT. It falls back to timm's own forward for what fastmim's attention does not do: an attention
  mask or ``is_causal``, attention dropout while training, q/k normalisation (``qk_norm``) and gated attention;
- ``mlp`` (timm's ``Mlp`` with an exact ``nn.GELU``): fc1's matmul, then its bias and the GELU in one pass
  (``fastmim.ops.bias_gelu``).

The modules are re-classed (``module.__class__``), not wrapped: the model pickles, deep-copies, saves and loads
(``torch.save`` of the whole model), and compiles as timm's. The same ops are fastmim's own ViT's ``fused_norm``,
``fused_gelu`` and ``attn_impl="fastmim"``, which the GPU suite times in the training step (benchmarks/gpu_suite.sh,
step ``graph``); they stay off by default until a GPU measures them faster, and so does this. ``fastmim.create_model
("mae", encoder=<timm ViT>)`` takes a fused timm model too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmim.integrations._versions import require
from fastmim.ops import attention, bias_gelu, layer_norm

TESTED = ("1.",)  # timm major versions the fused forwards were checked against (tests/integrations/test_timm.py)
FUSABLE = ("norm", "attention", "gelu")
_ORIGINAL = "_fastmim_unfused_class"  # the instance attribute that holds a fused module's own class


class FusedLayerNorm(nn.LayerNorm):
    """A block's ``nn.LayerNorm`` (or timm's ``LayerNorm``) on ``fastmim.ops.layer_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None or len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


def _identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _affine(norm: nn.LayerNorm) -> bool:
    """A LayerNorm ``fastmim.ops.layer_norm`` computes: a weight and a bias over one trailing dimension."""
    return norm.weight is not None and norm.bias is not None and len(norm.normalized_shape) == 1


def _fused_attention_class():
    timm = require("timm", TESTED, extra="eval")

    class FusedAttention(_vit(timm).Attention):  # (vision_transformer's: timm.layers' own since timm 1.0.16)
        """timm's ``Attention`` with the scores, softmax and values on ``fastmim.ops.attention``; timm's own forward
        for a mask, ``is_causal``, attention dropout in training, ``qk_norm`` or a gate."""

        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                    **kwargs) -> torch.Tensor:  # fmt: skip
            plain = (attn_mask is None and not is_causal and not kwargs and getattr(self, "gate", None) is None
                     and _identity(getattr(self, "q_norm", None)) and _identity(getattr(self, "k_norm", None))
                     and not (self.training and self.attn_drop.p > 0))  # fmt: skip
            if not plain:  # (is_causal passed only when set: timm before 1.0.26 does not take it)
                extra = {"attn_mask": attn_mask} if attn_mask is not None else {}
                return super().forward(x, **extra, **({"is_causal": True} if is_causal else {}), **kwargs)
            b, n, _ = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
            out = attention(qkv, self.scale).reshape(b, n, self.num_heads * self.head_dim)
            norm = getattr(self, "norm", None)  # (scale_norm; older timm has none)
            return self.proj_drop(self.proj(out if norm is None else norm(out)))

    FusedAttention.__module__ = __name__
    FusedAttention.__qualname__ = "FusedAttention"
    return FusedAttention


def _fused_mlp_class():
    timm = require("timm", TESTED, extra="eval")

    class FusedMlp(_vit(timm).Mlp):
        """timm's ``Mlp`` with fc1's bias and the exact GELU in one pass (``fastmim.ops.bias_gelu``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fc1.bias is None:  # (bias_gelu adds fc1's bias)
                return super().forward(x)
            x = bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)
            return self.drop2(self.fc2(self.norm(self.drop1(x))))

    FusedMlp.__module__ = __name__
    FusedMlp.__qualname__ = "FusedMlp"
    return FusedMlp


_LAZY = {"FusedAttention": _fused_attention_class, "FusedMlp": _fused_mlp_class}
_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    """The timm subclasses, built on first use (timm imported only then; unpickling a fused model finds them)."""
    if name in _LAZY:
        if name not in _BUILT:
            _BUILT[name] = _LAZY[name]()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _vit(timm):
    """timm's vision_transformer module: its Attention and Mlp are the classes a ViT's blocks hold in every timm 1.x
    (defined there before 1.0.16, imported there from timm.layers since)."""
    return timm.models.vision_transformer


def _blocks(model: nn.Module) -> list[nn.Module]:
    timm = require("timm", TESTED, extra="eval")
    blocks = [m for m in model.modules() if isinstance(m, timm.models.vision_transformer.Block)]
    if not blocks:
        raise TypeError(f"fuse_timm_vit: {type(model).__name__} holds no timm ViT Block (timm.create_model('vit_...') "
                        "models do)")  # fmt: skip
    return blocks


def _refit(module: nn.Module, fused: type) -> bool:
    """Re-classes ``module`` as ``fused`` (remembering its own class); False when it is fused already."""
    if isinstance(module, fused):
        return False
    module.__dict__[_ORIGINAL] = type(module)
    module.__class__ = fused
    return True


def fuse_timm_vit(model: nn.Module, parts: tuple[str, ...] = FUSABLE) -> nn.Module:
    """Runs the blocks of ``model`` (a timm ``VisionTransformer``, or any module holding timm ViT ``Block``s) on
    fastmim's fused ops; ``parts``: any of "norm", "attention", "gelu" (one name or several). Returns ``model``. A
    part a block does not have in the form fused here keeps timm's own class, and ``fused_parts`` does not count it:
    another norm, attention or activation class, a LayerNorm without its weight and bias, attention with ``qk_norm``
    or a gate, an MLP whose fc1 has no bias."""
    timm = require("timm", TESTED, extra="eval")
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = sorted(set(parts) - set(FUSABLE))
    if unknown:
        raise ValueError(f"fuse_timm_vit: unknown parts {unknown}; choose from {', '.join(FUSABLE)}")
    for block in _blocks(model):
        if "norm" in parts:
            for name in ("norm1", "norm2"):
                norm = getattr(block, name, None)
                if type(norm) in (nn.LayerNorm, getattr(timm.layers, "LayerNorm", nn.LayerNorm)) and _affine(norm):
                    _refit(norm, FusedLayerNorm)
        attn = block.attn
        if ("attention" in parts and type(attn) is _vit(timm).Attention and getattr(attn, "gate", None) is None
                and _identity(getattr(attn, "q_norm", None)) and _identity(getattr(attn, "k_norm", None))):  # fmt: skip
            _refit(attn, __getattr__("FusedAttention"))
        mlp = block.mlp
        if ("gelu" in parts and type(mlp) is _vit(timm).Mlp and isinstance(mlp.fc1, nn.Linear)
                and mlp.fc1.bias is not None and type(mlp.act) is nn.GELU
                and mlp.act.approximate == "none"):  # fmt: skip
            _refit(mlp, __getattr__("FusedMlp"))
    return model


def unfuse_timm_vit(model: nn.Module) -> nn.Module:
    """Undoes ``fuse_timm_vit``: every fused module gets its own class back. Returns ``model``."""
    for m in model.modules():
        own = m.__dict__.pop(_ORIGINAL, None)
        if own is not None:
            m.__class__ = own
    return model


def fused_parts(model: nn.Module) -> dict[str, int]:
    """How many modules of ``model`` run fused, per part: {"norm": ..., "attention": ..., "gelu": ...}."""
    counts = dict.fromkeys(FUSABLE, 0)
    for m in model.modules():
        if isinstance(m, FusedLayerNorm):
            counts["norm"] += 1
        elif type(m).__name__ == "FusedAttention" and type(m).__module__ == __name__:
            counts["attention"] += 1
        elif type(m).__name__ == "FusedMlp" and type(m).__module__ == __name__:
            counts["gelu"] += 1
    return counts
