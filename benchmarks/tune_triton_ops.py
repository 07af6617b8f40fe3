"""Block sizes of the Triton kernels of fastmim.ops at MAE ViT-B/16's shapes (CUDA only).

    python benchmarks/tune_triton_ops.py --out benchmarks/results/<dir>/tune_triton_ops.jsonl [--kernels patchify,...]

Times each tile choice with CUDA-graph replay and reports GB/s (bytes the kernel cannot avoid) and the fraction of
the copy bandwidth measured in the same run; the default choice is marked (``default: true``). One JSON row per
(kernel, dtype, config). Never asserts anything: it informs the defaults.

- patchify / unpatchify: B=256 224-px RGB images, 16-px patches, fp32 and bf16; (form, BLOCK or BLOCK_C, BLOCK_W,
  num_warps) of ``fastmim/ops/triton/patchify.py``: the flat kernel (default ``patchify.blocks``) against the strip
  kernel it replaced (``patchify.strip_blocks``); auto's backend for patchify on CUDA.
- gather / gather_bwd: [256, 196, 768] -> 49 visible rows (fp32 and bf16); (BLOCK_K, BLOCK_D, num_warps).
- scatter / scatter_bwd: [256, 49, 512] bf16 -> [256, 197, 512] fp32 with position embedding and class token;
  (BLOCK_R, BLOCK_D, num_warps) and, backward, (BLOCK_R, BLOCK_D, B_CHUNK, num_warps).
- loss / loss_bwd: MAE's norm-pix MSE of bf16 predictions [256, 196, 768] on fp32 images, 75% masked;
  (BLOCK_P, num_warps) of ``fastmim/ops/triton/masked_loss.py``.

The token and loss kernels run where fastmim._cuda is not built (auto prefers the CUDA kernels measured faster); these
rows say whether their defaults are the best Triton can do on the GPU of the run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import copy_bandwidth, environment, out_file, write_row  # noqa: E402

# patchify's (form, a, b, num_warps): the flat kernel's BLOCK (its default first), and the strip kernel's tiles
PATCHIFY_CONFIGS = [("flat", 1024, 0, 4), ("flat", 2048, 0, 8), ("flat", 512, 0, 4), ("flat", 4096, 0, 8),
                    ("flat", 1024, 0, 8), ("strip", 1, 256, 4), ("strip", 4, 256, 8), ("strip", 4, 512, 8)]  # fmt: skip
# (rows, BLOCK_D, num_warps) for the row copies of gather/scatter; (BLOCK_P, num_warps) for the loss
ROW_CONFIGS = [(4, 1024, 4), (8, 1024, 8), (16, 1024, 8), (2, 1024, 4), (1, 1024, 4), (8, 512, 4), (16, 256, 4),
               (32, 256, 8), (64, 128, 8)]  # fmt: skip
SCATTER_BWD_CONFIGS = [(4, 512, 8, 4), (4, 512, 16, 4), (8, 512, 8, 8), (2, 512, 8, 4), (4, 512, 4, 4),
                       (16, 256, 8, 8), (8, 256, 16, 4)]  # fmt: skip
# the loss: one warp per program keeps a patch's sums (mean, variance, loss) inside a warp: no shared-memory rounds
LOSS_CONFIGS = [(4, 4), (4, 8), (2, 4), (1, 4), (8, 8), (16, 8), (1, 2), (2, 2), (1, 1), (2, 1), (4, 1)]
KERNELS = ("patchify", "unpatchify", "gather", "gather_bwd", "scatter", "scatter_bwd", "loss", "loss_bwd")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=None, type=out_file)
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    args = ap.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        ap.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    if not torch.cuda.is_available():
        ap.error("the sweep times CUDA kernels: no GPU is visible")
    from triton.testing import do_bench_cudagraph

    dev = torch.device("cuda")
    env = environment(dev)
    copy_gbps = copy_bandwidth(dev, lambda fn: do_bench_cudagraph(fn, rep=20, return_mode="median"), 1024)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", file=sys.stderr)

    def time(kernel, dtype, shape, names, cfg, default, nbytes, run):
        ms = do_bench_cudagraph(run, rep=20, return_mode="median")
        gbps = nbytes / (ms * 1e-3) / 1e9
        row = {"benchmark": "tune_triton_ops", "kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
               "shape": shape, **dict(zip(names, cfg, strict=True)), "default": cfg == default,
               "ms_graph": round(ms, 4), "gbps": round(gbps, 1), "fraction_of_copy_bw": round(gbps / copy_gbps, 3),
               **env}  # fmt: skip
        write_row(row, args.out)

    for name, sweep in _sweeps(args.batch_size, dev, kernels):
        for kernel, dtype, shape, names, default, configs, nbytes, launch in sweep():
            for cfg in dict.fromkeys([default, *configs]):
                time(kernel, dtype, shape, names, cfg, default, nbytes, functools.partial(launch, cfg))
        print(f"{name}: done", file=sys.stderr)
    return 0


def _sweeps(b: int, dev: torch.device, kernels: list[str]):
    """(group name, generator of (kernel, dtype, shape, config names, default, configs, bytes, launch(config)))."""
    from fastmim.ops.masked_loss import _geometry
    from fastmim.ops.triton import masked_loss as loss_k
    from fastmim.ops.triton import patchify as patch_k
    from fastmim.ops.triton import tokens as tok_k

    gen = torch.Generator(device=dev).manual_seed(0)
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731

    def patchify():
        c, side, p = 3, 224, 16
        default = patch_k.blocks(c, side)
        configs = PATCHIFY_CONFIGS + [patch_k.strip_blocks(c, side)]
        for dtype in (torch.float32, torch.bfloat16):
            imgs = torch.randn(b, c, side, side, device=dev, dtype=dtype, generator=gen)
            pat = patch_k.patchify(imgs, p)
            for kernel, launch in (
                ("patchify", lambda cfg, imgs=imgs: patch_k.patchify(imgs, p, cfg)),
                ("unpatchify", lambda cfg, pat=pat: patch_k.unpatchify(pat, p, (side // p, side // p), c, cfg)),
            ):
                if kernel in kernels:
                    yield (kernel, dtype, f"B{b} {side}px p{p}", ("form", "block", "block_w", "num_warps"), default,
                           configs, 2 * nbytes(imgs), launch)  # fmt: skip

    def tokens():
        n, k, d = 196, 49, 768
        names = ("block_rows", "block_d", "num_warps")
        ids_keep = torch.rand(b, n, device=dev, generator=gen).argsort(1)[:, :k]
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(b, n, d, device=dev, dtype=dtype)
            g = torch.randn(b, k, d, device=dev, dtype=dtype)
            default = tok_k.row_config(d)
            if "gather" in kernels:
                yield (
                    "gather",
                    dtype,
                    f"B{b} N{n} K{k} D{d}",
                    names,
                    default,
                    ROW_CONFIGS,
                    2 * nbytes(g),
                    lambda cfg, x=x: tok_k.gather_visible(x, ids_keep, cfg),
                )
            if "gather_bwd" in kernels:
                yield (
                    "gather_bwd",
                    dtype,
                    f"B{b} N{n} K{k} D{d}",
                    names,
                    default,
                    ROW_CONFIGS,
                    nbytes(g, x),
                    lambda cfg, g=g: tok_k.gather_visible_backward(g, ids_keep, n, cfg),
                )
        dd = 512
        noise = torch.rand(b, n, device=dev, generator=gen)
        ids_restore = noise.argsort(1).argsort(1)
        x_vis = torch.randn(b, k, dd, device=dev, dtype=torch.bfloat16)
        mt = torch.randn(dd, device=dev)
        pos = torch.randn(n + 1, dd, device=dev)
        cls = torch.randn(1, dd, device=dev)
        out = torch.empty(b, n + 1, dd, device=dev)
        shape = f"B{b} K{k} N{n}+cls D{dd}"
        if "scatter" in kernels:
            yield (
                "scatter",
                torch.bfloat16,
                shape,
                names,
                tok_k.row_config(dd),
                ROW_CONFIGS,
                nbytes(x_vis, out),
                lambda cfg: tok_k.scatter_masked(x_vis, ids_restore, mt, pos, cls, torch.float32, cfg),
            )
        if "scatter_bwd" in kernels:
            grad = torch.randn(b, n + 1, dd, device=dev)
            yield (
                "scatter_bwd",
                torch.bfloat16,
                shape,
                ("block_r", "block_d", "b_chunk", "num_warps"),
                tok_k.scatter_bwd_config(dd),
                SCATTER_BWD_CONFIGS,
                nbytes(grad, x_vis),
                lambda cfg: tok_k.scatter_masked_backward(grad, ids_restore, k, True, True, torch.bfloat16, cfg),
            )

    def loss():
        side, p, n, d = 224, 16, 196, 768
        imgs = torch.randn(b, 3, side, side, device=dev)
        pred = torch.randn(b, n, d, device=dev, dtype=torch.bfloat16)
        mask = (torch.rand(b, n, device=dev, generator=gen) < 0.75).float()
        geometry = _geometry(imgs, p)
        masked = int(mask.sum().item())
        read = masked * d * (pred.element_size() + imgs.element_size())  # weight-0 patches are never read
        shape = f"B{b} L{n} D{d} 75% masked"
        default = loss_k.blocks(d)
        names = ("block_p", "num_warps")
        if "loss" in kernels:
            yield (
                "loss",
                torch.bfloat16,
                shape,
                names,
                default,
                LOSS_CONFIGS,
                read,
                lambda cfg: loss_k.masked_loss_forward(pred, imgs, mask, geometry, True, 1e-6, 2, cfg),
            )
        if "loss_bwd" in kernels:
            gl = torch.ones((), device=dev)
            denom = mask.sum()
            yield (
                "loss_bwd",
                torch.bfloat16,
                shape,
                names,
                default,
                LOSS_CONFIGS,
                read + nbytes(pred),
                lambda cfg: loss_k.masked_loss_backward(gl, pred, imgs, mask, denom, geometry, True, 1e-6, 2, cfg),
            )

    return [("patchify", patchify), ("tokens", tokens), ("loss", loss)]


if __name__ == "__main__":
    sys.exit(main())
