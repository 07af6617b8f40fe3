"""Backend choice and the input checks every op shares.

Auto choice: CUDA tensors -> the backend that measured fastest for the op on that GPU model (``AUTO_CUDA``: the CUDA
kernels of ``fastmim._cuda`` or Triton), CPU tensors -> ``fastmim._C``, anything else (or a dtype the kernels do not
take) -> the PyTorch reference. ``FASTMIM_BACKEND=cuda|triton|cpp|torch`` (or ``fastmim.ops.set_backend``) forces
one; with ``TRITON_INTERPRET=1`` (set before triton is imported) the Triton kernels also run on CPU tensors, which
is how CI tests them. Ops in ``NO_CPP_KERNEL`` run their "torch" backend where the C++ backend would be chosen (or
forced), ops in ``NO_CUDA_KERNEL`` their "triton" backend where the CUDA one would.

Every op calls ``choose_backend`` once per call, so it is cached per (op, device, dtypes, forced backend) and
reads the environment through the interpreter's own dict (``os.environ.get`` costs about 1 us a call).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastmim import _ext

BACKENDS = ("cuda", "triton", "cpp", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtype codes of fastmim._C and fastmim._cuda
CPP_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# ops with no fastmim._C kernel: "cpp" (chosen or forced) runs their "torch" backend instead
NO_CPP_KERNEL: frozenset[str] = frozenset(
    {
        "bias_gelu",
        "grn",
        "add_layer_norm",
        "attention",
        "hog_target",
        "fft_loss",
        "low_pass_target",
        "patch_fft_loss",
        "resized_crop",
    }
)
# ops with no fastmim._cuda kernel: "cuda" (chosen or forced) runs their "triton" backend instead
NO_CUDA_KERNEL: frozenset[str] = frozenset(
    {
        "bias_gelu",
        "grn",
        "sparse_dwconv",
        "add_layer_norm",
        "attention",
        "hog_target",
        "fft_loss",
        "low_pass_target",
        "patch_fft_loss",
        "resized_crop",
    }
)

# The auto backend of each op on CUDA tensors, per GPU model (a substring of torch.cuda.get_device_name): whichever
# was faster (forward + backward, plain timing) in the committed GPU results named in AUTO_CUDA_SOURCE; an op not
# listed, or "cuda" without fastmim._cuda, runs Triton. A GPU with no table of its own uses the table of a measured GPU
# of the same architecture (compute capability major), else the first table (auto_cuda_table says which and why).
AUTO_CUDA_SOURCE: dict[str, str] = {
    "H200": "benchmarks/results/2026-12-04-h200-7365249/ops.jsonl (H200, fwd+bwd, plain median timing)",
}
AUTO_CUDA: dict[str, dict[str, str]] = {
    "H200": {
        "gather_visible": "cuda",  # 0.179 ms vs Triton 0.208
        "scatter_masked": "cuda",  # 0.357 ms vs Triton 0.665
        "masked_mse_loss": "cuda",  # 0.220 ms vs Triton 0.471
        "patchify": "triton",  # 0.230 ms vs CUDA 0.699
        "unpatchify": "triton",  # patchify's backward: the same kernels
    },
}
# compute capability of each measured GPU, for the fallback of one that was not measured
AUTO_CUDA_ARCH: dict[str, tuple[int, int]] = {"H200": (9, 0)}


def auto_cuda_table(name: str, capability: tuple[int, int] | None = None) -> tuple[str, dict[str, str], str]:
    """(table key, table, why) of the ``AUTO_CUDA`` table for the GPU named ``name`` (torch.cuda.get_device_name)
    with compute ``capability``: its own table when one was measured, else one of the same architecture, else the
    first."""
    for key, table in AUTO_CUDA.items():
        if key.lower() in name.lower():
            return key, table, f"measured on this GPU model ({AUTO_CUDA_SOURCE[key]})"
    for key, table in AUTO_CUDA.items():
        if capability is not None and AUTO_CUDA_ARCH.get(key, (-1,))[0] == capability[0]:
            return key, table, f"{name} not measured: the {key} table (same architecture, sm_{capability[0]}x)"
    key = next(iter(AUTO_CUDA), "")
    return key, AUTO_CUDA.get(key, {}), f"{name} not measured and no measured GPU of its architecture: the {key} table"


_auto_cuda_by_index: dict[int | None, dict[str, str]] = {}


def _auto_cuda(device: torch.device) -> dict[str, str]:
    table = _auto_cuda_by_index.get(device.index)
    if table is None:
        try:
            name = torch.cuda.get_device_name(device)
            capability = torch.cuda.get_device_capability(device)
        except Exception:  # no driver (CPU tests of the CUDA branch): the first table
            name, capability = "", None
        table = _auto_cuda_by_index[device.index] = auto_cuda_table(name, capability)[1]
    return table


# os.environ's own mapping (bytes on POSIX): reading it skips os.environ's per-call encoding
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, about ten times cheaper on POSIX."""
    if _ENVIRON is not None:
        v = _ENVIRON.get(name.encode())
        return default if v is None else os.fsdecode(v)
    return os.environ.get(name, default)


