"""Checkpoints written atomically (temporary file + rename), with everything needed to resume mid-epoch."""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CHECKPOINT_NAME = "checkpoint.pt"
DCP_NAME = "checkpoint.dcp"  # a sharded (--fsdp) run's checkpoint: a torch.distributed.checkpoint directory
CHECKPOINTS = (CHECKPOINT_NAME, DCP_NAME)
RUN_MARKERS = (*CHECKPOINTS, "config.yaml", "metrics.jsonl")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose bytes changed after it was written (a damaged copy or disk, a missing or truncated shard):
    refused rather than resumed with wrong weights."""


def check_crc(path: str | Path) -> None:
    """Reads every record of a ``torch.save`` file (a zip archive) against the CRC-32 written with it; raises
    ``CorruptCheckpoint`` naming the first record that differs. A file that is not a zip archive is left to
    ``torch.load``'s own error."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError):
        return
    except Exception as e:  # zipfile raises others on damaged headers (zlib.error, struct.error, ...)
        bad = f"a record header ({e})"
    if bad is not None:
        raise CorruptCheckpoint(f"checkpoint {str(path)!r} is corrupt: {bad} does not match the checksum written "
                                "with it (a damaged copy or disk); resume from an intact copy")  # fmt: skip


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


RUN_FILES = (CHECKPOINT_NAME, "encoder.safetensors", "config.yaml")  # the files a run writes with atomic_write


def remove_stale_temporaries(output_dir: str | Path, names=RUN_FILES) -> int:
    """Deletes the temporary files ``atomic_write`` left in ``output_dir`` when its process was killed mid-write
    (``kill -9``, a launcher's timeout): each is a whole checkpoint's size, and nothing reads them. Call it only when
    this run owns the directory and nothing writes there yet. Returns the bytes freed."""
    freed = 0
    for name in names:
        for tmp in Path(output_dir).glob(f".{name}.*.tmp"):
            try:
                size = tmp.stat().st_size
                tmp.unlink()
                freed += size
            except OSError:  # gone already, or not ours to delete: left as it is
                pass
    return freed


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
    check_crc(path)
    try:
        # weights_only=False: the file holds RNG states and the config, written by fastmim itself
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(
            f"checkpoint {str(path)!r} cannot be read ({e}); it may be truncated or not fastmim's"
        ) from e
    if isinstance(state, dict):
        state["source"] = str(path)  # named by the weights check after loading (Trainer.load_state_dict)
    return state


def weights_sums(params) -> torch.Tensor:
    """[sum, sum of absolute values] of ``params`` (tensors: each rank's shards when sharded) in fp32, on their
    device: what ``weights_check`` compares."""
    local = [torch.stack([t.sum(), t.abs().sum()]) for t in (p.detach().float() for p in params)]
    return torch.stack(local).sum(0) if local else torch.zeros(2)


def weights_check(got: tuple[float, ...], state: dict) -> None:
    """Raises ``CorruptCheckpoint`` when the weights (and optimizer state) just loaded from ``state`` do not sum to
    what they summed to when saved. ``got``: (weights' sum, sum of absolute values, the optimizer state's two). The
    sums are recomputed on another device, or from other shards, in another order: they agree within float32 rounding
    (1e-5 of the absolute sum); a flipped exponent bit moves them far more. The CRC check of a single file
    (``check_crc``) finds every change; this one covers the shards of a sharded checkpoint, which carry no checksum."""
    saved_w = state.get("weights_sum")
    if saved_w is None:
        saved_w = (state.get("weights_sum_per_rank") or [None])[0]
    checks = [("weights", saved_w, state.get("weights_abs_sum"), got[0], got[1]),
              ("optimizer state", state.get("optim_sum"), state.get("optim_abs_sum"), got[2], got[3])]  # fmt: skip
    for what, saved, saved_abs, total, abs_total in checks:
        if saved is None:
            continue
        tol = 1e-5 * (saved_abs if saved_abs is not None else max(abs_total, 1.0))
        if not abs(total - saved) <= tol:
            where = state.get("dcp") or state.get("source") or "the checkpoint"
            raise CorruptCheckpoint(f"checkpoint {str(where)!r} is corrupt: its {what} sum to {total:.8g} as loaded "
                                    f"and summed to {saved:.8g} when saved (a damaged copy, disk or shard); resume "
                                    "from an intact copy")  # fmt: skip


def existing_run_markers(output_dir: str | Path) -> list[str]:
    """Files in output_dir that show a run is already there."""
    d = Path(output_dir)
    return [m for m in RUN_MARKERS if (d / m).exists()] if d.is_dir() else []
