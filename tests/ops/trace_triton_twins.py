"""Traces the ops that have Triton twins the way torch.compile does (AOTAutograd, forward and backward graphs), on
meta tensors, with ``set_compiled_ops`` "opaque" and "triton", with static and with symbolic sizes; prints one JSON
line per (op, mode, dynamic) saying what the graphs hold. Runs without a GPU; TRITON_INTERPRET must be unset (the
interpreter's kernels cannot be traced).

    python tests/ops/trace_triton_twins.py

On a machine without a GPU Triton cannot lower a kernel to find which arguments it writes, so torch assumes all and
logs a warning per kernel (silenced here); the graphs are otherwise what inductor receives.
"""

from __future__ import annotations

import json
import logging
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be traced")

import torch  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch.fx import GraphModule  # noqa: E402

import fastmim.ops as ops  # noqa: E402
from fastmim.ops import reference as ref  # noqa: E402

logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)

B, N, K, D, P, C, IMG = 2, 16, 4, 24, 4, 3, 16
META = torch.device("meta")


def cases():
    """(name, fused function, reference function, inputs): each returns one tensor."""
    bf16 = torch.bfloat16

    def t(*shape, dtype=torch.float32, grad=True):
        return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)

    ids = torch.empty((B, K), dtype=torch.long, device=META)
    restore = torch.empty((B, N), dtype=torch.long, device=META)
    mask = torch.empty((B, N), dtype=torch.float32, device=META)
    yield "gather_visible", ops.gather_visible, ref.gather_visible_ref, [t(B, N, D, dtype=bf16), ids]
    yield (
        "scatter_masked",
        ops.scatter_masked,
        ref.scatter_masked_ref,
        [t(B, K, D, dtype=bf16), restore, t(D), t(N + 1, D), t(B, 1, D, dtype=bf16)],
    )
    imgs = t(B, C, IMG, IMG, grad=False)
    pred = t(B, (IMG // P) ** 2, P * P * C, dtype=bf16)
    mask_img = torch.empty((B, (IMG // P) ** 2), dtype=torch.float32, device=META)
    yield (
        "masked_mse_loss",
        lambda a, b, m: ops.masked_mse_loss(a, b, m, P),
        lambda a, b, m: ref.masked_mse_loss_ref(a, b, m, P),
        [pred, imgs, mask_img],
    )
    yield (
        "masked_mse_loss_patchified",
        ops.masked_mse_loss_patchified,
        ref.masked_mse_loss_patchified_ref,
        [t(B, N, D, dtype=bf16), t(B, N, D, grad=False), mask],
    )
    yield "patchify", lambda x: ops.patchify(x, P), lambda x: ref.patchify_ref(x, P), [t(B, C, IMG, IMG, dtype=bf16)]
    grid = (IMG // P, IMG // P)
    yield (
        "unpatchify",
        lambda x: ops.unpatchify(x, P, grid, C),
        lambda x: ref.unpatchify_ref(x, P, grid, C),
        [t(B, grid[0] * grid[1], P * P * C, dtype=bf16)],
    )


def summary(graphs: list[GraphModule]) -> dict:
    hops = fastmim = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(node.target)
            hops += "triton_kernel_wrapper" in name
            fastmim += name.startswith("fastmim.")
    return {"graphs": len(graphs), "triton_kernels": hops, "fastmim_ops": fastmim}


def trace(name, fused, reference, inputs, mode: str, dynamic: bool) -> dict:
    ops.set_compiled_ops(mode)
    graphs: list[GraphModule] = []

    def capture(gm, _example_inputs):
        graphs.append(gm)
        return gm

    fn = aot_function(lambda *a: fused(*a).float().sum(), fw_compiler=capture, bw_compiler=capture, dynamic=dynamic)
    leaves = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
    fn(*leaves).backward()
    out = fused(*[x.detach() if isinstance(x, torch.Tensor) else x for x in inputs])
    want = reference(*[x.detach() if isinstance(x, torch.Tensor) else x for x in inputs])
    grads = [tuple(x.grad.shape) for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    return {
        "op": name,
        "mode": mode,
        "dynamic": dynamic,
        **summary(graphs),
        "shape_ok": tuple(out.shape) == tuple(want.shape),
        "grads_ok": grads == [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad],
    }


def main() -> int:
    for case in cases():
        for mode in ("opaque", "triton"):
            for dynamic in (False, True):  # True: every size symbolic, as torch.compile(dynamic=True) traces
                print(json.dumps(trace(*case, mode, dynamic)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