@functools.cache
def triton_available() -> str | None:
    """None when Triton can be used, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # CPU-only installs without triton
        return f"triton is not installed ({e})"
    return None


def triton_interpreted() -> bool:
    return getenv("TRITON_INTERPRET", "0") == "1"


_override: str | None = None


def _setting_name(fn: str, name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{fn}: expected a name (str) or None, got {type(name).__name__} {name!r}")
    return name.strip().lower()


def set_backend(name: str | None) -> str | None:
    """Forces a backend for every op in this process (``None`` or "auto": back to ``FASTMIM_BACKEND`` / auto);
    returns the previous setting. Takes precedence over ``FASTMIM_BACKEND``.

    Args:
        name: one of cuda, triton, cpp, torch, auto, or None.
    """
    global _override
    if name is not None:
        name = _setting_name("set_backend", name)
        if name == "auto":
            name = None
        elif name not in BACKENDS:
            raise ValueError(f"set_backend: {name!r} is not one of auto, {', '.join(BACKENDS)}")
    prev, _override = _override, name
    return prev


def forced_backend() -> str | None:
    if _override is not None:
        return _override
    name = getenv("FASTMIM_BACKEND").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTMIM_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}")
    return name


def forced_by() -> str:
    """How the forced backend was asked for, for error messages: ``set_backend('x')`` or ``FASTMIM_BACKEND=x``."""
    if _override is not None:
        return f"fastmim.ops.set_backend({_override!r})"
    return f"FASTMIM_BACKEND={forced_backend()}"


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


def _cuda_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors, these are on {device}"
    if not _ext.cuda_available():
        return f"fastmim._cuda is not available ({_ext.cuda_load_error})"
    if device.index not in _cuda_arch_problems:
        _cuda_arch_problems[device.index] = _cuda_arch_problem(device)
    return _cuda_arch_problems[device.index]


_cuda_arch_problems: dict[int | None, str | None] = {}


def _cuda_arch_problem(device: torch.device) -> str | None:
    """Why fastmim._cuda's code cannot run on ``device``'s GPU (built for sm_80 and sm_90, a T4 is sm_75: each launch
    would fail with "no kernel image is available"), or None."""
    archs = getattr(_ext._cuda, "ARCHS", "")
    try:
        capability = torch.cuda.get_device_capability(device)
    except Exception:  # no driver (CPU tests of the CUDA branch): nothing to check against
        return None
    if cuda_archs_run_on(archs, capability) is not False:
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    return (
        f"fastmim._cuda was built for CUDA architectures {archs}, which do not run on this GPU ({sm}); "
        f"rebuild with FASTMIM_CUDA_ARCHS={capability[0]}{capability[1]} for it (its Triton kernels run there)"
    )


def cuda_archs_run_on(archs: str, capability: tuple[int, int]) -> bool | None:
    """Whether code built for CMake's CUDA_ARCHITECTURES ``archs`` ("80-real,90") runs on a GPU of compute
    ``capability``: machine code for sm_XY runs on the same major version with a minor >= Y ("a"-suffixed: only on
    XY itself; "f"-suffixed: on its family, the same major), PTX for compute_XY on any GPU >= XY (the driver compiles
    it). None when ``archs`` is empty or not a list of numbers ("native", "all"): nothing is known."""
    entries = [a.strip() for a in archs.replace(";", ",").split(",") if a.strip()]
    parsed = [re.fullmatch(r"(\d+)([af]?)(-real|-virtual)?", a) for a in entries]
    if not parsed or not all(parsed):
        return None
    cap = capability[0] * 10 + capability[1]
    for m in parsed:
        num, suffix, kind = int(m.group(1)), m.group(2), m.group(3) or ""
        same_family = num // 10 == capability[0]
        if suffix == "a":
            fits = cap == num
        elif suffix == "f":
            fits = same_family and cap >= num
        else:
            real = kind != "-virtual" and same_family and cap >= num
            fits = real or (kind != "-real" and cap >= num)
        if fits:
            return True
    return False


_choices: dict[tuple, str] = {}


def choose_backend(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...], name: str | None = None) -> str:
    """The backend ``op`` runs on for tensors on ``device`` with ``dtypes``.

    Args:
        op: the op's name in the backend tables (NO_CPP_KERNEL, AUTO_CUDA, ...) and in error messages.
        device: where the tensors are.
        dtypes: floating dtypes of the inputs; the kernels take float32, bfloat16 and float16.
        name: the name errors give instead (an op sharing another's kernels: layer_norm, add_layer_norm's).
    """
    forced = forced_backend()
    key = (op, device.type, device.index, dtypes, forced, triton_interpreted())
    backend = _choices.get(key)
    if backend is None:
        try:
            backend = _choose(op, device, dtypes, forced)  # raises for a forced backend that cannot run: not cached
        except RuntimeError as e:
            if name is None or not str(e).startswith(f"{op}: "):
                raise
            raise RuntimeError(f"{name}: {str(e).removeprefix(f'{op}: ')}") from None
        _choices[key] = backend
    return backend


def _choose(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...], forced: str | None) -> str:
    kernel_dtypes = all(dt in KERNEL_DTYPES for dt in dtypes)
    if forced == "torch":
        return "torch"
    if forced is not None:
        if forced == "cpp" and op in NO_CPP_KERNEL and device.type == "cpu":
            return "torch"  # no C++ kernel: its torch backend, which takes every dtype
        if forced == "cuda" and op in NO_CUDA_KERNEL:
            forced = "triton" if device.type == "cuda" else forced
        why = {"triton": triton_problem, "cpp": _cpp_problem, "cuda": _cuda_problem}[forced](device)
        if why is None and not kernel_dtypes:
            why = f"its kernels take float32, bfloat16 and float16, not {', '.join(map(str, dtypes))}"
        if why:
            raise RuntimeError(f"{op}: {forced_by()} cannot run here: {why}")
        return "torch" if forced == "cpp" and op in NO_CPP_KERNEL else forced
    if not kernel_dtypes:
        return "torch"
    if device.type == "cuda":
        if _auto_cuda(device).get(op) == "cuda" and _cuda_problem(device) is None:
            return "cuda"
        if triton_problem(device) is None:
            return "triton"
    if device.type == "cpu" and _cpp_problem(device) is None:
        return "torch" if op in NO_CPP_KERNEL else "cpp"
    return "torch"


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of statistics and accumulation: fp32 for fp32/bf16/fp16 tensors, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def no_autocast(device: torch.device):
    """For a torch backend whose dtypes are explicit: autocast (still on inside a custom op's kernel) must not
    recast."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def is_finite_number(x) -> bool:
    """A finite int or float (not a bool). Also for the symbolic numbers torch.compile traces with dynamic shapes,
    which ``math.isfinite`` does not take: a comparison guards on them instead."""
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.SymInt, torch.SymFloat)):
        return False
    return -math.inf < x < math.inf  # False for NaN


