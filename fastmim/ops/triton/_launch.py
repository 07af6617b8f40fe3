"""Launching fastmim's Triton kernels with less host time.

``kernel[grid](*args, **kwargs)`` on a ``triton.jit`` function does, every call: build an options dict, bind and
specialise every argument, turn the options into a string for the cache key, query the current device and stream
through Triton's driver, build a launch-metadata dict and call the (empty) enter and exit launch hooks from C. At the
sub-millisecond sizes of the token ops that host time is the op's time (benchmarks/notes/gpu-kernels.md).

``@jit_kernel`` instead of ``@triton.jit`` keeps the call syntax. The first call with a given argument signature goes
through Triton (which compiles or finds the kernel, launches it and returns the compiled kernel); later calls with
the same signature launch that compiled kernel directly on the current stream. The signature holds everything
Triton specialises a kernel on (see ``signature``: each tensor's dtype and 16-byte alignment, each int's value) and
the keyword arguments (constexprs and launch options), so a direct launch runs exactly the kernel Triton would have
chosen.

Triton's own path is taken when its launch hooks are set (a profiler such as proton is listening), under the
interpreter (``TRITON_INTERPRET=1``: ``jit_kernel`` returns the interpreted function itself), with a callable grid,
or with ``FASTMIM_TRITON_LAUNCH=jit`` (for comparison, benchmarks/host_overhead.py). If the direct call is rejected
by the launcher before anything runs (an argument it cannot parse: a Triton whose launcher changed), fastmim warns
once and goes back to Triton's path for good.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import triton

from fastmim.ops._dispatch import getenv

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton keeps the hooks elsewhere
    _knobs = None

# False: every launch through Triton's own path (FASTMIM_TRITON_LAUNCH=jit, or after a rejected direct call)
DIRECT = getenv("FASTMIM_TRITON_LAUNCH", "direct").strip().lower() != "jit"
MAX_SIGNATURES = 256  # per kernel; the cache starts over past this (shapes that never repeat)

_Tensor = torch.Tensor


def signature(args: tuple) -> tuple[list, list]:
    """(key, values) of a launch's positional arguments. The key holds everything Triton specialises a kernel on, and
    more: each int's value (Triton: its width class, divisibility by 16, equality to 1), each tensor's dtype and
    16-byte alignment (Triton: the same), type and value of anything else (floats and bools by type too, so that 1,
    1.0 and True differ). The values are the arguments with each tensor replaced by its address, which Triton's
    launcher takes as it is (for a tensor it calls data_ptr() and asks the CUDA driver whether the address is device
    memory: a driver call per tensor). A CPU tensor's key differs from a CUDA tensor's, so it takes Triton's path,
    whose check rejects it."""
    key = []
    values = []
    for a in args:
        t = type(a)
        if t is int:
            key.append(a)
            values.append(a)
        elif t is _Tensor or isinstance(a, _Tensor):
            ptr = a.data_ptr()
            key.append((a.dtype, (ptr & 15) == 0, a.is_cuda))  # a CPU tensor: Triton's path, which rejects it
            values.append(ptr)
        else:
            key.append((t, a))
            values.append(a)
    return key, values


def _hooks_set() -> bool:
    """True when Triton's launch enter/exit hooks would call something (profilers hook in there)."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # a HookChain with no calls is empty
            return True
    return False


# the current device's index and the handle of a device's current stream, without building torch objects (a direct
# launch only follows a first launch through Triton, so CUDA is initialised by then)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


class _Entry:
    __slots__ = ("run", "function", "packed", "tail")

    def __init__(self, compiled, tail: tuple):
        self.run = compiled.run  # Triton's launcher for this compiled kernel (its handles are loaded by now)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail  # (name, default) of the parameters after the positional ones, in signature order


class JitKernel:
    """A ``triton.jit`` kernel launched as ``kernel[grid](*args, **kwargs)``, with cached direct launches (see the
    module docstring). ``jit_fn`` is the Triton function (for ``triton.compile`` and the like)."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self.fn = jit_fn.fn
        self.arg_names = jit_fn.arg_names
        self._defaults = _param_defaults(jit_fn.fn)
        self._cache: dict = {}
        self.__name__ = self.fn.__name__
        self.__doc__ = jit_fn.__doc__

    def __repr__(self) -> str:
        return f"JitKernel({self.__name__})"

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        if not DIRECT or type(grid) is not tuple or _hooks_set():
            return self.jit_fn[grid](*args, **kwargs)
        dev = _current_device()
        key, full = signature(args)
        key.append(dev)
        key.extend(kwargs.items())
        try:
            key = tuple(key)
            entry = self._cache.get(key)
        except TypeError:  # an unhashable argument: Triton's path
            return self.jit_fn[grid](*args, **kwargs)
        if entry is None:
            return self._first(key, grid, args, kwargs)
        g = grid + (1, 1) if len(grid) == 1 else grid + (1,) if len(grid) == 2 else grid
        for n, d in entry.tail:
            full.append(kwargs.get(n, d))
        try:
            entry.run(g[0], g[1], g[2], _raw_stream(dev), entry.function, entry.packed, None, None, None, *full)
        except (TypeError, ValueError, SystemError) as e:  # rejected while parsing the arguments: nothing ran
            _give_up(self, e)
            return self.jit_fn[grid](*args, **kwargs)
        return None

    def _first(self, key, grid, args: tuple, kwargs: dict):
        compiled = self.jit_fn[grid](*args, **kwargs)  # compiles if needed, launches, returns the compiled kernel
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return compiled  # a Triton whose run() returns something else: stay on its path for this signature
        tail = tuple((n, self._defaults.get(n)) for n in self.arg_names[len(args) :])
        missing = [n for n, _ in tail if n not in kwargs and n not in self._defaults]
        if missing:  # Triton raised already if so; kept as a guard
            return compiled
        if len(self._cache) >= MAX_SIGNATURES:
            self._cache.clear()
        self._cache[key] = _Entry(compiled, tail)
        return compiled


def _param_defaults(fn) -> dict:
    params = inspect.signature(fn).parameters.items()
    return {name: p.default for name, p in params if p.default is not inspect.Parameter.empty}


def _give_up(kernel: JitKernel, err: Exception) -> None:
    global DIRECT
    DIRECT = False
    warnings.warn(
        f"fastmim: launching the Triton kernel {kernel.__name__} directly failed ({type(err).__name__}: {err}); "
        "every Triton kernel now launches through triton's own path (set FASTMIM_TRITON_LAUNCH=jit to skip the "
        "attempt)",
        RuntimeWarning,
        stacklevel=3,
    )


def jit_kernel(fn=None, **jit_kwargs):
    """``triton.jit`` for a kernel that is launched from Python (not one called from other kernels): the same
    ``kernel[grid](...)`` call, with cached direct launches on GPUs. Under Triton's interpreter it is ``triton.jit``
    itself."""
    if fn is None:
        return lambda f: jit_kernel(f, **jit_kwargs)
    jit_fn = triton.jit(fn, **jit_kwargs)
    if not isinstance(jit_fn, triton.runtime.jit.JITFunction):
        return jit_fn  # the interpreter's function
    return JitKernel(jit_fn)
