"""fastmim.ops.triton._launch: direct launches of compiled Triton kernels.

On CPU: the argument signature separates every launch Triton would compile differently (checked against Triton's
own argument specialisation), and the launcher's bookkeeping (first call through Triton, then direct calls with the
arguments in signature order, back to Triton where it must) with a stand-in for the compiled kernel. On a GPU: the
real direct launches give Triton's results bit for bit.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from fastmim.ops.triton import _launch  # noqa: E402

# ---- the signature ------------------------------------------------------------------------------------------------


def _probe(a):  # a one-parameter kernel for Triton's binder (never compiled)
    pass


def _triton_specialisation():
    """Triton's own specialisation of one launch argument, as its launcher computes it for an sm_90 target."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        pytest.skip(f"this triton has no binder to compare with ({e})")
    jit_fn = JITFunction(_probe)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, make_backend(GPUTarget("cuda", 90, 32)))

    def spec(a):
        _, specialization, _ = binder(a)
        return repr(specialization[0])

    return spec


def _values():
    base = torch.zeros(64)
    ints = [0, 1, 2, 3, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -1, -16, -(2**31), -(2**31) - 1]
    ints += [2**40, 2**40 + 1, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 1]
    tensors = [base, base[1:], base[4:], base[8:]]  # 16-byte aligned, 4-, 16-, 32-byte offsets
    tensors += [t.to(dt) for t in (torch.zeros(32), torch.zeros(32)[1:]) for dt in (torch.bfloat16, torch.float16)]
    tensors += [torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int32)[1:]]
    return ints + tensors + [0.5, 1.0, 2.0, None, True, False]


def test_the_signature_separates_every_launch_triton_specialises_differently():
    spec = _triton_specialisation()
    values = _values()
    keys, passed = _launch.signature(tuple(values))
    specs = [spec(v) for v in values]
    for (ka, sa, va), (kb, sb, vb) in itertools.combinations(zip(keys, specs, values, strict=True), 2):
        if ka == kb:
            assert sa == sb, f"equal keys {ka!r} for {va!r} and {vb!r}, which Triton specialises as {sa} and {sb}"
    # tensors alike in dtype and alignment share a key (the cache is not per buffer), and are passed as addresses
    a, b = torch.zeros(64), torch.zeros(64)
    assert _launch.signature((a,))[0] == _launch.signature((b,))[0] == _launch.signature((torch.nn.Parameter(b),))[0]
    assert passed == [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values]
    assert all(isinstance(k, int | tuple | type(None)) for k in keys)  # no tensor in a key (it hashes by identity)
    if torch.cuda.is_available():  # a CPU tensor never takes a CUDA tensor's direct launch
        assert _launch.signature((a,))[0] != _launch.signature((a.cuda(),))[0]


# ---- the launcher, with a stand-in for Triton's function and compiled kernel ---------------------------------------