def check_tensor(op: str, name: str, t) -> None:
    """``t`` is a tensor (not a list, an array or None)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def check_tensors(op: str, **tensors) -> None:
    """``check_tensor`` of each argument given; an optional one is passed only when it is not None."""
    for name, t in tensors.items():
        check_tensor(op, name, t)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    check_tensor(op, name, t)
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_ids(op: str, name: str, ids: torch.Tensor, shape: tuple[int | None, ...], device: torch.device) -> None:
    """Shape (None: any size), dtype and device of an index tensor (values are checked where that costs no host
    sync)."""
    check_tensor(op, name, ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: {name} must be int64 (or int32) indices, got {ids.dtype}")
    check_shape(op, name, ids, tuple(shape))
    check_device(op, name, ids, device)


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the other inputs on {device}")


def ids_checked_here(ids: torch.Tensor) -> bool:
    """Whether the values of ``ids`` are checked: on CPU tensors, outside torch.compile's tracing. On CUDA a check
    would cost a host sync every call, so there it runs only with ``FASTMIM_CHECK_IDS=1`` (debugging); otherwise the
    kernels are memory-safe instead (an out-of-range id gives NaN rows, never an out-of-bounds read)."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return False
    return ids.device.type == "cpu" or getenv("FASTMIM_CHECK_IDS", "0") == "1"


