"""fastmim: masked image modeling pretraining, fast.

Every method is Mask + Encoder + Target + Head; see ``fastmim.methods`` for recipes and ``fastmim.ops`` for the
fused ops.
"""

from fastmim import _ext

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__", "has_native_extension"]


def has_native_extension() -> bool:
    """True when the C++ extension ``fastmim._C`` was built and loaded."""
    return _ext.available()


# subpackages reachable as attributes after a plain ``import fastmim`` (``fastmim.eval.load_encoder(...)``)
SUBPACKAGES = ("data", "eval", "heads", "integrations", "masking", "methods", "models", "ops", "targets", "train")


def __getattr__(name: str):
    """``create_model`` and ``list_models``, and the subpackages, imported on first use: ``import fastmim.ops`` (the
    op library other codebases import) loads none of the models."""
    if name in ("create_model", "list_models"):
        from fastmim.models import registry

        return getattr(registry, name)
    if name in SUBPACKAGES:
        import importlib

        return importlib.import_module(f"fastmim.{name}")
    raise AttributeError(f"module 'fastmim' has no attribute {name!r}")
