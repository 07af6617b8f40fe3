"""What a run was made with: the fastmim commit and the versions of the libraries that decide its numbers.

Augmentation draws come from torch's generator through torchvision's transforms (or from DALI), so a rerun on other
library versions may crop differently; the masks from fastmim's own integer hashes do not depend on them, but which
generator draws them (the C++ one of fastmim's native extension, or torch's) does. A checkpoint and the run's
config.yaml carry ``run_provenance()``; the evaluation's rows carry ``versions()``.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_COMMIT: list[str | None] = []  # (asked once per process)


def git_commit() -> str | None:
    """The short hash of the checkout fastmim runs from, "+dirty" when tracked files differ from it; where there is
    none (a copy without .git), the FASTMIM_COMMIT environment variable, else None (an installed package: a checkout
    that fastmim merely sits inside is another project's). The checkout comes first: a FASTMIM_COMMIT left exported
    from an earlier copy named other code, and hid "+dirty"."""
    if _COMMIT:
        return _COMMIT[0] or os.environ.get("FASTMIM_COMMIT") or None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True,
                              timeout=10).stdout.strip()  # fmt: skip

    commit = None
    if (ROOT / ".git").exists():
        try:
            if Path(git("rev-parse", "--show-toplevel")).resolve() == ROOT.resolve():
                dirty = git("status", "--porcelain", "--untracked-files=no")
                commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout after all
            commit = None
    _COMMIT.append(commit)
    return commit or os.environ.get("FASTMIM_COMMIT") or None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """fastmim's version and commit, Python's, and those of the installed libraries that decide a run's numbers
    (None: not installed), with whether fastmim's native extension loaded."""
    import torch

    import fastmim
    from fastmim import _ext

    out = {"fastmim": fastmim.__version__, "commit": git_commit(), "python": sys.version.split()[0],
           "torch": str(torch.__version__), "cuda": torch.version.cuda}  # fmt: skip
    for name, dist in (("torchvision", "torchvision"), ("triton", "triton"), ("timm", "timm"), ("pillow", "pillow"),
                       ("numpy", "numpy")):  # fmt: skip
        out[name] = _version(dist)
    out["dali"] = next((v for v in map(_version, ("nvidia-dali-cuda130", "nvidia-dali-cuda120")) if v), None)
    out["native_ext"] = _ext.available()
    return out


def run_provenance(**run) -> dict:
    """``versions()`` plus what the run resolved at its start (the loader it read with, the device, ...)."""
    return {**versions(), **run}


def as_comments(provenance: dict) -> str:
    """YAML comment lines holding ``provenance`` (config.yaml stays a config that --config reads)."""
    lines = ["# written by this run (not read back: the settings above are the config):"]
    # (a value with a line break or another control character, a data path say, quoted: it must not end the comment)
    lines += [f"#   {k}: {v if not isinstance(v, str) or v.isprintable() else repr(v)}" for k, v in provenance.items()]
    return "\n".join(lines) + "\n"
