"""Model registry: ``fastmim.create_model("mae_vit_base_patch16")``."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PROVIDERS = ("fastmim.models.vit_zoo", "fastmim.methods")  # modules whose import registers models
# the pretraining recipes' name prefixes: ``mae_vit_base_patch16`` is MAE on the encoder ``vit_base_patch16``
RECIPE_PREFIXES = ("mae_", "pixmim_", "simmim_", "a2mim_", "maskfeat_", "data2vec2_", "ijepa_", "fcmae_")


def register_model(name: str, fn: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn


def _load_providers() -> None:
    for mod in _PROVIDERS:
        importlib.import_module(mod)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _load_providers()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds a registered model; keyword arguments override its defaults (e.g. ``img_size=112``). ``fused_gelu``
    (any model with ViT MLPs) computes each MLP's fc1 bias and GELU with ``fastmim.ops.bias_gelu``.

    Raises:
        ValueError: unknown name (with the closest registered names) or an argument the model does not take.
    """
    _load_providers()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (fastmim.list_models() lists all {len(_REGISTRY)})")
    fused_gelu = kwargs.pop("fused_gelu", None)
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model {name!r}: {e}") from e
    if fused_gelu is not None:
        from torch import nn

        from fastmim.models.vit import Mlp, set_fused_gelu

        if fused_gelu:
            mlps = [m for m in model.modules() if isinstance(m, Mlp)]
            in_mlps = sum(1 for m in mlps for c in m.modules() if isinstance(c, nn.GELU))
            other = sum(1 for m in model.modules() if isinstance(m, nn.GELU)) - in_mlps
            if not mlps or other:  # none to fuse, or GELUs (a timm encoder's) it would leave unfused
                raise ValueError(f"bad arguments for model {name!r}: fused_gelu applies to models whose MLPs are "
                                 f"fastmim ViT MLPs ({len(mlps)} here, {other} other GELU layers)")  # fmt: skip
        set_fused_gelu(model, fused_gelu)
    return model
