"""Checkpoints written atomically (temporary file + rename), with everything needed to resume mid-epoch."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CHECKPOINT_NAME = "checkpoint.pt"
DCP_NAME = "checkpoint.dcp"  # a sharded (--fsdp) run's checkpoint: a torch.distributed.checkpoint directory
CHECKPOINTS = (CHECKPOINT_NAME, DCP_NAME)
RUN_MARKERS = (*CHECKPOINTS, "config.yaml", "metrics.jsonl")


def atomic_write(path: str | Path, write) -> None:
    """Calls write(tmp_path), then renames tmp_path onto path; a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_encoder(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Encoder weights as safetensors (timm-compatible names)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def run_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a run directory resumes from: its ``checkpoint.pt`` or its sharded ``checkpoint.dcp`` (the
    newer, should a run have switched between --fsdp and not), None if it has neither."""
    from fastmim.train.fsdp import dcp_dir

    d = Path(output_dir)
    found = [p for p in (d / CHECKPOINT_NAME,) if p.is_file()] + [p for p in [dcp_dir(d / DCP_NAME)] if p]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def load_checkpoint(path: str | Path) -> dict:
    """A single-file checkpoint's state; for a sharded one (a ``checkpoint.dcp`` directory) the run's state without
    the tensors, ``"dcp"`` naming the directory they are loaded from (``Trainer.load_state_dict``)."""
    from fastmim.train.fsdp import dcp_dir, load_meta

    path = Path(path)
    if path.is_dir() or (not path.exists() and dcp_dir(path)):
        return load_meta(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {str(path)!r}")
    try:
        # weights_only=False: the file holds RNG states and the config, written by fastmim itself
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(
            f"checkpoint {str(path)!r} cannot be read ({e}); it may be truncated or not fastmim's"
        ) from e


def existing_run_markers(output_dir: str | Path) -> list[str]:
    """Files in output_dir that show a run is already there."""
    d = Path(output_dir)
    return [m for m in RUN_MARKERS if (d / m).exists()] if d.is_dir() else []
