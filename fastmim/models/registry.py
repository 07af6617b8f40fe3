"""Model registry: ``fastmim.create_model("mae_vit_base_patch16")``."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
import re
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PROVIDERS = ("fastmim.models.vit_zoo", "fastmim.methods")  # modules whose import registers models
# the pretraining recipes' name prefixes: ``mae_vit_base_patch16`` is MAE on the encoder ``vit_base_patch16``
RECIPE_PREFIXES = ("mae_", "pixmim_", "simmim_", "a2mim_", "maskfeat_", "data2vec2_", "ijepa_", "fcmae_")


def register_model(name: str, fn: Callable[..., nn.Module]) -> None:
    """Makes ``fastmim.create_model(name, **kwargs)`` (and ``--model name``) build ``fn(**kwargs)``. A ViT recipe
    class of your own: ``fastmim.methods.mae.register_vit_family(prefix, cls)`` registers every size; a name ending
    in its encoder's (``..._vit_base_patch16``) lets ``python -m fastmim.eval`` read its encoder.safetensors.

    Raises:
        ValueError: ``name`` is registered already, to another function.
    """
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn


def _load_providers() -> None:
    for mod in _PROVIDERS:
        importlib.import_module(mod)


def accepted_keywords(factory) -> set[str]:
    """The keyword arguments a registered factory takes: its own, those of the classes a ``functools.partial`` holds,
    of the class a function passing ``**kwargs`` on returns (its annotation) and of the bases
    each class passes its ``**kwargs`` on to."""
    names: set[str] = set()
    bound: set[str] = set()
    todo, seen = [factory], set()
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, functools.partial):
            names |= set(f.keywords)
            todo += [f.func, *(a for a in f.args if isinstance(a, type))]
            try:  # the parameters its positional arguments fill are not the caller's to give
                params = [p for p in inspect.signature(f.func).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
                bound |= {p.name for p in params[: len(f.args)]}
            except (TypeError, ValueError):
                pass
            continue
        try:
            sig = inspect.signature(f.__init__ if isinstance(f, type) else f, eval_str=True)
        except Exception:  # no signature, or an annotation that does not resolve
            continue
        params = sig.parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if any(p.kind == p.VAR_KEYWORD for p in params):  # **kwargs go on to the bases, or to the class built
            if isinstance(f, type):
                todo += [b for b in f.__mro__[1:] if "__init__" in vars(b) and b is not object]
            elif isinstance(sig.return_annotation, type):
                todo.append(sig.return_annotation)
    return names - bound


def _unexpected_hint(factory, error: TypeError) -> str:
    """'; did you mean ...?' for an unexpected keyword argument close to one the factory takes."""
    m = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if not m:
        return ""
    if m.group(1) == "target":  # (fastmim.targets.choice)
        return (
            "; this recipe's target is its own: MAE, SimMIM and A2MIM take target=pixels|lowpass|hog (SimMIM "
            "with mask_type='block' and target='hog' is MaskFeat's target on another recipe)"
        )
    close = difflib.get_close_matches(m.group(1), sorted(accepted_keywords(factory)), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def recipe_default(name: str, key: str):
    """The value a registered model takes for ``key`` when it is not given (its registration's own, e.g. a size's,
    else its class's signature default); None when unknown."""
    _load_providers()
    f = _REGISTRY.get(name)
    for _ in range(8):  # partials of partials
        if not isinstance(f, functools.partial):
            break
        if key in f.keywords:
            return f.keywords[key]
        classes = [a for a in f.args if isinstance(a, type)]
        f = classes[0] if classes else f.func
    try:
        param = inspect.signature(f.__init__ if isinstance(f, type) else f).parameters.get(key)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


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
        raise ValueError(f"bad arguments for model {name!r}: {e}{_unexpected_hint(_REGISTRY[name], e)}") from e
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
