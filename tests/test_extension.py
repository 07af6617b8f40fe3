"""The native extension: built (required in CI via FASTMIM_REQUIRE_EXT=1), and optional for `import fastmim`."""

import os
import subprocess
import sys

import pytest
import torch

import fastmim


def test_native_extension_loaded_when_required():
    if os.environ.get("FASTMIM_REQUIRE_EXT") != "1" and not fastmim.has_native_extension():
        pytest.skip("fastmim._C is not built here and FASTMIM_REQUIRE_EXT is not set")
    assert fastmim.has_native_extension(), f"fastmim._C failed to load: {fastmim._ext.load_error}"
    from fastmim import _C

    assert _C.num_threads() >= 1
    assert isinstance(_C.with_openmp, bool)


def test_an_extension_built_from_other_sources_is_not_used():
    """A checkout pulled without `pip install -e .` kept an _C whose functions meant something else (the multi-block
    context's min_keep): a build whose SOURCE_VERSION differs from these sources' is not loaded, and says why."""
    if not fastmim.has_native_extension():
        pytest.skip("fastmim._C is not built here")
    from fastmim import _C, _ext

    assert _C.SOURCE_VERSION == _ext.C_SOURCE_VERSION  # (raise both together)
    module, why = _ext._load("_C", _ext.C_SOURCE_VERSION + 1)
    assert module is None and "was built from other sources (version" in why and "pip install -e ." in why


