"""The integrations import their library lazily: a clear error when it is missing, a warning when its version is one
fastmim's equality tests have not run against."""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings

_WARNED: set[str] = set()


def require(package: str, tested: tuple[str, ...], extra: str):
    """Imports ``package``; ``tested``: version prefixes the integration was tested with; ``extra``: the fastmim
    extra that installs it."""
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"this fastmim integration needs {package}: pip install 'fastmim[{extra}]' (or {package})") \
            from e  # fmt: skip
    version = importlib.metadata.version(package)
    if not version.startswith(tested) and package not in _WARNED:
        _WARNED.add(package)
        said = f"fastmim's {package} integration was tested with {package} {' or '.join(tested)}x; found {version}"
        warnings.warn(f"{said}. Its equality tests (tests/integrations) tell whether it still holds.", stacklevel=3)
    return module
