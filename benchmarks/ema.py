"""The EMA teacher's update against the memory floor: ``EMATeacher.update`` (one ``torch._foreach_lerp_`` over the
parameters, fp32) of a ViT, a per-parameter Python loop (``t.mul_(m).add_(s, alpha=1 - m)``, the straightforward
way), and a copy of the same parameters (read and written once: the floor of any update that reads the student and
rewrites the teacher is 1.5x that copy, as it also reads the teacher).

    python benchmarks/ema.py --model vit_base_patch16 --out rows.jsonl

Target (issue 17): the update within 1.5x of the copy's time on a GPU (``update_vs_copy`` <= 1.5). One row per run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import call_timer, checked_device, environment, out_file, write_row  # noqa: E402
from fastmim.models.vit import VisionTransformer, vit_sizes  # noqa: E402
from fastmim.targets.teacher import DATA2VEC2_MOMENTUM, EMATeacher  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16", help="vit_{size}_patch{p}")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 50 on GPU, 5 on CPU)")
    ap.add_argument("--out", default=None, type=out_file, help="append the JSON row to this file")
    args = ap.parse_args(argv)
    try:
        _, size, patch = args.model.split("_")
        cfg = {**vit_sizes()[size], "patch_size": int(patch.removeprefix("patch"))}
    except (ValueError, KeyError):
        ap.error(f"--model must be vit_<size>_patch<p> with a size of {', '.join(vit_sizes())}, got {args.model!r}")
    device = checked_device(ap, args.device)
    reps = args.reps or (50 if device.type == "cuda" else 5)
    torch.manual_seed(0)
    student = VisionTransformer(args.img_size, **cfg).to(device)
    teacher = EMATeacher(student, *DATA2VEC2_MOMENTUM).to(device)
    params = [p for p in student.parameters()]
    mine = list(teacher.model.parameters())
    n = sum(p.numel() for p in params)
    times = call_timer(device, reps, warmup=3)

    def measure(fn) -> float:  # median ms
        return statistics.median(times(fn)) * 1e3

    def loop():
        m = teacher.momentum()
        with torch.no_grad():
            for t, s in zip(mine, params, strict=True):
                t.mul_(m).add_(s, alpha=1 - m)

    flat_src = torch.empty(n, device=device)
    flat_dst = torch.empty_like(flat_src)
    copy_ms = measure(lambda: flat_dst.copy_(flat_src))  # one read + one write of the parameters, contiguous
    update_ms = measure(lambda: teacher.update(student))
    loop_ms = measure(loop)
    row = {"benchmark": "ema", "model": args.model, "params_m": round(n / 1e6, 2), "update_ms": round(update_ms, 4),
           "loop_ms": round(loop_ms, 4), "copy_ms": round(copy_ms, 4),
           "update_vs_copy": round(update_ms / copy_ms, 3), "loop_vs_update": round(loop_ms / update_ms, 2),
           "update_gbps": round(3 * n * 4 / (update_ms * 1e-3) / 1e9, 1), **environment(device)}  # fmt: skip
    write_row(row, args.out)
    print(f"EMA update of {args.model} ({n / 1e6:.1f}M fp32 parameters) on {row['device']}: {update_ms:.3f} ms = "
          f"{row['update_vs_copy']}x a read + write of them ({copy_ms:.3f} ms; floor 1.5x); the per-parameter loop "
          f"{loop_ms:.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
