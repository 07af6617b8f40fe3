"""Runs every fastmim._cuda kernel once, forward and backward, at small odd shapes and at MAE shapes (B=4): a
workload for ``compute-sanitizer`` (memcheck: no out-of-bounds access, racecheck: no shared-memory race), which the
GPU suite runs it under. Compares each result with the reference too, and exits 1 on a mismatch.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/ops/run_cuda_kernels.py
"""

from __future__ import annotations

import os
import sys

os.environ["FASTMIM_BACKEND"] = "cuda"

import torch  # noqa: E402

from fastmim.masking import random_masking  # noqa: E402
from fastmim.ops import (  # noqa: E402
    gather_visible,
    gather_visible_ref,
    masked_mse_loss,
    masked_mse_loss_ref,
    patchify,
    patchify_ref,
    scatter_masked,
    scatter_masked_ref,
)


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> bool:
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    ok = err <= tol
    print(f"{'ok ' if ok else 'BAD'} {what}: relative error {err:.2e}")
    return ok


def main() -> int:
    ok = True
    g = torch.Generator().manual_seed(0)
    for b, n, d, ratio, dt in ((3, 13, 7, 0.6, torch.float32), (4, 196, 768, 0.75, torch.bfloat16)):
        info = random_masking(b, n, ratio, generator=g)
        ids_keep, ids_restore, mask = (t.cuda() for t in (info.ids_keep, info.ids_restore, info.mask))
        k = ids_keep.shape[1]
        x = torch.randn(b, n, d, generator=g).to("cuda", dt).requires_grad_()
        out = gather_visible(x, ids_keep)
        out.float().sum().backward()
        ok &= close(out, gather_visible_ref(x.detach(), ids_keep), f"gather {tuple(x.shape)} {dt}", 0)
        xv = torch.randn(b, k, d, generator=g).to("cuda", dt).requires_grad_()
        mt = torch.randn(d, generator=g).cuda().requires_grad_()
        cls = torch.randn(b, 1, d, generator=g).to("cuda", dt).requires_grad_()
        pos = torch.randn(n + 1, d, generator=g).cuda().requires_grad_()
        out = scatter_masked(xv, ids_restore, mt, pos, cls)
        out.sum().backward()
        ref = scatter_masked_ref(xv.detach(), ids_restore, mt.detach(), pos.detach(), cls.detach())
        ok &= close(out, ref, f"scatter {tuple(out.shape)} {dt}", 1e-6)
        ok &= close(mt.grad, (~(ids_restore < k)).sum() * torch.ones_like(mt), "scatter mask-token grad", 1e-6)
        p = 16 if d == 768 else 1
        side = int(n**0.5) * p if d == 768 else None
        if side:
            imgs = torch.randn(b, 3, side, side, generator=g).cuda()
            pred = torch.randn(b, n, d, generator=g).to("cuda", dt).requires_grad_()
            loss = masked_mse_loss(pred, imgs, mask, p)
            loss.backward()
            ok &= close(loss, masked_mse_loss_ref(pred.detach(), imgs, mask, p), "loss", 1e-3)
            patches = patchify(imgs, p)
            ok &= close(patches, patchify_ref(imgs, p), "patchify", 0)
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
