"""Evaluation of a pretrained encoder: DINO's weighted kNN and MAE's linear probe (``python -m fastmim.eval``)."""

import importlib

# each name's module, imported on first use: ``python -m fastmim.eval --help`` runs this file and needs none of them
_HOMES = {
    "LARS": "lars",
    "LinearProbe": "linprobe",
    "extract_features": "encoder",
    "knn_accuracy": "knn",
    "knn_scores": "knn",
    "load_encoder": "encoder",
    "pooled_features": "encoder",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"fastmim.eval.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'fastmim.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
