"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU; the interpreter tests cannot show that."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmim.ops._dispatch import triton_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about a minute on 2 cores: every kernel's every specialisation
@pytest.mark.skipif(triton_available() is not None, reason=f"triton not importable ({triton_available()})")
def test_every_kernel_compiles_to_ptx_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "tests/ops/compile_kernels.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "all kernels compile for sm_90" in r.stdout
