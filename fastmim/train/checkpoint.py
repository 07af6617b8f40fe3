"""Checkpoints written atomically (temporary file + rename), with everything needed to resume mid-epoch."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
DCP_NAME = "checkpoint.dcp"  # a sharded (--fsdp) run's checkpoint: a torch.distributed.checkpoint directory
CHECKPOINTS = (CHECKPOINT_NAME, DCP_NAME)
RUN_MARKERS = (*CHECKPOINTS, "config.yaml", "metrics.jsonl")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose bytes changed after it was written (a damaged copy or disk, a missing or truncated shard):
    refused rather than resumed with wrong weights."""


def verify_enabled() -> bool:
    """``FASTMIM_VERIFY_CHECKPOINT=0`` turns the checks of a checkpoint's bytes and sums off (a checkpoint edited on
    purpose, say); they are on by default."""
    return os.environ.get("FASTMIM_VERIFY_CHECKPOINT", "1").strip() != "0"


def _corrupt(path, what: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {str(path)!r} is corrupt: {what} (a damaged copy, disk or shard); resume "
                             "from an intact copy, or set FASTMIM_VERIFY_CHECKPOINT=0 to load it as it is")  # fmt: skip


def check_crc(path: str | Path) -> None:
    """Reads every record of a ``torch.save`` file (a zip archive) against the CRC-32 written with it; raises
    ``CorruptCheckpoint`` naming the first record that differs. Records written without one (CRC 0: torch's
    ``compute_crc32=False``) are not checked; a file that is not a zip archive is left to ``torch.load``'s error."""
    if not verify_enabled():
        return
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError):  # not a zip archive: torch.load names what it is
        return
    with z:
        for info in z.infolist():
            if info.CRC == 0:
                continue
            crc = 0
            try:
                with z.open(info) as f:  # (zipfile compares the CRC itself at the record's end: BadZipFile)
                    while chunk := f.read(1 << 24):
                        crc = zlib.crc32(chunk, crc)
            except Exception:  # a damaged record: zipfile's CRC error, zlib.error, struct.error, a short read
                crc = None
            if crc != info.CRC:
                raise _corrupt(path, f"its record {info.filename} does not match the CRC-32 written with it")


def file_crc(path: str | Path) -> int:
    """CRC-32 of a file's bytes."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def check_files_crc(folder: str | Path, crcs: dict[str, int] | None, rank: int = 0, world_size: int = 1) -> list[str]:
    """The problems of the files of ``folder`` named in ``crcs`` (name -> CRC-32, as a sharded save recorded them),
    this rank's share of them (every ``world_size``-th): missing, or other bytes. Empty when all match."""
    if not crcs or not verify_enabled():
        return []
    problems = []
    for name in sorted(crcs)[rank::world_size]:
        f = Path(folder) / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif file_crc(f) != crcs[name]:
            problems.append(f"{name} does not match the CRC-32 recorded when it was saved")
    return problems


class WriteError(OSError):
    """A run file's write that failed (the file system refused it: too large for it, an I/O error, a network share
    gone); its text says which file, why, and that the previous one was kept."""

    def __str__(self) -> str:
        return self.strerror


class NoSpaceError(WriteError):
    """A write that ran out of disk space (or quota)."""


# what torch.save and safetensors say when the file system fails them (a RuntimeError / SafetensorError, not OSError)
_IO_FAILURE = re.compile(r"inline_container|iostream|unexpected pos|os error|IoError|file too large|input/output", re.I)


