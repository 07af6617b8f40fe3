"""What every benchmark row carries: device, versions, commit and date; and how rows are written."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import torch

from fastmim.data.folder import usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """``fastmim.provenance.git_commit()`` (FASTMIM_COMMIT names it where the tree has no .git: a copy sent to a GPU
    machine); "unknown", with a warning, when neither says (also for a copy that sits inside another checkout)."""
    from fastmim.provenance import git_commit as commit

    found = commit()
    if found is None:
        print("warning: the rows' commit is unknown (no git checkout here): set FASTMIM_COMMIT", file=sys.stderr)
        return "unknown"
    return found


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1 (0 or a negative size ended in a traceback, or ran as the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def checked_device(ap: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device``'s value as a device this machine has, or argparse's one-line error."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        ap.error(f"--device {name!r}: {e}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {name}: the benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda":  # current as well: Triton launches and CUDA events use the current device
        if device.index is None:  # ("cuda": the current one, as torch takes it)
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            ap.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def out_file(path: str) -> str:
    """``--out``'s type: a file the rows can be appended to, checked before anything is measured (a bad path found
    at the first row lost that measurement and every one after it)."""
    p = Path(path)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{path!r} is a folder: name the JSON-lines file to append the rows to")
    made = [d for d in (p.parent, *p.parent.parents) if not d.exists()]  # (deepest first)
    existed = p.exists()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot append to {path!r}: {e.strerror}") from None
    finally:  # checked, not made: a run refused later (a bad flag, no GPU) leaves no empty file or folder behind
        if not existed:
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
    return path


# this process's rows share it: a ratio between rows is a same-process one only where their "run" is the same
RUN = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    from fastmim.ops._dispatch import auto_cuda_table, compiled_ops

    # the fused ops' backend: forced by FASTMIM_BACKEND, or auto (then this GPU's AUTO_CUDA table)
    ops_backend = os.environ.get("FASTMIM_BACKEND", "").strip().lower() or "auto"
    if ops_backend == "auto" and device.type == "cuda":
        key, table, _ = auto_cuda_table(name, torch.cuda.get_device_capability(device))
        ops_backend = f"auto[{key}] " + ",".join(f"{op}={b}" for op, b in sorted(table.items())) if table else "auto"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "ops_backend": ops_backend, "compiled_ops": compiled_ops(),
            "python": sys.version.split()[0], "commit": git_commit(), "run": RUN,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def write_row(row: dict, out: str | os.PathLike | None) -> None:
    """Prints the JSON row and appends it to ``out`` when given."""
    print(json.dumps(row))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def host() -> dict:
    """The CPU rows' host: its model and usable core count (CPU rows of different machines stay apart)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": usable_cpus()}


def parse_counts(text: str, minimum: int) -> list[int]:
    """argparse type: comma-separated ints, each at least ``minimum``."""
    import argparse

    try:
        out = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        out = []
    if not out or min(out) < minimum:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= {minimum}, got {text!r}")
    return out


def copy_bandwidth(device: torch.device, measure_ms, mbytes: int) -> float:
    """Device copy bandwidth in GB/s, counting bytes read + written; ``measure_ms(fn)`` returns fn's time in ms."""
    src = torch.empty(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (measure_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def call_timer(device: torch.device, reps: int, warmup: int):
    """measure(fn) -> list of per-call seconds (CUDA events on a GPU, perf_counter on CPU), after warm-up calls."""

    def measure(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times

    return measure
