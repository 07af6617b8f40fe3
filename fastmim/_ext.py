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


# csrc/bindings.cpp's SOURCE_VERSION these Python sources expect of fastmim._C
C_SOURCE_VERSION = 2


def _load(name: str, version: int | None = None) -> tuple[ModuleType | None, str | None]:
    """(fastmim.<name>, None), or (None, why not): not built (FASTMIM_BUILD_EXT=0, FASTMIM_CUDA=0, a source
    checkout), built for another Python, built from older sources than these (``version``: a checkout pulled without
    rebuilding; its functions may mean something else now), or disabled by FASTMIM_NO_EXT=1."""
    if os.environ.get("FASTMIM_NO_EXT", "0") == "1":
        return None, "disabled by FASTMIM_NO_EXT=1"
    try:
        module = importlib.import_module(f"fastmim.{name}")
    except ImportError as e:
        return None, str(e)
    built = getattr(module, "SOURCE_VERSION", 1)
    if version is not None and built != version:
        return None, (f"{module.__file__} was built from other sources (version {built}, these need {version}): "
                      "rebuild it with `pip install -e .`")  # fmt: skip
    return module, None


_C, load_error = _load("_C", C_SOURCE_VERSION)
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
