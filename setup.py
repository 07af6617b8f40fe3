"""Builds the native extension ``fastmim._C`` with CMake; all metadata lives in pyproject.toml.

Environment:
    FASTMIM_BUILD_EXT=0     skip the native build (fastmim then runs on its PyTorch reference paths)
    FASTMIM_CUDA            the CUDA extension fastmim._cuda (kernels/): "auto" (default) builds it when nvcc is found,
                            "1" requires it, "0" skips it; FASTMIM_CUDA_ARCHS picks the archs (CMake's
                            CUDA_ARCHITECTURES, default "80-real;90": sm_80 and sm_90 code plus compute_90 PTX)
    FASTMIM_BUILD_TYPE      CMake build type (default Release)
    MAX_JOBS                parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_executable() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the `cmake` wheel from PyPI, listed in build-system.requires
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        raise RuntimeError(
            "building fastmim._C needs CMake >= 3.18: `pip install cmake`, or set FASTMIM_BUILD_EXT=0 "
            "to install without the native extension"
        ) from None


def _cuda_mode() -> str:
    mode = os.environ.get("FASTMIM_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"FASTMIM_CUDA={mode!r}: use auto, 0 or 1")
    return mode


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and Path(cand).exists():
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _build_cuda() -> bool:
    mode = _cuda_mode()
    return mode == "1" or (mode == "auto" and _nvcc() is not None)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if ext.name == "fastmim._cuda":
            return  # built by the same CMake run as fastmim._C
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        cuda_out = Path(self.get_ext_fullpath("fastmim._cuda")).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("FASTMIM_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTMIM_OUTPUT_DIR={out.parent}",
            f"-DFASTMIM_OUTPUT_NAME={out.name}",
            f"-DFASTMIM_CUDA={'ON' if _build_cuda() else 'OFF'}",
            f"-DFASTMIM_CUDA_REQUIRED={'ON' if _cuda_mode() == '1' else 'OFF'}",
            f"-DFASTMIM_CUDA_ARCHS={os.environ.get('FASTMIM_CUDA_ARCHS', '80-real;90')}",
            f"-DFASTMIM_CUDA_OUTPUT_NAME={cuda_out.name}",
        ]
        nvcc = _nvcc()
        if _build_cuda() and nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja") or _has_ninja_wheel():
            args.append("-GNinja")
        cmake = _cmake_executable()
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


def _has_ninja_wheel() -> bool:
    try:
        import ninja  # noqa: F401

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return True
    except ImportError:
        return False


ext_modules = []
if os.environ.get("FASTMIM_BUILD_EXT", "1") != "0":
    ext_modules.append(CMakeExtension("fastmim._C"))
    if _build_cuda():
        ext_modules.append(CMakeExtension("fastmim._cuda"))
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild}, license="Apache-2.0")  # (dynamic in pyproject.toml)