def atomic_write(path: str | Path, write) -> None:
    """Calls write(tmp_path), then renames tmp_path onto path; a crash leaves the old file intact. A write that fails
    for want of space raises ``NoSpaceError`` naming the file (torch.save says "unexpected pos", safetensors "os
    error 28"); one the file system fails otherwise (EFBIG, EIO, ...) ``WriteError``."""
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
    except Exception as e:
        full = _out_of_space(path.parent, tmp, e)  # (measured while the partial file still takes its space)
        if not full and not (isinstance(e, OSError) or _IO_FAILURE.search(str(e))):
            raise
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        kept, again = (f"the previous {path.name} is intact", "resume") if path.exists() else \
            (f"no earlier {path.name} was there", "run again")  # fmt: skip
        if full:
            raise NoSpaceError(errno.ENOSPC, f"no space left to write {path} ({full}; the write said: {said}); "
                                             f"{kept}: free space, then {again}") from e  # fmt: skip
        code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO  # (EACCES, EFBIG, ... kept)
        raise WriteError(code, f"cannot write {path} ({said}); {kept}: fix the file system's problem, then "
                               f"{again}") from e  # fmt: skip
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if os.path.isdir(f"{tmp}.d"):  # (a writer's own folder for a library's temporary file: save_encoder's)
            shutil.rmtree(f"{tmp}.d", ignore_errors=True)


