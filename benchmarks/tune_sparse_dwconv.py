"""Block sizes of the Triton sparse depthwise-conv kernels, measured on FCMAE's shapes (CUDA only).

    python benchmarks/tune_sparse_dwconv.py --out benchmarks/results/<dir>/tune.jsonl

For each stage of ConvNeXtV2-Base at 224 px (56x56x128, 28x28x256, 14x14x512, 7x7x1024), batch 64 and mask ratio
0.6 (19 of 49 32-px patches visible per sample, bf16 rows), times the forward kernel (``sparse_dwconv``) and the
weight-gradient kernel (``sparse_dwconv_wgrad``) for a few (BLOCK_M, BLOCK_C, num_warps) choices, the weight
gradient also with twice the default row splits, next to cuDNN's dense depthwise conv on the full channels-last map
of the same stage (what dense_masked pays). One JSON row per (kernel, stage, config); the defaults are marked. Never
asserts anything: it informs ``_fwd_blocks`` and ``_wgrad_blocks`` in fastmim/ops/triton/sparse_conv.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, out_file, write_row  # noqa: E402
from fastmim.ops import SparseLayout  # noqa: E402
from fastmim.ops.triton._common import target_programs  # noqa: E402

STAGES = [(56, 128), (28, 256), (14, 512), (7, 1024)]
FWD = [(32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (16, 128, 4), (32, 64, 4), (128, 128, 8)]
WGRAD = [(32, 128, 4), (64, 128, 8), (128, 64, 8), (64, 64, 4), (32, 64, 4)]


def tune_stage(vis: torch.Tensor, side: int, c: int, out: str | None, env: dict) -> None:
    """Rows of one stage: cuDNN's dense conv, then each forward and weight-gradient config."""
    from triton.testing import do_bench

    from fastmim.ops.triton import sparse_conv as kern

    dev = torch.device("cuda")
    b = vis.shape[0]
    rep = side // 7
    active = vis.repeat_interleave(rep, 1).repeat_interleave(rep, 2).to(dev)
    layout = SparseLayout.from_mask(active)
    nbr = layout.neighbors(7)
    m = layout.num_rows
    x = torch.randn(m, c, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(m, c, device=dev, dtype=torch.bfloat16)
    w = torch.randn(c, 1, 7, 7, device=dev)
    bias = torch.randn(c, device=dev)
    base = {"benchmark": "tune_sparse_dwconv", "stage": f"{side}x{side}x{c}", "batch_size": b, "rows": m,
            "visible_fraction": round(float(vis.float().mean()), 4)}  # fmt: skip
    dense = torch.randn(b, c, side, side, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    wd = w.bfloat16()
    ms = do_bench(lambda: F.conv2d(dense, wd, None, padding=3, groups=c))
    write_row({**base, "kernel": "cudnn dense fwd (full map)", "ms": round(ms, 4), **env}, out)
    default_fwd = kern._fwd_blocks(c)
    for cfg in dict.fromkeys([default_fwd, *FWD]):
        try:
            ms = do_bench(lambda cfg=cfg: kern.sparse_dwconv(x, nbr, w, bias, blocks=cfg))
        except Exception as e:  # a config the compiler rejects (shared memory) is reported, not fatal
            write_row({**base, "kernel": "fwd", "blocks": cfg, "error": str(e)[:200], **env}, out)
            continue
        gbps = 2 * m * c * 2 / ms / 1e6  # one read and one write of the rows, bf16
        write_row({**base, "kernel": "fwd", "blocks": cfg, "default": cfg == default_fwd, "ms": round(ms, 4),
                   "gbps_rows": round(gbps, 1), **env}, out)  # fmt: skip
    default_wg = kern._wgrad_blocks(c)
    for cfg in dict.fromkeys([default_wg, *WGRAD]):
        for split_mult in (1, 2):
            n_c = -(-c // cfg[1])
            programs = split_mult * -(-target_programs(dev) // (50 * n_c))
            try:
                ms = do_bench(lambda cfg=cfg, p=programs: kern.sparse_dwconv_wgrad(grad, x, nbr, p, blocks=cfg))
            except Exception as e:
                write_row({**base, "kernel": "wgrad", "blocks": cfg, "error": str(e)[:200], **env}, out)
                break
            write_row({**base, "kernel": "wgrad", "blocks": cfg, "splits": programs,
                       "default": cfg == default_wg and split_mult == 1, "ms": round(ms, 4), **env},
                      out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--visible", type=int, default=19, help="visible 32-px patches per sample, of 49")
    ap.add_argument("--out", default=None, type=out_file)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the Triton kernels' block sizes only matter there)")
    env = environment(torch.device("cuda"))
    b = args.batch_size
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(b, 49, generator=g).argsort(1)[:, : args.visible]
    vis = torch.zeros(b, 49, dtype=torch.bool).scatter_(1, ids, True).view(b, 7, 7).cuda()
    for side, c in STAGES:
        tune_stage(vis, side, c, args.out, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
