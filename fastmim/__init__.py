"""fastmim: masked image modeling pretraining, fast.

Every method is Mask + Encoder + Target + Head; see ``fastmim.methods`` for recipes and ``fastmim.ops`` for the
fused ops.
"""

from fastmim import _ext
from fastmim.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__", "has_native_extension"]


def has_native_extension() -> bool:
    """True when the C++ extension ``fastmim._C`` was built and loaded."""
    return _ext.available()