def check_id_values(op: str, name: str, ids: torch.Tensor, upper: int, distinct: bool, lower: int = 0) -> None:
    """Range (and, if asked, per-row distinctness) of ``ids`` in [lower, upper), where ``ids_checked_here``."""
    if not ids_checked_here(ids):
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
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


def check_image_grid(op: str, imgs: torch.Tensor, patch_size: int, name: str = "imgs") -> None:
    """H and W of ``imgs`` [B, C, H, W] divisible by ``patch_size``; the error shows how the shape was read (a
    channels-last [B, H, W, C] tensor is the usual cause)."""
    check_tensor(op, name, imgs)
    h, w = imgs.shape[2], imgs.shape[3]
    if h % patch_size or w % patch_size:
        hint = ""
        if imgs.shape[3] in (1, 3, 4) and imgs.shape[1] not in (1, 3, 4):
            hint = f"; if it is channels-last [B, H, W, C], pass {name}.permute(0, 3, 1, 2)"
        raise ValueError(f"{op}: image size {h}x{w} is not divisible by the patch size {patch_size} ({name} read as "
                         f"[B, C, H, W] = {tuple(imgs.shape)}{hint})")  # fmt: skip


def check_patch_size(op: str, patch_size: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{op}: patch_size must be a positive int, got {patch_size!r}")


def eager_function(
    name: str,
    forward: Callable,
    setup_context: Callable,
    backward: Callable,
    graph_backward: Callable,
) -> type:
    """An ``autograd.Function`` for eager calls built from an op's own forward, setup_context and backward.

    Eager calls skip the custom-op dispatcher, and the classic ``forward(ctx, ...)`` form also skips the
    ``inspect.signature`` binding that ``Function.apply`` does for a ``setup_context`` Function; together about
    50 us less per call. ``torch.compile`` traces the registered custom op instead.

    ``backward`` runs the kernels directly. Where the backward must itself be recorded (``create_graph=True``: a
    second derivative, gradgradcheck) ``graph_backward`` runs instead: the registered custom op's backward, which
    autograd records like any op, so a second derivative either works (the backward op has a formula) or raises
    naming the op; never a silently missing term.
    """

    def fwd(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        # the engine runs a backward with grad mode off unless create_graph=True
        return graph_backward(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    # named fastmim_<name> (profiles, grad_fn): a trace or a graph says whose op it is
    return type(f"fastmim{name if name.startswith('_') else '_' + name}", (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})  # fmt: skip


def unaliased(fn: Callable) -> Callable:
    """``fn`` for registering as a custom op: a custom op's outputs may not alias its inputs or each other, while the
    eager backends return views of one buffer (one allocation instead of several); such outputs are cloned here."""

    @functools.wraps(fn)
    def wrapper(*args):
        out = fn(*args)
        if not isinstance(out, tuple):
            return out
        seen = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel()}
        fixed = []
        for t in out:
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            if ptr is not None:
                seen.add(ptr)
            fixed.append(t)
        return tuple(fixed)

    return wrapper


# Inductor may pass these ops inputs in any layout (their kernels read any strides; the C++ path copies): without the
# tag it keeps each input's traced stride order, which can force a copy in front of the op.
FLEXIBLE_LAYOUT = (torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ()


def check_shape(op: str, name: str, t: torch.Tensor | None, shape: tuple[int | None, ...]) -> None:
    """``t`` (skipped when None) has ``shape``, None entries matching any size."""
    if t is None:
        return
    check_tensor(op, name, t)
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [{want}]")


def checked(fn: Callable, check: Callable | None) -> Callable:
    """``fn`` preceded by ``check(*args)``: what a custom op is registered with. A direct call of
    ``torch.ops.fastmim.*`` skips the public function's checks, and the kernels trust the shapes they are given (a
    short index tensor would be read past its end), so each raw op checks the shapes of its own arguments."""
    if check is None:
        return fn

    @functools.wraps(fn)
    def wrapper(*args):
        check(*args)
        return fn(*args)

    return wrapper


def custom_op(name: str, fn: Callable, check: Callable | None = None):
    """``torch.library.custom_op(name, fn, mutates_args=())``, tagged ``flexible_layout`` where torch knows it, with
    ``check`` run first (see ``checked``)."""
    fn = checked(fn, check)
    if FLEXIBLE_LAYOUT:
        try:
            return torch.library.custom_op(name, fn, mutates_args=(), tags=FLEXIBLE_LAYOUT)
        except TypeError:  # a torch whose custom_op takes no tags
            pass
    return torch.library.custom_op(name, fn, mutates_args=())


def no_second_derivative(backward_op, public: str, ref: str) -> None:
    """Differentiating ``backward_op`` (a second derivative of ``public``) raises a RuntimeError that names the op and
    the reference to use, instead of torch's advice to register a formula."""
    name = getattr(backward_op, "_qualname", str(backward_op)).replace("::", ".")

    def refuse(ctx, *grads):
        raise RuntimeError(f"{public} has no second derivative: its backward ({name}) is not differentiable; for "
                           f"create_graph=True or gradgradcheck use fastmim.ops.{ref}, which is")  # fmt: skip

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


# Under torch.compile an op with a Triton twin is traced either as its opaque custom op ("opaque": inductor's code
# calls into fastmim, which picks the backend and launches the kernels) or as the twin ("triton": registered with
# torch.library.triton_op, inductor sees fastmim's Triton kernels in the graph and launches them from its own code, with
# its own buffer planning). benchmarks/ops.py --compiled-fused times both (issue 14, item 4); "auto" (the default)
# takes, per op, the one that measured faster (AUTO_COMPILED; an op not listed stays opaque).
COMPILED_OPS = ("auto", "opaque", "triton")
AUTO_COMPILED_SOURCE = "none yet: no GPU run has timed the twins (benchmarks/gpu_suite.sh, step twins)"
AUTO_COMPILED: dict[str, str] = {}  # op -> "triton" where the twin measured faster under torch.compile
_compiled_override: str | None = None


def set_compiled_ops(name: str | None) -> str | None:
    """How torch.compile sees the ops that have a Triton twin (gather_visible, scatter_masked, the masked losses,
    patchify, unpatchify): "opaque" (custom ops), "triton" (inductor launches their Triton kernels itself), "auto"
    (per op, whichever measured faster: ``AUTO_COMPILED``) or None (back to ``FASTMIM_COMPILED_OPS``, default auto).
    Set it before compiling; returns the previous setting."""
    global _compiled_override
    if name is not None:
        name = _setting_name("set_compiled_ops", name)
        if name not in COMPILED_OPS:
            raise ValueError(f"set_compiled_ops: {name!r} is not one of {', '.join(COMPILED_OPS)}")
    prev, _compiled_override = _compiled_override, name
    return prev


def compiled_ops() -> str:
    if _compiled_override is not None:
        return _compiled_override
    name = getenv("FASTMIM_COMPILED_OPS", "auto").strip().lower() or "auto"
    if name not in COMPILED_OPS:
        raise ValueError(f"FASTMIM_COMPILED_OPS={name!r} is not one of {', '.join(COMPILED_OPS)}")
    return name


def triton_twin(name: str, like: Callable, impl: Callable, check: Callable | None = None):
    """``impl`` (the Triton path of an op, taking the arguments of ``like``, its opaque function) registered with
    ``torch.library.triton_op`` as ``fastmim::<name>``; None where torch has no ``triton_op`` (before 2.6) or Triton is
    absent. ``impl`` must launch its kernels through ``jit_kernel`` kernels, which torch.compile then records."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is None or getattr(torch.library, "wrap_triton", None) is None or triton_available():
        return None

    impl = checked(impl, check)
    # A function without retrievable source: triton_op reads a registered function's source to list the Triton
    # kernels it calls (it finds none here: they are launched further down, through jit_kernel), and that reading
    # imports torch._inductor (and with it torch._dynamo, ~0.75 s) at `import fastmim.ops`.
    scope: dict = {}
    exec(
        compile("def fn(*args):\n    return impl(*args)\n", f"<fastmim twin {name}>", "exec"),
        {"impl": impl, "torch": torch},
        scope,
    )
    fn = scope["fn"]
    fn.__name__, fn.__qualname__, fn.__doc__ = like.__name__, like.__qualname__, like.__doc__
    fn.__module__, fn.__annotations__ = like.__module__, like.__annotations__
    fn.__signature__ = inspect.signature(like)  # the schema is inferred from like's signature
    return triton_op(f"fastmim::{name}", fn, mutates_args=())


def traced_op(op: str, opaque, twin, device: torch.device, dtypes: tuple[torch.dtype, ...]):
    """The op torch.compile traces for ``op`` on tensors on ``device`` with ``dtypes``: the Triton twin when
    ``compiled_ops()`` is "triton" (or "auto" and ``AUTO_COMPILED`` says so for ``op``) and the Triton kernels would
    run there (CUDA tensors of the kernels' dtypes; meta tensors, which tests trace with), else the opaque op (which
    runs the reference for other dtypes, float64 say). A forced backend other than Triton keeps the opaque op, and so
    does the interpreter (its kernels cannot be traced)."""
    mode = compiled_ops()  # read first: a bad FASTMIM_COMPILED_OPS is refused on every device, not only on CUDA
    if twin is None or device.type not in ("cuda", "meta") or triton_interpreted():
        return opaque
    if not all(dt in KERNEL_DTYPES for dt in dtypes):
        return opaque
    if mode == "opaque" or (mode == "auto" and AUTO_COMPILED.get(op) != "triton"):
        return opaque
    return twin if forced_backend() in (None, "triton") else opaque


def use_custom_op() -> bool:
    """True when a call must go through the registered custom op rather than the lower-overhead eager
    ``autograd.Function``: while torch.compile traces, and while a dispatch mode is active (FlopCounterMode,
    FakeTensorMode, ...), so that such modes see ``torch.ops.fastmim.*`` and their registered formulas."""
    if torch.compiler.is_compiling():
        return True
    return _get_current_dispatch_mode() is not None


# torch.func transforms (vmap, grad, jacrev, ...): the public ops run their plain-PyTorch reference under them (the
# kernels read plain tensors' memory, which vmap's batched tensors have none of, and the ops define no functorch
# rules: inside torch they failed with messages about data pointers or setup_context)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would record the call: grad mode is on and an input requires grad. Otherwise the eager
    ops call their forward directly and skip ``autograd.Function.apply`` (about 4 us of host time)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
