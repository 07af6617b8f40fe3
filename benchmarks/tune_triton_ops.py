"""Block sizes of the Triton patchify kernel (the backend auto picks for patchify on CUDA), measured at MAE's shapes
(CUDA only).

    python benchmarks/tune_triton_ops.py --out benchmarks/results/<dir>/tune_triton_ops.jsonl

For patchify and unpatchify of B=256 224-px RGB images with 16-px patches, fp32 and bf16, times each (BLOCK_C,
BLOCK_W, num_warps) choice of ``fastmim/ops/triton/patchify.py`` with CUDA-graph replay and reports GB/s and the
fraction of the copy bandwidth measured in the same run; the default (``patchify.blocks``) is marked. One JSON row per
(direction, dtype, config). Never asserts anything: it informs ``blocks``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import copy_bandwidth, environment, write_row  # noqa: E402

CONFIGS = [(1, 256, 4), (2, 256, 4), (4, 256, 8), (1, 256, 2), (1, 128, 4), (4, 128, 4), (2, 512, 8), (4, 512, 8),
           (1, 1024, 8)]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("the sweep times CUDA kernels: no GPU is visible")
    from triton.testing import do_bench_cudagraph

    from fastmim.ops.triton import patchify as kern

    dev = torch.device("cuda")
    env = environment(dev)
    copy_gbps = copy_bandwidth(dev, lambda fn: do_bench_cudagraph(fn, rep=20, return_mode="median"), 1024)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", file=sys.stderr)
    b, c, side, p = args.batch_size, 3, 224, 16
    default = kern.blocks(c, side)
    for dtype in (torch.float32, torch.bfloat16):
        imgs = torch.randn(b, c, side, side, device=dev, dtype=dtype)
        pat = torch.empty(b, (side // p) ** 2, p * p * c, device=dev, dtype=dtype)
        nbytes = 2 * imgs.numel() * imgs.element_size()
        for to_patches in (True, False):
            for cfg in dict.fromkeys([default, *CONFIGS]):
                run = functools.partial(kern._run, imgs, pat, p, to_patches, cfg)
                ms = do_bench_cudagraph(run, rep=20, return_mode="median")
                gbps = nbytes / (ms * 1e-3) / 1e9
                row = {"benchmark": "tune_triton_ops", "kernel": "patchify" if to_patches else "unpatchify",
                       "dtype": str(dtype).removeprefix("torch."), "shape": f"B{b} {side}px p{p}",
                       "block_c": cfg[0], "block_w": cfg[1], "num_warps": cfg[2], "default": cfg == default,
                       "ms_graph": round(ms, 4), "gbps": round(gbps, 1),
                       "fraction_of_copy_bw": round(gbps / copy_gbps, 3), **env}  # fmt: skip
                write_row(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
