"""Loads the native extensions once: ``fastmim._C`` (C++ CPU kernels, mask generators; fastmim falls back to its
PyTorch reference paths without it) and ``fastmim._cuda`` (CUDA kernels, built when a CUDA toolkit was found; without
it CUDA tensors run the Triton kernels)."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType


class ExtensionWarning(RuntimeWarning):
    """Issued once when fastmim runs without its native extension."""


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(fastmim.<name>, None), or (None, why not): not built (FASTMIM_BUILD_EXT=0, FASTMIM_CUDA=0, a source
    checkout), built for another Python, or disabled by FASTMIM_NO_EXT=1."""
    if os.environ.get("FASTMIM_NO_EXT", "0") == "1":
        return None, "disabled by FASTMIM_NO_EXT=1"
    try:
        return importlib.import_module(f"fastmim.{name}"), None
    except ImportError as e:
        return None, str(e)


_C, load_error = _load("_C")
_cuda, cuda_load_error = _load("_cuda")

if _C is None:
    warnings.warn(
        f"fastmim is running without its native extension fastmim._C ({load_error}); "
        "using the PyTorch reference paths. Build it with `pip install -e .`.",
        ExtensionWarning,
        stacklevel=2,
    )


def cuda_available() -> bool:
    """True when ``fastmim._cuda`` (the CUDA kernels) is loaded; it runs only where a CUDA device is."""
    return _cuda is not None


def available() -> bool:
    """True when ``fastmim._C`` is loaded."""
    return _C is not None


def require() -> ModuleType:
    """Returns ``fastmim._C`` or raises a RuntimeError that says why it is missing."""
    if _C is None:
        raise RuntimeError(f"fastmim._C is not available: {load_error}")
    return _C
