"""Host time per call of the fused ops on a GPU, and of the pieces a call is made of, on tiny tensors (the GPU then
finishes each kernel long before the next launch: every number is host time). Explains the ``host_us`` column of
benchmarks/ops.py: how much is ours (checks, backend choice, the extension call) and how much is PyTorch's
(autograd.Function, the autograd engine's backward, an allocation, a launch).

    python benchmarks/host_overhead.py --out /tmp/host_overhead.jsonl   # (a results/<date>-<device>-<commit>/ folder
                                                                         # for rows to keep)

Each row: what was called, the backend, us per call (median of 5 rounds of ``--calls`` calls, one sync per round),
``calls``, the host's CPU model and cores.
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

from benchmarks.common import checked_device, environment, host, out_file, positive_int, write_row  # noqa: E402
from fastmim import _ext  # noqa: E402
from fastmim.masking import random_masking  # noqa: E402
from fastmim.ops import add_layer_norm, gather_visible, masked_mse_loss, patchify, scatter_masked  # noqa: E402
from fastmim.ops._dispatch import choose_backend, set_backend  # noqa: E402


def per_call_us(fn, device: torch.device, calls: int) -> float:
    for _ in range(20):
        fn()
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def _direct_launch(on: bool) -> bool:
    """Turns fastmim's direct Triton launches on or off; returns the previous setting (True without triton)."""
    try:
        from fastmim.ops.triton import _launch
    except ImportError:
        return True
    prev, _launch.DIRECT = _launch.DIRECT, on
    return prev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=positive_int, default=200)
    ap.add_argument("--out", default=None, type=out_file)
    args = ap.parse_args(argv)
    device = checked_device(ap, args.device)
    env = environment(device)
    b, n, d = 2, 16, 64
    info = random_masking(b, n, 0.75, device=device)
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    xv = torch.randn(b, 4, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    mt = torch.randn(d, device=device, requires_grad=True)
    cls = torch.randn(b, 1, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(n + 1, d, device=device)
    pred = torch.randn(b, n, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    imgs = torch.randn(b, 3, 16, 16, device=device)
    g_gather = torch.ones(b, 4, d, device=device)
    g_scatter = torch.ones(b, n + 1, d, device=device)
    g_full = torch.ones(b, n, d, device=device)
    ln_w = torch.ones(d, device=device, requires_grad=True)
    ln_b = torch.zeros(d, device=device, requires_grad=True)

    cases = {
        "torch.empty": lambda: torch.empty((b, 4, d), device=device),
        "x.view": lambda: x.view(b * n, d),
        "x.mul(1) (one launch)": lambda: x.detach().mul(1.0),
        "autograd.grad of x.mul(1)": lambda: torch.autograd.grad(x.mul(1.0), [x], torch.ones_like(x)),
        "choose_backend": lambda: choose_backend("gather_visible", device, (torch.float32,)),
    }
    # "triton-jit": the Triton kernels launched through triton's own path (FASTMIM_TRITON_LAUNCH=jit), against
    # fastmim's cached direct launches ("triton")
    backends = ["cuda", "triton", "triton-jit"] if device.type == "cuda" else ["cpp"]
    if device.type == "cuda" and not _ext.cuda_available():
        backends.remove("cuda")
    for name in backends:
        cases |= {
            f"gather fwd, no grad [{name}]": lambda: gather_visible(x.detach(), info.ids_keep),
            f"gather fwd [{name}]": lambda: gather_visible(x, info.ids_keep),
            f"gather fwd+bwd [{name}]": lambda: torch.autograd.grad(gather_visible(x, info.ids_keep), [x], g_gather),
            f"scatter fwd, no grad [{name}]": lambda: scatter_masked(xv.detach(), info.ids_restore, mt.detach(),
                                                                      pos, cls.detach()),
            f"scatter fwd [{name}]": lambda: scatter_masked(xv, info.ids_restore, mt, pos, cls),
            f"scatter fwd+bwd [{name}]": lambda: torch.autograd.grad(
                scatter_masked(xv, info.ids_restore, mt, pos, cls), [xv, mt, cls], g_scatter),
            f"loss fwd [{name}]": lambda: masked_mse_loss(pred, imgs, info.mask, 4),
            f"loss fwd+bwd [{name}]": lambda: torch.autograd.grad(masked_mse_loss(pred, imgs, info.mask, 4), [pred]),
        }  # fmt: skip
        if name.startswith("triton"):
            cases[f"patchify fwd, no grad [{name}]"] = lambda: patchify(imgs, 4)
            cases[f"add_layer_norm fwd+bwd [{name}]"] = lambda: torch.autograd.grad(
                add_layer_norm(x, x, ln_w, ln_b)[0], [x, ln_w], g_full
            )
    print(f"{'call':40} {'us/call':>9}")
    for what, fn in cases.items():
        backend = what[what.index("[") + 1 : -1] if what.endswith("]") else None
        prev = set_backend(backend.removesuffix("-jit")) if backend else None
        direct = _direct_launch(backend != "triton-jit")
        try:
            us = per_call_us(fn, device, args.calls)
        finally:
            _direct_launch(direct)
            if backend:
                set_backend(prev)
        print(f"{what:40} {us:9.1f}")
        # (the host's CPU decides a host time: its model and cores)
        row = {"benchmark": "host_overhead", "call": what, "us_per_call": round(us, 2), "calls": args.calls}
        write_row({**row, **host(), **env}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
