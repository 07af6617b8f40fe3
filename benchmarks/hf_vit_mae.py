"""Hugging Face transformers' ``ViTMAEForPreTraining`` training step, as transformers runs it and patched by
``fastmim.integrations.patch_hf_vit_mae``: the same model (ViT-B/16 MAE by default: ``ViTMAEConfig()``), weights,
batch and noise; forward, backward and an AdamW step, bf16 autocast on a GPU, the two models timed in turns.

    python benchmarks/hf_vit_mae.py --batch-size 64 --out rows.jsonl

Target (issue 20): the patched step at least 1.3x faster on an H100/H200 and with less peak memory. One row per run:
``speedup`` = transformers' step time / the patched one's, ``*_peak_gb`` on CUDA. ``--compile``: both models under
``torch.compile`` (fastmim's ops are custom ops the compiler keeps), the row's ``compiled`` true; compare its
``fastmim_ms`` with an eager row's ``hf_ms`` for what patch + compile give together. ``--layers``: the patched model's
transformer layers on fastmim's fused block ops too (``patch_hf_vit_mae(model, layers=True)``), the row's ``layers``
true.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import call_timer, checked_device, environment, host, out_file, write_row  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size",
        choices=("base", "large", "tiny"),
        default="base",
        help="ViTMAE-Base (transformers' defaults), -Large, or a tiny one for a smoke run",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 on a GPU, 8 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per model (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (after patching)")
    ap.add_argument("--layers", action="store_true", help="the patched model's layers on the fused block ops too")
    ap.add_argument("--out", default=None, type=out_file, help="append the JSON row to this file")
    args = ap.parse_args(argv)
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError:
        ap.error("transformers is not installed: pip install 'fastmim[hf]'")
    from fastmim.integrations import patch_hf_vit_mae

    device = checked_device(ap, args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size if args.batch_size is not None else (64 if gpu else 8)
    reps = args.reps if args.reps is not None else (20 if gpu else 3)
    if batch < 1 or reps < 1:
        ap.error("--batch-size and --reps must be at least 1")
    shapes = {"base": {}, "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096),
              "tiny": dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                           decoder_num_hidden_layers=1)}[args.size]  # fmt: skip
    cfg = ViTMAEConfig(norm_pix_loss=True, **shapes)
    torch.manual_seed(0)
    ref = ViTMAEForPreTraining(cfg).to(device).train()
    ours = patch_hf_vit_mae(copy.deepcopy(ref), layers=args.layers)
    imgs = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    noise = torch.rand(batch, (cfg.image_size // cfg.patch_size) ** 2, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, fused=gpu) for m in (ref, ours)}
    if args.compile:  # the optimizers hold the parameters; the compiled wrappers share them
        compiled = {id(m): torch.compile(m) for m in (ref, ours)}
        opts = {id(compiled[k]): v for k, v in ((k, opts[k]) for k in compiled)}
        ref, ours = compiled[id(ref)], compiled[id(ours)]

    def step(model):
        with amp:
            loss = model(pixel_values=imgs, noise=noise).loss
        loss.backward()
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)

    times = call_timer(device, 1, warmup=0)
    for m in (ref, ours):  # warm-up: allocator, kernels, AdamW state
        for _ in range(3):
            step(m)
    runs = {"hf": [], "fastmim": []}
    peaks = {}
    for _ in range(reps):  # in turns, so drift (clocks, other load) hits both
        for name, m in (("hf", ref), ("fastmim", ours)):
            runs[name] += times(lambda m=m: step(m))
    for name, m in (("hf", ref), ("fastmim", ours)):
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(m)
            torch.cuda.synchronize(device)
            peaks[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    hf_ms, ours_ms = (statistics.median(runs[k]) * 1e3 for k in ("hf", "fastmim"))
    import transformers

    row = {"benchmark": "hf_vit_mae", "model": f"ViTMAE-{args.size}", "batch_size": batch, "compiled": args.compile,
           "layers": args.layers,
           "amp": "bf16" if gpu else "none", "hf_ms": round(hf_ms, 2), "fastmim_ms": round(ours_ms, 2),
           "speedup": round(hf_ms / ours_ms, 3), "hf_img_per_s": round(batch / hf_ms * 1e3, 1),
           "fastmim_img_per_s": round(batch / ours_ms * 1e3, 1), "reps": reps, "transformers": transformers.__version__,
           **({"hf_peak_gb": peaks["hf"], "fastmim_peak_gb": peaks["fastmim"]} if gpu else host()),
           **environment(device)}  # fmt: skip
    write_row(row, args.out)
    what = (" (both compiled)" if args.compile else "") + (", layers fused" if args.layers else "")
    print(f"ViTMAE-{args.size} training step{what}, batch {batch} on {row['device']}: transformers {hf_ms:.1f} ms, "
          f"patched {ours_ms:.1f} ms ({row['speedup']}x; target 1.3x on an H100/H200)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