class _CudaLike(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what the launcher checks of its tensors without a GPU here."""

    @property
    def is_cuda(self):
        return True


def _cuda_like(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_CudaLike, t)


class _Compiled:
    def __init__(self, log):
        self.function = "cufunction"
        self.packed_metadata = ("packed",)
        self.log = log

    def run(self, *args):  # Triton's launcher: grid, stream, function, metadata, launch metadata, hooks, args
        self.log.append(("direct", args))


class _JitFn:
    """What JitKernel uses of a triton.jit function: fn, arg_names and kernel[grid](...) returning the compiled."""

    def __init__(self):
        def kern(x_ptr, n, BLOCK: int, EVEN: bool = True):  # noqa: N803
            pass

        self.fn = kern
        self.arg_names = ["x_ptr", "n", "BLOCK", "EVEN"]
        self.log = []
        self.compiled = _Compiled(self.log)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(_launch, "DIRECT", True)
    monkeypatch.setattr(_launch, "_triton_state", lambda: ("knobs",))
    monkeypatch.setattr(_launch, "_current_device", lambda: 3)
    monkeypatch.setattr(_launch, "_raw_stream", lambda index: 1000 + index)
    return _launch.JitKernel(_JitFn())


def _kinds(k):
    return [entry[0] for entry in k.jit_fn.log]


def test_a_signature_goes_through_triton_once_then_launches_directly(kernel):
    x = _cuda_like(torch.zeros(64))
    kernel[(5,)](x, 32, BLOCK=128, num_warps=4)
    kernel[(5,)](x, 32, BLOCK=128, num_warps=4)
    kernel[(2, 3)](x, 32, BLOCK=128, num_warps=4)  # another grid
    kernel[(2, 3)](
        _cuda_like(torch.ones(64)), 32, BLOCK=128, num_warps=4
    )  # another buffer, alike in dtype and alignment
    assert _kinds(kernel) == ["triton", "direct", "direct", "direct"]
    _, args = kernel.jit_fn.log[1]
    # grid padded to 3-D, the current device's stream, the compiled function, no launch metadata or hooks, then
    # every parameter in signature order: the positional ones (a tensor as its address), the constexpr keyword, the
    # default of the last
    assert args == (5, 1, 1, 1003, "cufunction", ("packed",), None, None, None, x.data_ptr(), 32, 128, True)
    assert kernel.jit_fn.log[2][1][:3] == (2, 3, 1)


class _OnGpu(_CudaLike):
    """A _CudaLike on GPU 1."""

    def get_device(self):
        return 1


def test_a_launch_on_another_gpu_makes_that_gpu_current_while_it_launches(kernel, monkeypatch):
    entered = []

    class OnDevice:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)
            monkeypatch.setattr(_launch, "_current_device", lambda: self.index)

        def __exit__(self, *exc):
            monkeypatch.setattr(_launch, "_current_device", lambda: 3)

    monkeypatch.setattr(_launch, "_on_device", OnDevice)
    x = torch.Tensor._make_subclass(_OnGpu, torch.zeros(64))
    for _ in range(2):  # through Triton, then directly: both on GPU 1's stream
        kernel[(5,)](x, 32, BLOCK=128)
    assert entered == [1, 1] and _kinds(kernel) == ["triton", "direct"]
    assert kernel.jit_fn.log[1][1][3] == 1001  # GPU 1's stream, not the current GPU 3's
    kernel[(5,)](_cuda_like(torch.zeros(64)), 32, BLOCK=128)  # on the current GPU: no switch
    assert entered == [1, 1]


@pytest.mark.parametrize(
    "change",
    ["n not divisible by 16", "n == 1", "n past int32", "misaligned x", "x dtype", "constexpr", "options", "kw order"],
)
def test_a_launch_triton_would_specialise_differently_goes_through_triton(kernel, change):
    x = _cuda_like(torch.zeros(64))
    call = {"args": (x, 32), "kwargs": {"BLOCK": 128, "num_warps": 4}}
    kernel[(1,)](*call["args"], **call["kwargs"])
    args, kwargs = list(call["args"]), dict(call["kwargs"])
    if change == "n not divisible by 16":
        args[1] = 33
    elif change == "n == 1":
        args[1] = 1
    elif change == "n past int32":
        args[1] = 2**32
    elif change == "misaligned x":
        args[0] = x[1:]
    elif change == "x dtype":
        args[0] = x.half()
    elif change == "constexpr":
        kwargs["BLOCK"] = 256
    elif change == "options":
        kwargs["num_warps"] = 8
    else:
        kwargs = {"num_warps": 4, "BLOCK": 128}
    kernel[(1,)](*args, **kwargs)
    assert _kinds(kernel) == ["triton", "triton"]
    kernel[(1,)](*args, **kwargs)
    assert _kinds(kernel) == ["triton", "triton", "direct"]


def test_triton_keeps_the_launch_when_asked_or_hooked_or_the_grid_is_callable(kernel, monkeypatch):
    x = _cuda_like(torch.zeros(64))
    kernel[(1,)](x, 32, BLOCK=128)
    kernel[lambda meta: (1,)](x, 32, BLOCK=128)
    monkeypatch.setattr(_launch, "_triton_state", lambda: None)  # launch hooks set: a profiler listens
    kernel[(1,)](x, 32, BLOCK=128)
    monkeypatch.setattr(_launch, "_triton_state", lambda: ("knobs",))
    monkeypatch.setattr(_launch, "DIRECT", False)
    kernel[(1,)](x, 32, BLOCK=128)
    monkeypatch.setattr(_launch, "DIRECT", True)
    kernel[(1,)](x, 32, BLOCK=128)
    kernel[(1,)](x, 32, BLOCK=[1])  # unhashable: Triton would reject it; its path says so, not ours
    assert _kinds(kernel) == ["triton", "triton", "triton", "triton", "direct", "triton"]


def test_a_signature_whose_first_direct_launch_is_rejected_goes_back_to_triton(kernel, monkeypatch):
    monkeypatch.setattr(_launch, "_warned", False)
    x = _cuda_like(torch.zeros(64))
    calls = []

    def rejects(*args):
        calls.append(args)
        raise TypeError("function takes exactly 12 arguments (13 given)")

    kernel.jit_fn.compiled.run = rejects
    kernel[(1,)](x, 32, BLOCK=128)  # through Triton: the entry holds the rejecting launcher
    with pytest.warns(RuntimeWarning, match="rejected a direct launch of kern.*TypeError"):
        kernel[(1,)](x, 32, BLOCK=128)  # rejected (nothing ran), then through Triton
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel[(1,)](x, 32, BLOCK=128)  # no second try, no second warning
        kernel[(1,)](x, 33, BLOCK=128)  # another signature: through Triton first,
        kernel[(1,)](x, 33, BLOCK=128)  # then its direct try fails too, quietly
    assert _kinds(kernel) == ["triton"] * 5 and len(calls) == 2
    assert _launch.DIRECT is True  # the other signatures and kernels keep their direct launches


def test_a_launch_error_after_a_good_launch_is_raised_not_retried(kernel):
    x = _cuda_like(torch.zeros(64))
    kernel[(1,)](x, 32, BLOCK=128)
    kernel[(1,)](x, 32, BLOCK=128)  # direct: the entry is known good

    def fails(*args):
        raise ValueError("a launch failure after the arguments were taken")

    next(iter(kernel._cache.values())).run = fails
    with pytest.raises(ValueError, match="after the arguments"):
        kernel[(1,)](x, 32, BLOCK=128)
    assert _kinds(kernel) == ["triton", "direct"]  # not launched a second time through Triton


def test_cpu_tensors_keyword_tensors_and_containers_stay_on_tritons_path(kernel):
    cpu = torch.zeros(64)  # the stand-in fixture has no CUDA: every tensor here is a CPU one
    for _ in range(2):
        kernel[(1,)](cpu, 32, BLOCK=128)
    assert _kinds(kernel) == ["triton", "triton"]
    assert list(kernel._cache.values()) == [_launch._VIA_TRITON]


@pytest.mark.parametrize("what", ["keyword tensor", "tuple"])
def test_arguments_not_keyed_by_their_specialisation_are_not_cached(monkeypatch, what):
    monkeypatch.setattr(_launch, "_triton_state", lambda: ())
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    k = _launch.JitKernel(_JitFn())
    t = _cuda_like(torch.zeros(4))
    for _ in range(2):
        if what == "keyword tensor":
            k[(1,)](1234, 32, BLOCK=128, EVEN=t)
        else:
            k[(1,)](1234, (32, 1), BLOCK=128)
    assert _kinds(k) == ["triton", "triton"] and not k._cache


def test_changing_a_triton_setting_goes_through_triton_again(kernel, monkeypatch):
    x = _cuda_like(torch.zeros(64))
    kernel[(1,)](x, 32, BLOCK=128)
    kernel[(1,)](x, 32, BLOCK=128)
    monkeypatch.setattr(_launch, "_triton_state", lambda: ("debug on",))
    kernel[(1,)](x, 32, BLOCK=128)
    kernel[(1,)](x, 32, BLOCK=128)
    kernel.jit_fn.pre_run_hooks = [print]
    kernel[(1,)](x, 32, BLOCK=128)
    assert _kinds(kernel) == ["triton", "direct", "triton", "direct", "triton"]


def test_the_triton_state_reads_the_settings_tritons_cache_key_reads(monkeypatch):
    knobs = pytest.importorskip("triton.knobs", reason="this triton has no knobs module")
    assert _launch._triton_state() is not None  # no launch hooks here
    before = _launch._triton_state()
    monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    assert _launch._triton_state() != before
    monkeypatch.undo()

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert _launch._triton_state() is None
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert _launch._triton_state() == before


def test_the_cache_is_bounded(kernel, monkeypatch):
    monkeypatch.setattr(_launch, "MAX_SIGNATURES", 4)
    x = _cuda_like(torch.zeros(64))
    for block in range(10):
        kernel[(1,)](x, 32, BLOCK=block)
    assert 1 <= len(kernel._cache) <= 4


def test_kernels_are_wrapped_exactly_when_they_can_launch_directly():
    from fastmim.ops._dispatch import triton_interpreted
    from fastmim.ops.triton import tokens

    wrapped = isinstance(tokens._gather_rows_kernel, _launch.JitKernel)
    assert wrapped is not triton_interpreted()
    if wrapped:
        assert isinstance(tokens._gather_rows_kernel.jit_fn, triton.runtime.jit.JITFunction)


# ---- on a GPU: the real thing -------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_direct_launches_give_tritons_results_on_a_gpu(monkeypatch):
    from fastmim.masking import random_masking
    from fastmim.ops import add_layer_norm, gather_visible, masked_mse_loss, patchify, scatter_masked, set_backend
    from fastmim.ops.triton import layer_norm, tokens

    if not isinstance(tokens._gather_rows_kernel, _launch.JitKernel):
        pytest.skip("Triton's interpreter is on (TRITON_INTERPRET=1): no compiled kernels to launch")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    b, n, d = 4, 196, 192
    info = random_masking(b, n, 0.75, device=dev, generator=g)
    x = torch.randn(b, n, d, device=dev, generator=g, requires_grad=True)
    mt = torch.randn(d, device=dev, generator=g, requires_grad=True)
    imgs = torch.randn(b, 3, 224, 224, device=dev, generator=g)
    pred = torch.randn(b, n, 768, device=dev, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d, device=dev, generator=g, requires_grad=True)

    def step():
        xv = gather_visible(x, info.ids_keep)
        full = scatter_masked(xv, info.ids_restore, mt)
        y, _ = add_layer_norm(full, full, w, mt)
        loss = masked_mse_loss(pred, imgs, info.mask, 16, norm_pix=True) + y.float().square().mean()
        grads = torch.autograd.grad(loss, [x, mt, pred, w])
        return [loss.detach(), patchify(imgs, 16), *grads]

    prev = set_backend("triton")
    try:
        monkeypatch.setattr(_launch, "DIRECT", False)
        want = step()
        monkeypatch.setattr(_launch, "DIRECT", True)
        for _ in range(3):  # the first call fills the caches, the others launch directly
            got = step()
            torch.cuda.synchronize()
            for expected, out in zip(want, got, strict=True):
                assert torch.equal(expected, out)
    finally:
        set_backend(prev)
    assert tokens._gather_rows_kernel._cache and tokens._scatter_masked_bwd_kernel._cache
    assert layer_norm._add_ln_bwd_kernel._cache
    entries = [e for k in (tokens._gather_rows_kernel, layer_norm._add_ln_bwd_kernel) for e in k._cache.values()]
    assert entries and all(e is not _launch._VIA_TRITON and e.verified for e in entries), "a direct launch failed"
