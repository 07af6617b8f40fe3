"""Sparse ConvNeXt V2 encoder: forward + backward time per backend and mask ratio, side by side in one process.

    python benchmarks/sparse_conv.py                                  # ConvNeXtV2-Base, batch 64, on a GPU
    python benchmarks/sparse_conv.py --model convnextv2_atto --batch-size 8 --device cpu --amp none

For each mask ratio (default 0, 0.3, 0.6, 0.75, 0.9 of the 32-px patches removed, the same count per sample) and
each backend of ``fastmim.models.convnextv2_sparse`` (``dense_masked``: the dense model times the mask after every
layer, the reference; ``fastmim``: visible pixels only; ``spconv``: the same with the stem and downsampling convs
through spconv, by default only where spconv is installed), times the encoder's forward + backward (a weighted sum of
its output as the loss) and reports the median with p20/p80, peak memory (CUDA), the visible fraction, the time per
visible fraction and the speedup over dense_masked at the same ratio. The dense model without a mask
(``forward_features``) is the ``dense`` row. Never asserts anything: the targets live in the issue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastmim  # noqa: E402
from benchmarks.common import call_timer, checked_device, environment, out_file, write_row  # noqa: E402
from fastmim.models.convnextv2_sparse import BACKENDS, sparse_forward  # noqa: E402

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def spconv_missing() -> str | None:
    """Why the spconv backend cannot run here (its ImportError), or None when it can."""
    from fastmim.models.convnextv2_sparse import _spconv

    try:
        _spconv()
    except ImportError as e:
        return str(e)
    return None


def default_backends() -> list[str]:
    """Every backend, spconv only where its optional dependency imports."""
    return [b for b in BACKENDS if b != "spconv" or spconv_missing() is None]


def patch_visible(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[B, gh, gw] bool: exactly round(L * (1 - ratio)) visible patches per sample, at random places."""
    n = grid[0] * grid[1]
    keep = round(n * (1.0 - ratio))
    ids = torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :keep]
    visible = torch.zeros(batch, n, dtype=torch.bool)
    visible.scatter_(1, ids, True)
    return visible.view(batch, *grid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--model", default="convnextv2_base" if cuda else "convnextv2_atto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on CPU")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--ratios", default="0,0.3,0.6,0.75,0.9", help="comma-separated mask ratios in [0, 1)")
    ap.add_argument("--backends", default=None, help=f"comma-separated, from {', '.join(BACKENDS)} (default: all; "
                    "spconv where installed)")  # fmt: skip
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--amp", choices=sorted(AMP), default="bf16" if cuda else "none")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on GPU, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-dense", action="store_true", help="skip the unmasked dense row")
    ap.add_argument("--out", default=None, type=out_file, help="append the JSON rows to this file")
    args = ap.parse_args(argv)
    device = checked_device(ap, args.device)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    if any(not 0.0 <= r < 1.0 for r in ratios):
        ap.error(f"--ratios must lie in [0, 1), got {ratios}")
    if args.backends is None:
        backends = default_backends()
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if any(b not in BACKENDS for b in backends):
            ap.error(f"--backends must come from {BACKENDS}, got {backends}")
        if "spconv" in backends and (why := spconv_missing()):
            ap.error(f"--backends spconv: {why}")
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    reps = args.reps or (20 if device.type == "cuda" else 5)
    dtype = AMP[args.amp]
    try:
        model = fastmim.create_model(args.model, head=False).to(device)
    except ValueError as e:
        ap.error(str(e))
    if args.img_size % 32:
        ap.error(f"--img-size must be a multiple of 32, got {args.img_size}")
    grid = (args.img_size // 32, args.img_size // 32)
    imgs = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    measure = call_timer(device, reps, args.warmup)
    env = environment(device)
    gen = torch.Generator().manual_seed(0)

    def bench(run, **fields) -> dict:
        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = run()
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = measure(step)
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
        row = {"benchmark": "sparse_conv", "model": args.model, "batch_size": batch, "img_size": args.img_size,
               "amp": args.amp, "pass": "fwd+bwd", **fields, "ms_median": round(statistics.median(times) * 1e3, 3),
               "ms_p20": round(q[0] * 1e3, 3), "ms_p80": round(q[-1] * 1e3, 3)}  # fmt: skip
        if device.type == "cuda":
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return row

    rows = []
    if not args.no_dense:
        rows.append(bench(lambda: model.forward_features(imgs), backend="dense", mask_ratio=0.0, visible=1.0))
    for ratio in ratios:
        visible = patch_visible(batch, grid, ratio, gen).to(device)
        per_sample = round(grid[0] * grid[1] * (1.0 - ratio))
        frac = float(visible.float().mean())
        for backend in backends:
            # the visible count per sample is known, as in FCMAE: the rows backends build their layouts without
            # host syncs
            run = lambda b=backend, v=visible, n=per_sample: sparse_forward(model, imgs, v, b, n)  # noqa: E731
            row = bench(run, backend=backend, mask_ratio=ratio, visible=round(frac, 4))
            row["ms_per_visible_fraction"] = round(row["ms_median"] / max(frac, 1e-9), 3)
            rows.append(row)
        ref = next((r for r in rows if r["backend"] == "dense_masked" and r["mask_ratio"] == ratio), None)
        for r in rows:
            if ref and r["mask_ratio"] == ratio and r["backend"] != "dense_masked" and r["backend"] != "dense":
                r["speedup_vs_dense_masked"] = round(ref["ms_median"] / r["ms_median"], 3)
    for r in rows:
        line = f"  ratio {r['mask_ratio']:<5} {r['backend']:<13} {r['ms_median']:9.2f} ms"
        if "speedup_vs_dense_masked" in r:
            line += f"   {r['speedup_vs_dense_masked']:.2f}x vs dense_masked"
        print(line, file=sys.stderr)
        write_row({**r, **env}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
