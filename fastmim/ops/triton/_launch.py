"""Launching fastmim's Triton kernels with less host time.

``kernel[grid](*args, **kwargs)`` on a ``triton.jit`` function does, every call: build an options dict, bind and
specialise every argument, turn the options into a string for the cache key, query the current device and stream
through Triton's driver, build a launch-metadata dict and call the (empty) enter and exit launch hooks from C. At the
sub-millisecond sizes of the token ops that host time is the op's time (benchmarks/notes/gpu-kernels.md).

``@jit_kernel`` instead of ``@triton.jit`` keeps the call syntax. The first call with a given argument signature goes
through Triton (which compiles or finds the kernel, launches it and returns the compiled kernel); later calls with
the same signature launch that compiled kernel directly on the current stream. The signature holds everything Triton
specialises a kernel on (see ``signature``: each tensor's dtype and 16-byte alignment, each int's value), the keyword
arguments (constexprs and launch options), the current device and the Triton settings its own cache key reads (debug,
instrumentation, an arch override, fp fusion), so a direct launch runs exactly the kernel Triton would have chosen.
A launch whose first tensor is on a GPU other than the current one makes that GPU current while it launches (Triton
itself launches on the current device).

Triton's own path is taken when its launch hooks or the kernel's pre-run hooks are set (a profiler such as proton
is listening), under the
interpreter (``TRITON_INTERPRET=1``: ``jit_kernel`` returns the interpreted function itself), with a callable grid,
or with ``FASTMIM_TRITON_LAUNCH=jit`` (for comparison, benchmarks/host_overhead.py). Tensors that torch.compile
traces with (fake or functional tensors, inside an op registered with ``torch.library.triton_op``) launch through
``torch.library.wrap_triton``, which records the launch in the graph for inductor to run. If a signature's first direct
call is rejected by the launcher before anything runs (an argument it cannot parse: a Triton whose launcher changed),
fastmim warns once and launches that signature through Triton from then on. CPU tensors (under the interpreter the
kernels are not wrapped at all) always take Triton's path, whose launcher rejects them with a clear error.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from fastmim.ops._dispatch import getenv

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton keeps the hooks elsewhere
    _knobs = None

# False: every launch through Triton's own path (FASTMIM_TRITON_LAUNCH=jit)
DIRECT = getenv("FASTMIM_TRITON_LAUNCH", "direct").strip().lower() != "jit"
MAX_SIGNATURES = 256  # per kernel; the cache starts over past this (shapes that never repeat)

_Tensor = torch.Tensor
# the tensors torch.compile traces an op with: a kernel launch on them is recorded (``wrap_triton``), not run
_TRACED = (FakeTensor, FunctionalTensor)


def traced(args: tuple) -> bool:
    """True when an argument is a tensor torch.compile traces with (fake or functional)."""
    return any(isinstance(a, _TRACED) for a in args)


def signature(args: tuple) -> tuple[list, list]:
    """(key, values) of a launch's positional arguments. The key holds everything Triton specialises a kernel on, and
    more: each int's value (Triton: its width class, divisibility by 16, equality to 1), each tensor's dtype and
    16-byte alignment (Triton: the same), type and value of anything else (floats and bools by type too, so that 1,
    1.0 and True differ). The values are the arguments with each tensor replaced by its address, which Triton's
    launcher takes as it is (for a tensor it calls data_ptr() and asks the CUDA driver whether the address is device
    memory: a driver call per tensor). A CPU tensor's key differs from a CUDA tensor's, so it takes Triton's path,
    whose check rejects it. (None, None) when a tensor is one torch.compile traces with (see ``traced``) or a meta
    tensor."""
    key = []
    values = []
    for a in args:
        t = type(a)
        if t is int:
            key.append(a)
            values.append(a)
        elif t is _Tensor or isinstance(a, _Tensor):
            if t is not _Tensor and isinstance(a, _TRACED):
                return None, None  # torch.compile is tracing: no memory to launch on
            ptr = a.data_ptr()
            if not ptr and a.is_meta:
                return None, None  # a meta tensor (a shape-only run): nothing to compute
            key.append((a.dtype, (ptr & 15) == 0, a.is_cuda))  # a CPU tensor: Triton's path, which rejects it
            values.append(ptr)
        else:
            key.append((t, a))
            values.append(a)
    return key, values


# Triton settings its own kernel cache key reads from the environment or the knobs (debug, instrumentation, an arch
# override, fp fusion, a stage-inspection hook): part of the signature, so changing one after a launch is seen
_KNOB_READS = [
    (group, name)
    for group, name in (
        (getattr(_knobs, "runtime", None), "debug"),
        (getattr(_knobs, "compilation", None), "instrumentation_mode"),
        (getattr(_knobs, "runtime", None), "override_arch"),
        (getattr(_knobs, "language", None), "default_fp_fusion"),
        (getattr(_knobs, "runtime", None), "add_stages_inspection_hook"),
    )
    if group is not None and hasattr(group, name)
]


def _triton_state():
    """None when launches must go through Triton's own path (its launch hooks call something: a profiler such as
    proton listens); else the values of the Triton settings in ``_KNOB_READS``."""
    if _knobs is None:
        return ()
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # a HookChain with no calls is empty
            return None
    if len(_KNOB_READS) == 5:  # Triton 3.6 to 3.8: read directly (a third of the generic loop's time)
        return (rt.debug, _knobs.compilation.instrumentation_mode, rt.override_arch, _knobs.language.default_fp_fusion,
                rt.add_stages_inspection_hook)  # fmt: skip
    return tuple([getattr(group, name) for group, name in _KNOB_READS])


# the current device's index and the handle of a device's current stream, without building torch objects (a direct
# launch only follows a first launch through Triton, so CUDA is initialised by then)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)

_on_device = torch.cuda.device


def _device_of(args: tuple) -> int:
    """The GPU index of the first tensor argument (-1: a CPU, meta or traced tensor, or no tensor)."""
    for a in args:
        if isinstance(a, _Tensor):
            return -1 if isinstance(a, _TRACED) or not a.is_cuda else a.get_device()
    return -1


# a signature that always launches through Triton (CPU tensors, whose check only Triton's launcher makes; a direct
# launch the launcher rejected)
_VIA_TRITON = object()


class _Entry:
    __slots__ = ("compiled", "run", "function", "packed", "tail", "verified")

    def __init__(self, compiled, tail: tuple):
        self.compiled = compiled  # kept alive: Triton 3.8 unloads a compiled kernel's module when it is collected
        self.run = compiled.run  # Triton's launcher for this compiled kernel (its handles are loaded by now)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail  # (name, default) of the parameters after the positional ones, in signature order
        self.verified = False  # True once a direct launch went through


class JitKernel:
    """A ``triton.jit`` kernel launched as ``kernel[grid](*args, **kwargs)``, with cached direct launches (see the
    module docstring). ``jit_fn`` is the Triton function (for ``triton.compile`` and the like). A direct launch
    returns None (Triton's path returns the compiled kernel)."""

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
        # Triton launches on the current device; tensors on another GPU (a library call without set_device) make
        # theirs current for the launch, as torch's own ops do
        dev = _device_of(args)
        if dev < 0:
            return self._launch(grid, args, kwargs, None)
        current = _current_device()
        if dev != current:
            with _on_device(dev):
                return self._launch(grid, args, kwargs, dev)
        return self._launch(grid, args, kwargs, current)

    def _launch(self, grid, args: tuple, kwargs: dict, current: int | None):
        """``current``: the current device's index, when the caller has it."""
        if not DIRECT or type(grid) is not tuple or getattr(self.jit_fn, "pre_run_hooks", None):
            return self.via_triton(grid, args, kwargs)
        state = _triton_state()
        if state is None:
            return self.via_triton(grid, args, kwargs)
        key, full = signature(args)
        if key is None:
            return self.via_triton(grid, args, kwargs)
        dev = _current_device() if current is None else current
        key.append(dev)
        key.append(state)
        key.extend(kwargs.items())
        try:
            key = tuple(key)
            entry = self._cache.get(key)
        except TypeError:  # an unhashable argument: Triton's path
            return self.jit_fn[grid](*args, **kwargs)
        if entry is None:
            return self._first(key, grid, args, kwargs)
        if entry is _VIA_TRITON:
            return self.jit_fn[grid](*args, **kwargs)
        g = grid + (1, 1) if len(grid) == 1 else grid + (1,) if len(grid) == 2 else grid
        for n, d in entry.tail:
            full.append(kwargs.get(n, d))
        if entry.verified:
            entry.run(g[0], g[1], g[2], _raw_stream(dev), entry.function, entry.packed, None, None, None, *full)
            return None
        try:
            entry.run(g[0], g[1], g[2], _raw_stream(dev), entry.function, entry.packed, None, None, None, *full)
        except (TypeError, ValueError, SystemError) as e:  # rejected while parsing the arguments: nothing ran
            self._cache[key] = _VIA_TRITON
            _warn_rejected(self, e)
            return self.jit_fn[grid](*args, **kwargs)
        entry.verified = True
        return None

    def via_triton(self, grid, args: tuple, kwargs: dict):
        """Triton's own launch path (recorded for inductor when torch.compile traces: see ``traced``; nothing for
        meta tensors, which have no data: a shape-only run, as under a dispatch mode with meta inputs)."""
        if traced(args):
            return _wrap_triton(self.jit_fn)[grid](*args, **kwargs)
        if any(isinstance(a, _Tensor) and a.is_meta for a in args):
            return None
        return self.jit_fn[grid](*args, **kwargs)

    def _first(self, key, grid, args: tuple, kwargs: dict):
        compiled = self.jit_fn[grid](*args, **kwargs)  # compiles if needed, launches, returns the compiled kernel
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return compiled  # a Triton whose run() returns something else: stay on its path
        containers = (torch.Tensor, tuple, list)
        if any(isinstance(v, containers) for v in kwargs.values()) or any(isinstance(a, (tuple, list)) for a in args):
            return compiled  # a tensor in a keyword or a container: not keyed by what Triton specialises on
        tail = tuple((n, self._defaults.get(n)) for n in self.arg_names[len(args) :])
        if any(n not in kwargs and n not in self._defaults for n, _ in tail):
            return compiled  # Triton raised already if so; kept as a guard
        if len(self._cache) >= MAX_SIGNATURES:
            self._cache.clear()
        on_cpu = any(isinstance(a, torch.Tensor) and not a.is_cuda for a in args)
        self._cache[key] = _VIA_TRITON if on_cpu else _Entry(compiled, tail)
        return compiled


def _wrap_triton(jit_fn):
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None:
        raise RuntimeError(f"fastmim: {jit_fn.fn.__name__} is being traced, and this torch has no wrap_triton (2.6+)")
    return wrap(jit_fn)


def _param_defaults(fn) -> dict:
    params = inspect.signature(fn).parameters.items()
    return {name: p.default for name, p in params if p.default is not inspect.Parameter.empty}


_warned = False


def _warn_rejected(kernel: JitKernel, err: Exception) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fastmim: Triton's launcher rejected a direct launch of {kernel.__name__} ({type(err).__name__}: {err}); "
        "that signature launches through triton's own path from now on (FASTMIM_TRITON_LAUNCH=jit: every launch)",
        RuntimeWarning,
        stacklevel=4,
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
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return jit_fn  # *args parameters: the arguments cannot be laid out by name here
    return JitKernel(jit_fn)
