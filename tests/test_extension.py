"""The native extension: built (required in CI via FASTMIM_REQUIRE_EXT=1), and optional for `import fastmim`."""

import os
import subprocess
import sys

import pytest

import fastmim


def test_native_extension_loaded_when_required():
    if os.environ.get("FASTMIM_REQUIRE_EXT") != "1" and not fastmim.has_native_extension():
        pytest.skip("fastmim._C is not built here and FASTMIM_REQUIRE_EXT is not set")
    assert fastmim.has_native_extension(), f"fastmim._C failed to load: {fastmim._ext.load_error}"
    from fastmim import _C

    assert _C.num_threads() >= 1
    assert isinstance(_C.with_openmp, bool)


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