def _out_of_space(folder: Path, tmp: str, e: Exception) -> str | None:
    """What says that ``e``, a write's failure, came from a full disk or quota; None when nothing does."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return e.strerror or "no space"
    text = str(e)
    if "No space left" in text or "quota exceeded" in text.lower():
        return "no space left on the device"
    try:
        free, written = shutil.disk_usage(folder).free, os.path.getsize(tmp)
    except OSError:
        return None
    if free < 16 * 2**20:  # (the partial file filled what was left)
        return f"{written / 2**20:.1f} MiB of it written, {free / 2**20:.1f} MiB free on its device"
    return None


RUN_FILES = (CHECKPOINT_NAME, "encoder.safetensors", "config.yaml")  # what a run writes with atomic_write
SNAPSHOT_GLOB = "encoder-epoch[0-9]*.safetensors"  # --keep-every's snapshots (Trainer._keep_encoder_snapshot)


def snapshot_name(epoch: int) -> str:
    """The file --keep-every keeps the encoder in at the end of ``epoch`` (``SNAPSHOT_GLOB`` matches it)."""
    return f"encoder-epoch{epoch:04d}.safetensors"


def remove_stale_temporaries(output_dir: str | Path, names=(*RUN_FILES, SNAPSHOT_GLOB)) -> int:
    """Deletes the temporary files ``atomic_write`` left in ``output_dir`` when its process was killed mid-write
    (``kill -9``, a launcher's timeout): each is a whole checkpoint's size, and nothing reads them. Call it only when
    this run owns the directory and nothing writes there yet. Returns the bytes freed."""
    freed = 0
    for name in names:
        for tmp in Path(output_dir).glob(f".{name}.*.tmp"):
            freed += _remove(tmp)
        for inner in Path(output_dir).glob(f".{name}.*.tmp.d"):  # (save_encoder's folder for safetensors' own)
            if inner.is_dir() and not inner.is_symlink():
                freed += sum(_remove(f) for f in inner.iterdir() if f.is_file() and not f.is_symlink())
                with contextlib.suppress(OSError):
                    inner.rmdir()
    return freed


def clear_stale_temporaries(output_dir: str | Path, names=(*RUN_FILES, SNAPSHOT_GLOB)) -> int:
    """``remove_stale_temporaries``, saying what it freed (a note on stdout) when it freed anything."""
    freed = remove_stale_temporaries(output_dir, names)
    if freed:
        print(f"note: removed {freed / 2**20:.1f} MiB of temporary files an interrupted save left in {output_dir}",
              flush=True)  # fmt: skip
    return freed


def _remove(path: Path) -> int:
    """Deletes the file ``path``; returns the bytes that freed (0 for one gone already, not ours to delete, or whose
    bytes stay with another hard link)."""
    try:
        st = path.stat()
        path.unlink()
        return st.st_size if st.st_nlink == 1 else 0
    except OSError:
        return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_state() -> dict:
    """The process's random states, in types ``torch.load(..., weights_only=True)`` (torch's default) reads: numpy's
    key array as a tensor, not an ndarray (a checkpoint holding one could not be loaded by plain ``torch.load``)."""
    state = {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_rng_state() -> tuple:
    """``np.random.get_state()`` with its key array as a tensor (weights_only loads read it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def set_numpy_rng_state(state) -> None:
    """Restores ``numpy_rng_state()``'s state, or ``np.random.get_state()``'s (checkpoints before 2026-12-07)."""
    kind, keys, *rest = state
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    set_numpy_rng_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def encoder_format(model: nn.Module) -> str:
    """What the exported encoder loads into (the file's ``format``): timm's ConvNeXt, its VisionTransformer, or, for a
    ViT with a relative position bias, its Beit through ``fastmim.models.vit.to_beit_state_dict``."""
    if getattr(model, "rel_pos_mode", None) is not None:
        return "timm Beit after fastmim.models.vit.to_beit_state_dict (the keys here are fastmim's ViT's)"
    return "timm VisionTransformer" if hasattr(model, "blocks") else "timm ConvNeXt"


def encoder_metadata(model: nn.Module, name: str, step: int, img_size: int) -> dict[str, str]:
    """encoder.safetensors' metadata: the recipe, step, what it loads into, the image size; the target it learned to
    predict (pixels, lowpass with its radius, hog with its cell, bins and window; teacher recipes have none); which
    encoder of a teacher recipe (I-JEPA's target or context, data2vec 2.0's student); a learned absolute position
    embedding (a loaded encoder keeps training it)."""
    meta = {"model": name, "step": str(step), "format": encoder_format(model), "img_size": str(img_size)}
    target = getattr(model, "target", None)
    if isinstance(target, str):  # (fastmim.targets.choice)
        meta["target"] = target
        if target == "lowpass":
            meta["low_pass_radius"] = repr(float(model.low_pass_radius))
        elif target == "hog":
            hog = model.hog
            meta.update(hog_cell=str(hog.cell), hog_bins=str(hog.bins), gaussian_window=str(hog.gaussian_window))
    if hasattr(model, "export_encoder"):
        meta["encoder"] = model.export_encoder
    elif hasattr(model, "teacher"):  # data2vec 2.0 exports its student, not the EMA teacher
        meta["encoder"] = "student"
    if getattr(model, "abs_pos", None) == "learned":
        meta["abs_pos"] = "learned"
    return meta


def save_encoder(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Encoder weights as safetensors (timm-compatible names), the same bytes for the same weights and metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        # safetensors writes a temporary file of its own beside its target (".tmpXXXXXX"), which a kill -9 left in
        # the run folder, the encoder's size each time: its target is inside a folder named as ours, which
        # remove_stale_temporaries removes whole
        inner = Path(f"{tmp}.d")  # (atomic_write removes it, after a failure's space is measured with it in place)
        inner.mkdir()
        save_file(tensors, str(inner / "encoder"), metadata=metadata)
        os.replace(inner / "encoder", tmp)
        _order_header(tmp)

    atomic_write(path, write)


def _order_header(path: str) -> None:
    """Rewrites a safetensors file's header in place in a fixed order: safetensors writes its metadata in the order
    of a Rust hash map, which differs from process to process, so the same weights gave other bytes (another
    sha256 in eval.jsonl). The header keeps its length (the data's offsets count from its end)."""
    import json

    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
        ordered |= dict(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= n:  # (the same entries: the same length; the rest is padding, as safetensors pads)
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def run_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a run directory resumes from: its ``checkpoint.pt`` or its sharded ``checkpoint.dcp``, None if
    it has neither. Should a run have switched between --fsdp and not, it holds both: the one of the later step
    (``saved_step``; file times are not trusted, a plain copy of the folder renews them), the newer on a tie."""
    from fastmim.train.fsdp import dcp_dir

    d = Path(output_dir)
    found = [p for p in (d / CHECKPOINT_NAME,) if p.is_file()] + [p for p in [dcp_dir(d / DCP_NAME)] if p]
    if len(found) < 2:
        return found[0] if found else None
    return max(found, key=lambda p: (saved_step(p), p.stat().st_mtime_ns))


class ForeignCheckpointError(ValueError):
    """A file that holds Python objects other than tensors, plain values and numpy arrays: not unpickled."""


def _numpy_array_globals() -> dict[str, object]:
    """The globals a pickled numpy array needs, by the names numpy 1 and 2 write them under: the array's
    reconstruction, the array and dtype types and the dtype classes. Nothing else of numpy is allowed (a prefix rule
    let any numpy function through, numpy.testing's runstring among them: code from the file ran)."""
    core = getattr(np, "_core", None) or np.core
    names = {
        "numpy.core.multiarray._reconstruct": core.multiarray._reconstruct,
        "numpy._core.multiarray._reconstruct": core.multiarray._reconstruct,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
    }
    where = getattr(np, "dtypes", None)  # (numpy >= 1.25)
    for n in dir(where) if where else ():
        if n.endswith("DType"):
            names[f"numpy.dtypes.{n}"] = getattr(where, n)
    return names


def safe_load(path: str | Path, **kwargs):
    """``torch.load`` of a fastmim file (a checkpoint, a sharded one's meta.pt) that runs no code from it: tensors,
    plain Python values and numpy arrays (an older checkpoint's numpy RNG state) only. Anything else is refused by
    ``ForeignCheckpointError`` naming the objects (``weights_only=False``, which the resume used, ran whatever a
    downloaded .pth carried)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        allowed = _numpy_array_globals()
        foreign = [n for n in names if n not in allowed]
        if not names or foreign:
            raise ForeignCheckpointError(
                f"{str(path)!r} holds Python objects fastmim does not load ({', '.join(foreign or names)}): not a "
                "fastmim checkpoint (unpickling them could run code from the file)"
            ) from None
        # (each under the name the file uses: numpy 1's numpy.core is numpy 2's numpy._core)
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def strip_wrapper_prefixes(state: dict) -> dict:
    """A state dict without the prefix every key carries when it was saved from a wrapped model: DDP's ``module.``,
    torch.compile's ``_orig_mod.`` (or both)."""
    stripped = True
    while stripped and state:  # (in either order, each once or more: a compiled DDP model, a DDP'd compiled one)
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                stripped = True
    return state


def weights_in(state) -> tuple[object, bool]:
    """The state dict a training checkpoint holds: I-JEPA's ``target_encoder`` (the encoder it evaluates), else the
    one under "state_dict" and/or "model" (timm's, MAE's), its keys without a wrapped model's prefixes, ConvNeXt V2's
    own keys (a fine-tuned model's, an FCMAE pretraining's) in fastmim's names (``from_official_state_dict``).
    Returns (it, whether it was I-JEPA's target encoder); what is no dict of tensors comes back as found, for the
    caller to refuse (``python -m fastmim.eval`` and ``--init-weights`` read files the same way)."""
    target = isinstance(state, dict) and isinstance(state.get("target_encoder"), dict)
    if target:
        state = state["target_encoder"]
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = strip_wrapper_prefixes(state)
        from fastmim.models.convnextv2 import from_official_state_dict, is_official_state_dict

        if is_official_state_dict(state):  # ConvNeXt V2's own code's (FCMAE's sparse encoder included): timm's names
            state = from_official_state_dict(state)
    return state, target


def read_init_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors ``--init-weights`` starts a run from: a fastmim run's folder (its checkpoint's model, else its
    encoder.safetensors), a checkpoint.pt, a .safetensors file, or a torch file holding a state dict (as it is, or
    under "model" / "state_dict": MAE's and timm's checkpoints; I-JEPA's "target_encoder"). Only tensors and plain
    values are read (``safe_load``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init-weights: {str(path)!r} does not exist")
    if path.is_dir():
        found = run_checkpoint(path)
        if found is None and (path / "encoder.safetensors").is_file():
            found = path / "encoder.safetensors"
        if found is None:
            raise FileNotFoundError(f"--init-weights: {str(path)!r} holds no checkpoint.pt or encoder.safetensors")
        if found.is_dir():
            raise ValueError(f"--init-weights: {str(found)!r} is a sharded checkpoint: make it one file first "
                             f"(python -m fastmim.train.convert {str(found)!r})")  # fmt: skip
        path = found
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = safe_load(path)
        except ForeignCheckpointError as e:  # (MAE's own checkpoints keep their argparse args beside the weights)
            raise ValueError(f"--init-weights: {e}; if you trust the file, save its weights alone and pass that: "
                             f"python -c \"import torch; c = torch.load({str(path)!r}, weights_only=False); "
                             "torch.save(c.get('model', c), 'weights.pth')\"") from None  # fmt: skip
        except Exception as e:
            raise ValueError(f"--init-weights: {str(path)!r} cannot be read as torch weights ({e})") from None
        state, _ = weights_in(state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init-weights: {str(path)!r} does not hold a state dict of tensors")
    return strip_wrapper_prefixes(state)  # (a .safetensors file's too)


def init_model_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> str:
    """Copies ``tensors`` into ``model``: the whole model where they are all of its tensors with its shapes, else its
    encoder's (``model.encoder_state_dict()``'s keys, found as they are or under ``encoder.``), the rest keeping its
    initialisation. Anything else is refused naming what does not fit. Returns what was taken, for a note."""
    own = model.state_dict()
    mapped, unknown = {}, []
    for k, v in tensors.items():
        name = k if k in own else f"encoder.{k}" if f"encoder.{k}" in own else None
        if name is None:
            unknown.append(k)
        else:
            mapped[name] = v
    encoder = [k if k in own else f"encoder.{k}" for k in model.encoder_state_dict()]
    encoder = [k for k in encoder if k in own]  # (FCMAE's export adds timm's head norm, which it does not train)
    missing = [k for k in encoder if k not in mapped]
    if missing:
        also = f"; it holds others, such as {', '.join(unknown[:3])}" if unknown else ""
        raise ValueError(f"--init-weights {source}: holds neither this model's weights nor its encoder's: "
                         f"{len(missing)} of the encoder's {len(encoder)} tensors are missing, such as "
                         f"{', '.join(missing[:3])}{also}")  # fmt: skip
    wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if v.shape != own[k].shape}
    bad = [k for k in encoder if k in wrong]
    if bad:
        k = bad[0]
        raise ValueError(f"--init-weights {source}: {len(bad)} of the encoder's tensors have other shapes than this "
                         f"model's, such as {k} {wrong[k][0]} against {wrong[k][1]} (another size, patch or image "
                         "size?)")  # fmt: skip
    # the whole model only where the file is exactly this model (a deeper decoder of the same width would give a
    # mix of two decoders: its first blocks with its own norm and head)
    whole = set(mapped) == set(own) and not wrong and not unknown
    take = mapped if whole else {k: mapped[k] for k in encoder}
    model.load_state_dict({**own, **take}, strict=True)
    said = f"initialised from {source}: "
    if whole:
        said += f"the whole model ({len(take)} tensors)"
    else:
        why = [f"{len(unknown)} of the file's tensors are not this model's"] if unknown else []
        why += [f"{len(wrong)} have other shapes"] if wrong else []
        absent = len([k for k in own if k not in mapped])
        why += [f"{absent} of this model's are not in the file"] if absent else []
        said += (f"the encoder ({len(take)} tensors); the rest of the model ({len(own) - len(take)} tensors) keeps "
                 f"its initialisation ({', '.join(why)})")  # fmt: skip
    teacher = getattr(model, "teacher", None)
    if teacher is not None and hasattr(teacher, "updates"):  # an EMA teacher (I-JEPA, data2vec 2.0): a new run's
        # schedule from its start; the teacher a copy of the student where the file gave the student alone (it
        # held the teacher's random weights: the targets of a random network)
        with torch.no_grad():
            if not whole:
                student = getattr(model, "context_encoder_state_dict", model.encoder_state_dict)()
                teacher.model.load_state_dict(student)
            teacher.updates.zero_()
        teacher._host_updates = (0, None)
        said += ("; its EMA teacher keeps the file's, its momentum schedule from the start" if whole else
                 "; its EMA teacher starts as a copy of the encoder, as the recipe starts")  # fmt: skip
    return said


def saved_step(path: Path) -> int:
    """The training step a checkpoint (``checkpoint.pt``, or a sharded one's directory) was saved at, its tensors
    memory-mapped where the file allows it (else read); -1 when it cannot be read at all (a truncated file: the other
    one is taken, and the note says so)."""
    from fastmim.train.fsdp import load_meta

    try:
        if path.is_dir():
            return int(load_meta(path)["step"])
        try:
            return int(safe_load(path, mmap=True)["step"])
        except ForeignCheckpointError:
            raise
        except Exception:  # an old serialisation, or a filesystem without mmap
            return int(safe_load(path)["step"])
    except Exception:
        return -1


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
        state = safe_load(path)  # (RNG states, the config: plain values; no code from the file runs)
    except ForeignCheckpointError:
        raise
    except Exception as e:
        raise RuntimeError(
            f"checkpoint {str(path)!r} cannot be read ({e}); it may be truncated or not fastmim's"
        ) from e
    if isinstance(state, dict):
        state["source"] = str(path)  # named by the weights check after loading (Trainer.load_state_dict)
    return state


SUMS_DTYPE = "float64"  # recorded with the sums: checkpoints before it summed in float32 (a looser tolerance)


def weights_sums(params) -> torch.Tensor:
    """[sum, sum of absolute values] of ``params`` (tensors: each rank's shards when sharded) in float64, on their
    device: what ``weights_check`` compares."""
    local = [torch.stack([t.sum(dtype=torch.float64), t.abs().sum(dtype=torch.float64)])
             for t in (p.detach() for p in params)]  # fmt: skip
    return torch.stack(local).sum(0) if local else torch.zeros(2, dtype=torch.float64)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's floating-point state tensors (AdamW's moments; not its step counts)."""
    return [t for st in optimizer.state.values() for k, t in st.items()
            if k != "step" and isinstance(t, torch.Tensor) and t.is_floating_point()]  # fmt: skip


def weights_check(got: tuple[float, ...], state: dict) -> None:
    """Raises ``CorruptCheckpoint`` when the weights (and optimizer state) just loaded from ``state`` do not sum to
    what they summed to when saved. ``got``: (weights' sum, sum of absolute values, the optimizer state's two). The
    sums are recomputed on another device, or from other shards, in another order; in float64 they agree within
    1e-9 of the absolute sum (float32 sums of older checkpoints: 1e-5), and both the sum and the absolute sum are
    compared, so a zeroed page of weights shows. A single file is also read against its CRC-32s (``check_crc``), a
    sharded one's files against theirs (``check_files_crc``); this check covers what a bytes check cannot see (a
    checkpoint written without checksums, a load that went wrong)."""
    if not verify_enabled():
        return
    saved_w = state.get("weights_sum")
    if saved_w is None:
        saved_w = (state.get("weights_sum_per_rank") or [None])[0]
    rel = 1e-9 if state.get("sums_dtype") == SUMS_DTYPE else 1e-5
    checks = [("weights", saved_w, state.get("weights_abs_sum"), got[0], got[1]),
              ("optimizer state", state.get("optim_sum"), state.get("optim_abs_sum"), got[2], got[3])]  # fmt: skip
    for what, saved, saved_abs, total, abs_total in checks:
        if saved is None or not math.isfinite(saved) or (saved_abs is not None and not math.isfinite(saved_abs)):
            continue  # not recorded, or not comparable
        tol = rel * (saved_abs if saved_abs is not None else max(abs_total, 1.0)) + 1e-12
        pairs = [(total, saved)] + ([(abs_total, saved_abs)] if saved_abs is not None else [])
        if any(not abs(a - b) <= tol for a, b in pairs):
            where = state.get("dcp") or state.get("source") or "the checkpoint"
            raise _corrupt(where, f"its {what} sum to {total:.12g} (absolute {abs_total:.12g}) as loaded and to "
                                  f"{saved:.12g} (absolute {saved_abs}) when saved")  # fmt: skip


def existing_run_markers(output_dir: str | Path) -> list[str]:
    """Files in output_dir that show a run is already there."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    kept = sorted(p.name for p in d.glob(SNAPSHOT_GLOB))  # (--keep-every's: the newest stands for them all)
    return [m for m in RUN_MARKERS if (d / m).exists()] + kept[-1:]