def test_import_without_extension_warns_once_and_works():
    code = (
        "import warnings, fastmim, torch\n"
        "assert not fastmim.has_native_extension()\n"
        "from fastmim.masking import BlockMaskConfig, BlockMaskGenerator\n"
        "g = BlockMaskGenerator(BlockMaskConfig(6, 6, 10))\n"
        "assert g.backend == 'torch' and int(g(3).sum()) == 30\n"
        "m = fastmim.create_model('mae_vit_tiny_patch16', img_size=32, decoder_depth=1)\n"
        "loss, _, _ = m(torch.randn(1, 3, 32, 32)); assert torch.isfinite(loss)\n"
    )
    r = subprocess.run(
        [sys.executable, "-W", "always::fastmim._ext.ExtensionWarning", "-c", code],
        capture_output=True, text=True, env={**os.environ, "FASTMIM_NO_EXT": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("running without its native extension") == 1, r.stderr


def test_cpp_backend_requested_without_extension_fails_clearly(monkeypatch):
    from fastmim import _ext
    from fastmim.masking import BlockMaskConfig, BlockMaskGenerator

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "load_error", "not built")
    with pytest.raises(RuntimeError, match="fastmim._C is not available: not built"):
        BlockMaskGenerator(BlockMaskConfig(4, 4, 4), backend="cpp")


def _nvcc() -> str | None:
    import shutil
    from pathlib import Path

    found = shutil.which("nvcc")
    return found or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


def _cuobjdump() -> str | None:
    """Triton's package carries cuobjdump; CUDA toolkits without it (nvcc only) are common."""
    import shutil
    from pathlib import Path

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


def _require_cuda_ext() -> None:
    """fastmim._cuda is built by every install that finds nvcc (FASTMIM_CUDA=auto): with FASTMIM_REQUIRE_EXT=1 on a
    machine with nvcc (CI, the GPU machines) it must be there; elsewhere the tests skip with the reason."""
    if fastmim._ext.cuda_available():
        return
    if os.environ.get("FASTMIM_REQUIRE_EXT") == "1" and _nvcc():
        pytest.fail(f"nvcc is here but fastmim._cuda failed to load: {fastmim._ext.cuda_load_error}")
    pytest.skip(f"fastmim._cuda is not built here ({fastmim._ext.cuda_load_error})")


def test_cuda_extension_has_every_kernel_entry_point():
    """Built without a GPU (nvcc compiles, nothing runs): the module imports and exposes each op's launcher."""
    _require_cuda_ext()
    from fastmim import _cuda

    for name in ("gather_visible", "gather_visible_backward", "scatter_masked", "scatter_masked_backward",
                 "scatter_masked_workspace", "masked_loss_forward", "masked_loss_backward", "patchify"):  # fmt: skip
        assert callable(getattr(_cuda, name)), name
    assert _cuda.LOSS_MAX_D >= 3072 and _cuda.LOSS_BLOCKS_PER_SM >= 1
    assert _cuda.scatter_masked_workspace(256, 196, 49, 512, True, False) > 0
    assert _cuda.device_count() >= 0  # no driver here: 0, and no crash
    # the build's architectures, which fastmim.ops checks a GPU against (a T4 gets Triton, not a failed launch)
    assert _cuda.ARCHS == os.environ.get("FASTMIM_CUDA_ARCHS", "80-real;90").replace(";", ","), _cuda.ARCHS


def test_cuda_extension_holds_sm80_and_sm90_code():
    """The default build compiles machine code for the A100 (sm_80) and Hopper (sm_90), plus compute_90 PTX."""
    _require_cuda_ext()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (neither on PATH nor in triton's package) to list the embedded code")
    from fastmim import _cuda

    elf = subprocess.run([tool, "--list-elf", _cuda.__file__], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", _cuda.__file__], capture_output=True, text=True, check=True).stdout
    archs = os.environ.get("FASTMIM_CUDA_ARCHS", "80-real;90")
    if archs != "80-real;90":
        pytest.skip(f"built for FASTMIM_CUDA_ARCHS={archs}, not the default")
    assert "sm_80.cubin" in elf and "sm_90.cubin" in elf, elf
    assert "sm_90.ptx" in ptx, ptx


def test_cuda_extension_rejects_bad_arguments_without_a_launch():
    """Arguments the kernels cannot take raise ValueError naming the problem before any CUDA call (none runs here)."""
    _require_cuda_ext()
    from fastmim import _cuda

    with pytest.raises(ValueError, match="dtype code 7"):
        _cuda.gather_visible(0, 7, 1, 1, 1, 0, True, 1, 1, 0, 1, 1, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="negative size"):
        _cuda.gather_visible(0, 0, 1, 1, 1, 0, True, 1, 1, 0, -1, 1, 1, 1, 0, 0)
    geo = (14, 1, 1, 1, 16, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        _cuda.masked_loss_forward(0, 0, 1, 1, 1, 0, 0, geo, 0, 0, 1, 1, 1, 1, 768, 1e-6, True, 3, 0, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="geometry does not match"):
        _cuda.masked_loss_forward(0, 0, 1, 1, 1, 0, 0, geo, 0, 0, 1, 1, 1, 1, 700, 1e-6, True, 2, 0, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        _cuda.patchify(0, 0, 4, 1, 3, 1, 1, 256, 1, 1, 1, 1, 1, 1, 1, True, 0, 0)


def test_cuda_backend_forced_without_a_gpu_fails_clearly(monkeypatch):
    from fastmim.ops import gather_visible

    monkeypatch.setenv("FASTMIM_BACKEND", "cuda")
    x, ids = torch.randn(2, 5, 3), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(RuntimeError, match="FASTMIM_BACKEND=cuda cannot run here: the CUDA backend runs on CUDA"):
        gather_visible(x, ids)


def test_cpp_kernels_refuse_an_id_and_a_buffer_one_past_the_end():
    """The C++ kernels' own checks, the backstop behind the Python ones for a caller of fastmim._C: an id equal to N
    (sample 0's would read sample 1's first row) and a target one element shorter than its strides reach are
    refused, and the last valid id and the exact buffer are taken."""
    if not fastmim.has_native_extension():
        pytest.skip(f"fastmim._C not built ({fastmim._ext.load_error})")
    from fastmim import _C
    from fastmim.ops import masked_mse_loss_ref
    from fastmim.ops._cpu import CPP_DTYPE

    b, n, k, d = 2, 5, 3, 4
    x, grad = torch.randn(b, n, d), torch.randn(b, k, d)
    ok, bad = torch.tensor([[0, 2, n - 1], [1, 3, 4]]), torch.tensor([[0, 2, n], [1, 3, 4]])
    out, back = torch.empty(b, k, d), torch.empty(b, n, d)
    _C.gather_visible(x.data_ptr(), ok.data_ptr(), out.data_ptr(), b, n, k, d, 4)
    torch.testing.assert_close(out, torch.gather(x, 1, ok[..., None].expand(-1, -1, d)), rtol=0, atol=0)
    _C.gather_visible_backward(grad.data_ptr(), ok.data_ptr(), back.data_ptr(), b, n, k, d, 4)
    torch.testing.assert_close(back.gather(1, ok[..., None].expand(-1, -1, d)), grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"gather_visible: ids_keep\[0, 2\] = 5 is out of range \[0, 5\)"):
        _C.gather_visible(x.data_ptr(), bad.data_ptr(), out.data_ptr(), b, n, k, d, 4)
    with pytest.raises(ValueError, match=r"gather_visible_backward: ids_keep\[0, 2\] = 5 is out of range \[0, 5\)"):
        _C.gather_visible_backward(grad.data_ptr(), bad.data_ptr(), back.data_ptr(), b, n, k, d, 4)

    imgs, pred = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 192)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    geometry = (2, 4, 192, 2, 768, 128, 8, 8, 3, 16, 1, 256)  # B L D gw, strides of a sample/patch row/column, P C ...
    f32 = CPP_DTYPE[torch.float32]

    def loss(numel):
        return _C.masked_loss_forward(pred.data_ptr(), f32, imgs.data_ptr(), f32, numel, mask.data_ptr(), *geometry,
                                      True, 1e-6, 2)  # fmt: skip

    total, count = loss(imgs.numel())
    assert count == 5 and total / count == pytest.approx(masked_mse_loss_ref(pred, imgs, mask, 8, True).item())
    with pytest.raises(ValueError, match="the target strides reach element 1535, beyond target_numel = 1535"):
        loss(imgs.numel() - 1)
