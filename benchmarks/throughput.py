"""End-to-end pretraining throughput of a recipe on synthetic data already on the device.

    python benchmarks/throughput.py --model mae_vit_base_patch16 --batch-size 256 --amp bf16

Times whole training steps (forward, backward, fused AdamW) after warm-up; prints and appends a JSON row (img/s,
peak memory, device, versions, commit, date) to --out. It measures the plain PyTorch MAE path (the
reference the fused ops replace, ``--reference``) or the recipe on fastmim.ops (the default, mode "fastmim").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastmim  # noqa: E402
from benchmarks.common import environment, write_row  # noqa: E402
from fastmim.train.optim import build_adamw  # noqa: E402


def flops_per_image(model) -> float:
    """Training FLOPs per image (forward + backward) of MAE: encoder on visible tokens, decoder on all tokens.

    Linear layers, the patch embedding and attention matmuls only (2 FLOPs per multiply-add)."""
    n = model.num_patches
    k = n - int(n * model.mask_ratio)
    d, dd = model.embed_dim, model.decoder_embed.out_features
    p2c = model.patch_size**2 * model.in_chans

    def blocks(depth, width, tokens):  # qkv + proj + mlp(4x) = 12 w^2 per token, attention 2 * t^2 * w
        return depth * (2 * 12 * width * width * tokens + 2 * 2 * tokens * tokens * width)

    embed = 2 * n * p2c * d  # patch embedding (all patches are embedded before the gather)
    fwd = blocks(len(model.blocks), d, k + 1)
    fwd += 2 * (k + 1) * d * dd + blocks(len(model.decoder_blocks), dd, n + 1) + 2 * (n + 1) * dd * p2c
    # backward costs 2x forward, except the patch embedding: its input (the images) needs no gradient
    return 3.0 * fwd + 2.0 * embed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_base_patch16")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (H100 measured: 790)")
    ap.add_argument("--reference", action="store_true", help="the plain PyTorch path instead of fastmim.ops")
    ap.add_argument("--out", default=None, help="append the JSON row to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = fastmim.create_model(args.model, img_size=args.img_size, fused_ops=not args.reference).to(device)
    opt = build_adamw(model, 1e-4, 0.05)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    ips = args.batch_size / med
    fpi = flops_per_image(model)
    mode = "reference" if args.reference else "fastmim"
    row = {"benchmark": "throughput", "mode": mode, "recipe": "mae", "model": args.model,
           "batch_size": args.batch_size, "img_size": args.img_size, "amp": args.amp,
           "img_per_s": round(ips, 1), "step_ms_median": round(med * 1e3, 2),
           "step_ms_p20": round(statistics.quantiles(times, n=5)[0] * 1e3, 2),
           "step_ms_p80": round(statistics.quantiles(times, n=5)[-1] * 1e3, 2),
           "gflop_per_img": round(fpi / 1e9, 2), "achieved_tflops": round(fpi * ips / 1e12, 1),
           **environment(device)}  # fmt: skip
    if args.peak_tflops:
        row["mfu"] = round(fpi * ips / (args.peak_tflops * 1e12), 4)
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    write_row(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
