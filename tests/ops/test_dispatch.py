"""Backend choice: forcing (environment and set_backend), its precedence, clear errors, and the auto table."""

from __future__ import annotations

import pytest
import torch

from fastmim import ops
from fastmim.ops import _dispatch
from fastmim.ops._dispatch import choose_backend, forced_backend, getenv, set_backend


@pytest.fixture(autouse=True)
def _no_override():
    """No forced backend, and an empty choice cache before and after (tests here patch what the choice reads)."""
    prev = set_backend(None)
    _dispatch._choices.clear()
    yield
    _dispatch._choices.clear()
    set_backend(prev)


def test_set_backend_takes_precedence_over_the_environment_and_auto_resets(monkeypatch):
    monkeypatch.setenv("FASTMIM_BACKEND", "cpp")
    assert forced_backend() == "cpp"
    assert set_backend("torch") is None
    assert forced_backend() == "torch"
    assert choose_backend("gather_visible", torch.device("cpu"), (torch.float32,)) == "torch"
    assert set_backend("auto") == "torch"
    assert forced_backend() == "cpp"  # back to the environment
    with pytest.raises(ValueError, match="'gpu' is not one of auto, cuda, triton, cpp, torch"):
        set_backend("gpu")


def test_environment_changes_are_seen_despite_the_cache(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv("FASTMIM_BACKEND", "torch")
    assert choose_backend("patchify", dev, (torch.float32,)) == "torch"
    monkeypatch.setenv("FASTMIM_BACKEND", "auto")
    assert choose_backend("patchify", dev, (torch.float32,)) == ("cpp" if ops._dispatch._ext.available() else "torch")
    monkeypatch.setenv("FASTMIM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTMIM_BACKEND='nonsense'"):
        choose_backend("patchify", dev, (torch.float32,))


def test_the_backend_setting_is_read_in_any_case_and_spacing(monkeypatch):
    dev = torch.device("cpu")
    for said in (" Torch ", "TORCH", "torch\n"):
        monkeypatch.setenv("FASTMIM_BACKEND", said)
        assert forced_backend() == "torch"
        assert choose_backend("patchify", dev, (torch.float32,)) == "torch"
    monkeypatch.setenv("FASTMIM_BACKEND", " AUTO")
    assert forced_backend() is None


def test_a_triton_choice_on_cpu_is_not_kept_once_the_interpreter_is_off(monkeypatch):
    """Triton runs CPU tensors only in its interpreter: a choice cached while TRITON_INTERPRET=1 must not be
    returned after it is unset (the cache key holds the interpreter's setting)."""
    if _dispatch.triton_available() is not None:
        pytest.skip(f"Triton is not usable here: {_dispatch.triton_available()}")
    dev = torch.device("cpu")
    monkeypatch.setenv("FASTMIM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("patchify", dev, (torch.float32,)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_backend("patchify", dev, (torch.float32,))


def test_getenv_matches_os_environ(monkeypatch):
    monkeypatch.setenv("FASTMIM_TEST_VAR", "välue")
    assert getenv("FASTMIM_TEST_VAR") == "välue"
    monkeypatch.delenv("FASTMIM_TEST_VAR")
    assert getenv("FASTMIM_TEST_VAR", "x") == "x"


def test_auto_on_cuda_follows_the_table_and_falls_back_to_triton(monkeypatch):
    """Without a GPU the CUDA branch of the choice still runs: torch.device('cuda') needs no driver."""
    dev = torch.device("cuda")
    monkeypatch.setattr(_dispatch, "triton_problem", lambda device: None)
    monkeypatch.setattr(_dispatch._ext, "_cuda", object())
    first = next(iter(_dispatch.AUTO_CUDA.values()))  # no driver here: the first table
    assert choose_backend("masked_mse_loss", dev, (torch.bfloat16, torch.float32)) == first.get(
        "masked_mse_loss", "triton"
    )
    assert choose_backend("grn", dev, (torch.float32,)) == "triton"  # no CUDA kernel, not in the table
    monkeypatch.setattr(_dispatch._ext, "_cuda", None)  # not built: Triton
    _dispatch._choices.clear()
    assert choose_backend("masked_mse_loss", dev, (torch.bfloat16,)) == "triton"
    monkeypatch.setenv("FASTMIM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTMIM_BACKEND=cuda cannot run here: fastmim._cuda is not available"):
        choose_backend("masked_mse_loss", dev, (torch.bfloat16,))


def test_forced_cuda_runs_triton_for_ops_without_a_cuda_kernel(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_problem", lambda device: None)
    monkeypatch.setenv("FASTMIM_BACKEND", "cuda")
    assert choose_backend("grn", torch.device("cuda"), (torch.float32,)) == "triton"
    assert choose_backend("sparse_dwconv", torch.device("cuda"), (torch.float32,)) == "triton"


def test_auto_cuda_table_per_gpu_model(monkeypatch):
    """The auto choice on CUDA reads the table of the GPU model, else one of the same architecture, else the first;
    two GPUs of different models in one process each get their own."""
    tables = {"H200": {"masked_mse_loss": "cuda"}, "A100": {"masked_mse_loss": "triton"}}
    monkeypatch.setattr(_dispatch, "AUTO_CUDA", tables)
    monkeypatch.setattr(_dispatch, "AUTO_CUDA_ARCH", {"H200": (9, 0), "A100": (8, 0)})
    monkeypatch.setattr(_dispatch, "AUTO_CUDA_SOURCE", {"H200": "h200.jsonl", "A100": "a100.jsonl"})
    key, table, why = _dispatch.auto_cuda_table("NVIDIA H200", (9, 0))
    assert (key, table) == ("H200", tables["H200"]) and "h200.jsonl" in why
    assert _dispatch.auto_cuda_table("NVIDIA A100-SXM4-80GB", (8, 0))[0] == "A100"
    key, _, why = _dispatch.auto_cuda_table("NVIDIA H100 80GB HBM3", (9, 0))
    assert key == "H200" and "H100" in why and "same architecture" in why
    assert _dispatch.auto_cuda_table("NVIDIA A10G", (8, 6))[0] == "A100"  # sm_8x
    key, _, why = _dispatch.auto_cuda_table("NVIDIA B200", (10, 0))
    assert key == "H200" and "no measured GPU of its architecture" in why

    names = {0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA A100-SXM4-80GB", (8, 0))}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: names[torch.device(d).index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: names[torch.device(d).index][1])
    monkeypatch.setattr(_dispatch, "_auto_cuda_by_index", {})
    monkeypatch.setattr(_dispatch, "_cuda_arch_problems", {})
    monkeypatch.setattr(_dispatch, "triton_problem", lambda device: None)
    monkeypatch.setattr(_dispatch._ext, "_cuda", object())
    _dispatch._choices.clear()
    assert choose_backend("masked_mse_loss", torch.device("cuda", 0), (torch.bfloat16,)) == "cuda"
    assert choose_backend("masked_mse_loss", torch.device("cuda", 1), (torch.bfloat16,)) == "triton"
    _dispatch._choices.clear()


def test_importing_the_ops_does_not_load_the_compiler():
    """``import fastmim.ops`` (into someone else's training code) registers the custom ops and their Triton twins
    without importing torch._dynamo / torch._inductor (~0.75 s): those load when torch.compile is first used."""
    import subprocess
    import sys

    code = "import sys, fastmim.ops; print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    # nor the rest of fastmim (the models): only the ops, the extensions and the helpers they share
    code = ("import sys, fastmim.ops; print(sorted(m for m in sys.modules if m.startswith('fastmim.') and not "
            "m.startswith(('fastmim.ops', 'fastmim._'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    code = "import fastmim; from fastmim import create_model; print(create_model is fastmim.create_model)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True", out.stderr
    # the README's fastmim.eval.load_encoder(RUN) after a plain `import fastmim` (an AttributeError before), loaded on
    # that first use
    code = ("import sys, fastmim; before = 'fastmim.eval' in sys.modules; print(before, fastmim.eval.load_encoder."
            "__name__, fastmim.masking.__name__, hasattr(fastmim, 'nothing'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "load_encoder", "fastmim.masking", "False"], out.stdout + out.stderr
    code = "import torch, fastmim.ops; print(torch.ops.fastmim.gather_visible_triton.default._schema)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "has no attribute" not in out.stderr:  # (no twins where triton is absent)
        assert "fastmim::gather_visible_triton(Tensor x, Tensor ids_keep) -> Tensor" in out.stdout, out.stderr


def test_forced_cpp_runs_the_torch_backend_of_an_op_without_a_cpp_kernel_for_any_dtype(monkeypatch):
    monkeypatch.setenv("FASTMIM_BACKEND", "cpp")
    _dispatch._choices.clear()
    assert choose_backend("hog_target", torch.device("cpu"), (torch.float64,)) == "torch"
    imgs = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    got, want = ops.hog_target(imgs, mask), ops.hog_target(imgs.float(), mask)
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-4)


def test_a_backend_forced_by_set_backend_is_named_so_when_it_cannot_run():
    previous = ops.set_backend("cuda")
    try:
        with pytest.raises(RuntimeError, match=r"fastmim.ops.set_backend\('cuda'\) cannot run here"):
            ops.gather_visible(torch.randn(1, 4, 2), torch.tensor([[0, 1]]))
    finally:
        ops.set_backend(previous)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, "all visible"])
def test_a_mask_that_does_not_sum_to_a_positive_number_is_named(bad, backend):
    """The same message from every backend that can check it (CPU tensors; on CUDA the loss is NaN)."""
    device, _ = backend
    mask = torch.zeros(1, 4) if bad == "all visible" else torch.tensor([[1.0, bad, 0.0, 0.0]])  # -1: sums to 0
    args = (torch.randn(1, 4, 48, device=device), torch.randn(1, 3, 8, 8, device=device), mask.to(device), 4)
    if device.type == "cuda":  # no host sync for a check: a NaN loss, which the trainer's NaN check stops at
        assert not ops.masked_mse_loss(*args).isfinite()  # 0 / 0, or a weighted sum / 0
    else:
        with pytest.raises(ValueError, match=r"masked_mse_loss: the mask's weights sum to (nan|0), not a positive"):
            ops.masked_mse_loss(*args)
    with pytest.raises(ValueError, match=r"masked loss \(reference\): the mask's weights sum to (nan|0)"):
        ops.masked_mse_loss_ref(torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8), mask, 4)


def test_cuda_archs_run_on_follows_cudas_compatibility_rules():
    run_on = _dispatch.cuda_archs_run_on
    default = "80-real,90"  # sm_80 code, sm_90 code + compute_90 PTX
    assert run_on(default, (8, 0)) and run_on(default, (8, 6)) and run_on(default, (8, 9))  # sm_80 code on sm_8x
    assert run_on(default, (9, 0)) and run_on(default, (10, 0)) and run_on(default, (12, 0))  # PTX: later GPUs
    assert run_on(default, (7, 5)) is False and run_on(default, (7, 0)) is False  # T4, V100
    assert run_on("80-real", (9, 0)) is False and run_on("80-real;90-real", (10, 0)) is False  # no PTX to JIT
    assert run_on("86-real", (8, 0)) is False and run_on("75", (8, 0)) is True  # code: same major, minor >= its own
    assert run_on("90a", (9, 0)) is True and run_on("90a", (10, 0)) is False  # arch-specific: that GPU only
    assert run_on("100f", (10, 3)) is True and run_on("100f", (12, 0)) is False  # family-specific
    assert run_on("", (7, 5)) is None and run_on("native", (7, 5)) is None and run_on("all-major", (7, 5)) is None


def test_a_gpu_fastmim_cuda_was_not_built_for_gets_triton_and_a_forced_cuda_names_why(monkeypatch):
    """A T4 (sm_75) with the default build (sm_80 code, sm_90 code and PTX): the CUDA kernels cannot load there, so
    the automatic choice is Triton, not a "no kernel image is available" error on the first launch."""

    class FakeCuda:
        ARCHS = "80-real,90"

    names = {0: ("Tesla T4", (7, 5)), 1: ("NVIDIA H200", (9, 0))}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: names[torch.device(d).index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: names[torch.device(d).index][1])
    monkeypatch.setattr(_dispatch, "AUTO_CUDA", {"H200": {"masked_mse_loss": "cuda"}})
    monkeypatch.setattr(_dispatch, "_auto_cuda_by_index", {})
    monkeypatch.setattr(_dispatch, "_cuda_arch_problems", {})
    monkeypatch.setattr(_dispatch, "triton_problem", lambda device: None)
    monkeypatch.setattr(_dispatch._ext, "_cuda", FakeCuda())
    _dispatch._choices.clear()
    try:
        assert choose_backend("masked_mse_loss", torch.device("cuda", 0), (torch.bfloat16,)) == "triton"
        assert choose_backend("masked_mse_loss", torch.device("cuda", 1), (torch.bfloat16,)) == "cuda"
        monkeypatch.setenv("FASTMIM_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match=r"built for CUDA architectures 80-real,90, which do not run on this "
                           r"GPU \(sm_75\); rebuild with FASTMIM_CUDA_ARCHS=75"):  # fmt: skip
            choose_backend("masked_mse_loss", torch.device("cuda", 0), (torch.bfloat16,))
    finally:
        _dispatch._choices.clear()


_X, _IDS, _MASK, _IMGS = (
    torch.randn(2, 8, 4),
    torch.tensor([[0, 1], [2, 3]]),
    torch.zeros(2, 4),
    torch.randn(2, 3, 32, 32),
)
_NOT_TENSORS = {  # (op, argument name, call with that argument replaced by a list, an array or None)
    "gather x": ("gather_visible", "x", lambda: ops.gather_visible(_X.tolist(), _IDS)),
    "gather ids": ("gather_visible", "ids_keep", lambda: ops.gather_visible(_X, _IDS.numpy())),
    "scatter x": ("scatter_masked", "x_vis", lambda: ops.scatter_masked([1.0], _IDS, torch.zeros(1, 1, 4))),
    "scatter ids": ("scatter_masked", "ids_restore", lambda: ops.scatter_masked(_X, None, torch.zeros(1, 1, 4))),
    "loss pred": ("masked_mse_loss", "pred", lambda: ops.masked_mse_loss(None, _IMGS, _MASK, 16)),
    "loss imgs": ("masked_mse_loss", "imgs", lambda: ops.masked_mse_loss(_X, _IMGS.numpy(), _MASK, 16)),
    "loss mask": ("masked_mse_loss", "mask", lambda: ops.masked_mse_loss(torch.randn(2, 4, 768), _IMGS, [0, 1], 16)),
    "patched target": ("masked_mse_loss_patchified", "target", lambda: ops.masked_mse_loss_patchified(_X, [1], _MASK)),
    "patched mask": ("masked_mse_loss_patchified", "mask", lambda: ops.masked_mse_loss_patchified(_X, _X, None)),
    "patchify": ("patchify", "imgs", lambda: ops.patchify(_IMGS.numpy(), 16)),
    "unpatchify": ("unpatchify", "x", lambda: ops.unpatchify([1, 2], 16, 3)),
    "sparse_dwconv": ("sparse_dwconv", "x", lambda: ops.sparse_dwconv([1.0], torch.zeros(3, 3), None)),
    "fft_loss": ("fft_loss", "target", lambda: ops.fft_loss(_IMGS, _IMGS.numpy())),
}


@pytest.mark.parametrize("case", list(_NOT_TENSORS))
def test_an_argument_that_is_not_a_tensor_is_named(case):
    """A list, a NumPy array or None where a tensor belongs: a TypeError naming the op and the argument, not an
    AttributeError from inside the op."""
    op, name, call = _NOT_TENSORS[case]
    with pytest.raises(TypeError, match=rf"^{op}: {name} must be a tensor, got (list|ndarray|NoneType)$"):
        call()


@pytest.mark.parametrize("transform", ["vmap", "grad"])
@pytest.mark.parametrize("op", ["gather_visible", "masked_mse_loss", "masked_mse_loss_patchified", "patchify",
                                "layer_norm", "attention", "sparse_dwconv", "grn"])  # fmt: skip
def test_torch_func_transforms_run_the_reference(transform, op):
    """Under vmap the kernels read a batched tensor's (missing) memory ('Cannot access data pointer of Tensor that
    doesn't have storage'); under grad torch asked for a setup_context the user never wrote; some ops happened to
    work. Under any torch.func transform every op now runs its plain-PyTorch reference: the transform's answer, the
    reference's values."""
    ids = torch.tensor([[0, 1], [2, 3]])
    nbr = ops.SparseLayout.from_mask(torch.ones(1, 3, 3, dtype=torch.bool)).neighbors(3)
    w, imgs, mask = torch.randn(4, 1, 3, 3), torch.randn(2, 3, 8, 8), torch.ones(2, 4)
    calls = {
        "gather_visible": (lambda x: ops.gather_visible(x, ids), lambda x: ops.gather_visible_ref(x, ids), (2, 5, 3)),
        "masked_mse_loss": (lambda p: ops.masked_mse_loss(p, imgs, mask, 4),
                            lambda p: ops.masked_mse_loss_ref(p, imgs, mask, 4), (2, 4, 48)),
        "masked_mse_loss_patchified": (lambda p: ops.masked_mse_loss_patchified(p, ops.patchify(imgs, 4), mask),
                                       lambda p: ops.masked_mse_loss_patchified_ref(p, ops.patchify(imgs, 4), mask),
                                       (2, 4, 48)),
        "patchify": (lambda im: ops.patchify(im, 4), lambda im: ops.patchify_ref(im, 4), (2, 3, 8, 8)),
        "layer_norm": (lambda x: ops.layer_norm(x, torch.ones(6), torch.zeros(6)),
                       lambda x: ops.layer_norm_ref(x, torch.ones(6), torch.zeros(6)), (2, 5, 6)),
        "attention": (lambda q: ops.attention(q), lambda q: ops.attention_ref(q), (2, 5, 3, 2, 4)),
        "sparse_dwconv": (lambda x: ops.sparse_dwconv(x, nbr, w), lambda x: ops.sparse_dwconv_ref(x, nbr, w), (9, 4)),
        "grn": (lambda x: ops.grn(x, torch.ones(6), torch.zeros(6)),
                lambda x: ops.grn_ref(x, torch.ones(6), torch.zeros(6)), (2, 5, 6)),
    }  # fmt: skip
    fused, ref, shape = calls[op]
    if transform == "vmap":
        x = torch.randn(3, *shape)
        got = torch.func.vmap(fused)(x)
        torch.testing.assert_close(got, torch.stack([ref(xi) for xi in x]))
    else:
        x = torch.randn(*shape)
        got = torch.func.grad(lambda t: fused(t).square().sum())(x)
        want = torch.autograd.grad(ref(x.requires_grad_()).square().sum(), x)[0]
        torch.testing.assert_close(got, want)


def test_under_torch_func_the_ops_keep_their_shape_checks_and_targets_stay_constants():
    """The reference runs after the op's shape checks: grn's on one sample [N, C] (a vmap over the batch) would have
    normalised over C, silently; the targets take no gradient under torch.func.grad either, as in eager."""
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        torch.func.vmap(lambda t: ops.grn(t, torch.ones(4), torch.zeros(4)))(x)
    imgs = torch.randn(2, 3, 16, 16)
    for target in (lambda t: ops.low_pass_target(t, 4.0), lambda t: ops.hog_target(t, patch_size=8)):
        assert torch.func.grad(lambda t, f=target: f(t).square().sum())(imgs).abs().max() == 0
