"""Backend choice and the input checks every op shares.

Auto choice: CUDA tensors -> Triton, CPU tensors -> ``fastmim._C``, anything else (or a dtype the kernels do not
take) -> the PyTorch reference. ``FASTMIM_BACKEND=triton|cpp|torch`` forces one; with ``TRITON_INTERPRET=1`` (set
before triton is imported) the Triton kernels also run on CPU tensors, which is how CI tests them. Ops in
``NO_CPP_KERNEL`` run their "torch" backend where the C++ backend would be chosen (or forced).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from fastmim import _ext

BACKENDS = ("triton", "cpp", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtype codes of fastmim._C
CPP_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# ops with no fastmim._C kernel: "cpp" (chosen or forced) runs their "torch" backend instead
NO_CPP_KERNEL: frozenset[str] = frozenset({"grn"})


@functools.cache
def triton_available() -> str | None:
    """None when Triton can be used, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # CPU-only installs without triton
        return f"triton is not installed ({e})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    name = os.environ.get("FASTMIM_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTMIM_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


def _cpp_problem(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the C++ backend runs on CPU tensors, these are on {device}"
    if not _ext.available():
        return f"fastmim._C is not available ({_ext.load_error})"
    return None


def triton_problem(device: torch.device) -> str | None:
    why = triton_available()
    if why:
        return why
    if device.type == "cpu" and not triton_interpreted():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device}"
    return None


def choose_backend(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    """The backend ``op`` runs on for tensors on ``device`` with ``dtypes``.

    Args:
        op: op name, for error messages.
        device: where the tensors are.
        dtypes: floating dtypes of the inputs; the kernels take float32, bfloat16 and float16.
    """
    forced = forced_backend()
    kernel_dtypes = all(dt in KERNEL_DTYPES for dt in dtypes)
    if forced == "torch":
        return "torch"
    if forced is not None:
        why = triton_problem(device) if forced == "triton" else _cpp_problem(device)
        if why is None and not kernel_dtypes:
            why = f"its kernels take float32, bfloat16 and float16, not {', '.join(map(str, dtypes))}"
        if why:
            raise RuntimeError(f"{op}: FASTMIM_BACKEND={forced} cannot run here: {why}")
        return "torch" if forced == "cpp" and op in NO_CPP_KERNEL else forced
    if not kernel_dtypes:
        return "torch"
    if device.type == "cuda" and triton_problem(device) is None:
        return "triton"
    if device.type == "cpu" and _cpp_problem(device) is None:
        return "torch" if op in NO_CPP_KERNEL else "cpp"
    return "torch"


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_ids(op: str, name: str, ids: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """Shape, dtype and device of an index tensor (values are checked where that costs no host sync)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: {name} must be int64 (or int32) indices, got {ids.dtype}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(ids.shape)}, expected {tuple(shape)}")
    check_device(op, name, ids, device)


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the other inputs on {device}")


def check_id_values(op: str, name: str, ids: torch.Tensor, upper: int, distinct: bool, lower: int = 0) -> None:
    """Range (and, if asked, per-row distinctness) of ``ids`` in [lower, upper): run on CPU tensors only.

    On CUDA this would cost a host sync every call, so there it runs only with ``FASTMIM_CHECK_IDS=1`` (debugging);
    otherwise the kernels are memory-safe instead (an out-of-range id gives NaN rows, never an out-of-bounds read).
    """
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if ids.device.type != "cpu" and os.environ.get("FASTMIM_CHECK_IDS", "0") != "1":
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < lower or hi >= upper:
        where = ((ids < lower) | (ids >= upper)).nonzero()[0].tolist()
        raise IndexError(
            f"{op}: {name}{where} = {int(ids[tuple(where)])} is out of range [{lower}, {upper}) (min {lo}, max {hi})"
        )
    if distinct and ids.shape[-1] > 1:
        flat = ids.reshape(-1, ids.shape[-1]).long()
        counts = torch.zeros(flat.shape[0], upper, dtype=torch.int32, device=ids.device).scatter_add_(
            1, flat, torch.ones_like(flat, dtype=torch.int32)
        )  # [rows, upper]: how often each id occurs; a sort would cost ten times more
        if int(counts.max()) > 1:
            row, value = (counts > 1).nonzero()[0].tolist()
            raise ValueError(f"{op}: {name} row {row} repeats index {value}; the ids of a row must be distinct")


def check_patch_size(op: str, patch_size: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")


def eager_function(
    name: str, forward: Callable, setup_context: Callable, backward: Callable, differentiable_backward: bool = False
) -> type:
    """An ``autograd.Function`` for eager calls built from an op's own forward, setup_context and backward.

    Eager calls skip the custom-op dispatcher, and the classic ``forward(ctx, ...)`` form also skips the
    ``inspect.signature`` binding that ``Function.apply`` does for a ``setup_context`` Function; together about
    50 us less per call. ``torch.compile`` traces the registered custom op instead. A backward that runs kernels is
    not differentiable itself: it is marked ``once_differentiable``, so a second derivative raises instead of
    silently missing terms.
    """

    def fwd(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    bwd = backward if differentiable_backward else torch.autograd.function.once_differentiable(backward)
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def use_custom_op() -> bool:
    """True when a call must go through the registered custom op rather than the lower-overhead eager
    ``autograd.Function``: while torch.compile traces, and while a dispatch mode is active (FlopCounterMode,
    FakeTensorMode, ...), so that such modes see ``torch.ops.fastmim.*`` and their registered formulas."""
    if torch.compiler.is_compiling():
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None
