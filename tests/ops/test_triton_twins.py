"""The Triton twins of the token ops, the masked losses and patchify (``torch.library.triton_op``): with
``set_compiled_ops("triton")`` torch.compile records their Triton kernels in the graph for inductor to launch, instead
of calling the opaque custom ops (issue 14, item 4)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmim.ops as ops
from fastmim.masking import random_masking
from fastmim.ops import _dispatch, masked_loss, reference, tokens
from fastmim.ops._dispatch import traced_op, triton_available, triton_interpreted

ROOT = Path(__file__).resolve().parents[2]
patchify = sys.modules["fastmim.ops.patchify"]  # the module (fastmim.ops.patchify is also the function)
HAS_TWINS = getattr(torch.library, "triton_op", None) is not None and triton_available() is None
needs_twins = pytest.mark.skipif(not HAS_TWINS, reason="needs triton and torch.library.triton_op (torch 2.6+)")
BF16 = (torch.bfloat16,)
TWIN_OPS = {"gather_visible", "scatter_masked", "masked_mse_loss", "masked_mse_loss_patchified", "patchify",
            "unpatchify"}  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_mode():
    prev = ops.set_compiled_ops(None)
    yield
    ops.set_compiled_ops(prev)


@needs_twins
def test_compiled_ops_triton_puts_the_kernels_in_the_graph_and_opaque_the_ops(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "tests/ops/trace_triton_twins.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    want = {(op, m, dyn) for op in TWIN_OPS for m in ("opaque", "triton") for dyn in (False, True)}
    assert {(row["op"], row["mode"], row["dynamic"]) for row in rows} == want
    for row in rows:
        assert row["graphs"] == 2 and row["shape_ok"] and row["grads_ok"], row
        if row["mode"] == "triton":  # forward and backward kernels in the graphs, no opaque fastmim op left
            assert row["triton_kernels"] >= 2 and row["fastmim_ops"] == 0, row
        else:
            assert row["triton_kernels"] == 0 and row["fastmim_ops"] >= 2, row


def test_traced_op_picks_the_twin_only_where_its_kernels_would_run(monkeypatch):
    opaque, twin = object(), object()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: False)
    monkeypatch.delenv("FASTMIM_COMPILED_OPS", raising=False)
    monkeypatch.setattr(_dispatch, "AUTO_COMPILED", {"patchify": "triton"})
    assert _dispatch.compiled_ops() == "auto"  # the default: per op, what measured faster
    assert traced_op("gather_visible", opaque, twin, cuda, BF16) is opaque  # not in the table: opaque
    assert traced_op("patchify", opaque, twin, cuda, BF16) is twin
    ops.set_compiled_ops("opaque")
    assert traced_op("patchify", opaque, twin, cuda, BF16) is opaque
    ops.set_compiled_ops("triton")
    assert traced_op("gather_visible", opaque, twin, cuda, BF16) is twin
    assert traced_op("gather_visible", opaque, twin, torch.device("meta"), BF16) is twin
    assert traced_op("gather_visible", opaque, twin, cpu, BF16) is opaque  # CPU tensors run the C++ kernels
    assert traced_op("gather_visible", opaque, None, cuda, BF16) is opaque  # no twin (torch before 2.6)
    # float64 (not a kernel dtype): the opaque op, which runs the reference (a twin would round to fp32)
    assert traced_op("gather_visible", opaque, twin, cuda, (torch.float64,)) is opaque
    prev = ops.set_backend("cuda")  # a forced backend other than Triton keeps the opaque op
    try:
        assert traced_op("gather_visible", opaque, twin, cuda, BF16) is opaque
        ops.set_backend("triton")
        assert traced_op("gather_visible", opaque, twin, cuda, BF16) is twin
    finally:
        ops.set_backend(prev)
    monkeypatch.setattr(_dispatch, "triton_interpreted", lambda: True)
    assert traced_op("gather_visible", opaque, twin, cuda, BF16) is opaque  # the interpreter's kernels cannot be traced


def test_compiled_ops_setting_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="set_compiled_ops: 'fast' is not one of auto, opaque, triton"):
        ops.set_compiled_ops("fast")
    monkeypatch.setenv("FASTMIM_COMPILED_OPS", "Triton")
    assert _dispatch.compiled_ops() == "triton"
    assert ops.set_compiled_ops("opaque") is None
    assert _dispatch.compiled_ops() == "opaque"  # the setting wins over the environment
    ops.set_compiled_ops(None)
    monkeypatch.setenv("FASTMIM_COMPILED_OPS", "inductor")
    with pytest.raises(ValueError, match="FASTMIM_COMPILED_OPS='inductor' is not one of auto, opaque, triton"):
        _dispatch.compiled_ops()
    # refused when compiling on CPU too (it was read only for CUDA and meta tensors: ignored on CPU)
    compiled = torch.compile(lambda x, i: ops.gather_visible(x, i), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="FASTMIM_COMPILED_OPS='inductor' is not one of"):
        compiled(torch.randn(2, 4, 3), torch.tensor([[0, 1], [2, 3]]))
    for setter in (ops.set_compiled_ops, ops.set_backend):
        with pytest.raises(TypeError, match=rf"{setter.__name__}: expected a name \(str\) or None, got int 3"):
            setter(3)


def _twin_cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    b, n, d, p, c, img = 3, 16, 40, 4, 3, 16

    def t(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device, dt).requires_grad_(grad)

    info = random_masking(b, n, 0.75, device=device, generator=torch.Generator().manual_seed(1))
    k = info.ids_keep.shape[1]
    imgs = t(b, c, img, img, grad=False, dt=torch.float32)
    mask = info.mask.to(device)
    yield "gather_visible", tokens._gather_visible_twin, reference.gather_visible_ref, (t(b, n, d), info.ids_keep)
    args = (t(b, k, d), info.ids_restore, t(d, dt=torch.float32), t(n + 1, d, dt=torch.float32), t(b, d))
    yield "scatter_masked", tokens._scatter_masked_twin, reference.scatter_masked_ref, args
    pred = t(b, n, p * p * c)
    yield (
        "masked_mse_loss",
        lambda *a: masked_loss._masked_loss_twin(*a, p, True, 1e-6, 2)[0],
        lambda *a: reference.masked_mse_loss_ref(*a, p, True, 1e-6, 2),
        (pred, imgs, mask),
    )
    yield (
        "masked_mse_loss_patchified",
        lambda *a: masked_loss._masked_loss_twin(*a, 0, False, 1e-6, 1)[0],
        lambda *a: reference.masked_mse_loss_patchified_ref(*a, False, 1e-6, 1),
        (t(b, n, d), t(b, n, d, grad=False, dt=torch.float32), mask),
    )
    yield (
        "patchify",
        lambda x: patchify._patchify_twin(x, p),
        lambda x: reference.patchify_ref(x, p),
        (t(b, c, img, img),),
    )
    yield (
        "unpatchify",
        lambda x: patchify._unpatchify_twin(x, p, img // p, img // p, c),
        lambda x: reference.unpatchify_ref(x, p, (img // p, img // p), c),
        (t(b, n, p * p * c),),
    )


def _check_twins(device, dtype, tol):
    seen = set()
    for name, twin, ref_fn, args in _twin_cases(device, dtype):
        seen.add(name)
        out = twin(*args)
        leaves = [a for a in args if a.is_floating_point() and a.requires_grad]
        ref_args = [a.detach().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
        want = ref_fn(*ref_args)
        torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol, msg=name)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
        got = torch.autograd.grad((out.float() * probe).sum(), leaves)
        ref_leaves = [a for a in ref_args if a.is_floating_point() and a.requires_grad]
        expected = torch.autograd.grad((want.float() * probe).sum(), ref_leaves)
        for i, (gg, ge) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(gg.float(), ge.float(), atol=tol, rtol=tol, msg=f"{name} grad {i}")
    assert seen == TWIN_OPS


@needs_twins
@pytest.mark.skipif(not triton_interpreted(), reason="TRITON_INTERPRET=1 is not set: Triton cannot run CPU tensors")
def test_twins_run_eagerly_and_match_the_references_on_cpu():
    """Called outside torch.compile a twin launches its kernels directly: values and gradients as the references."""
    _check_twins(torch.device("cpu"), torch.float32, 1e-5)


@needs_twins
@pytest.mark.skipif(not triton_interpreted(), reason="TRITON_INTERPRET=1 is not set: Triton cannot run CPU tensors")
def test_twins_second_derivatives_match_the_opaque_ops_on_cpu():
    """Through a twin (what inductor records with compiled ops "triton") a second derivative works where the opaque
    op's does (the linear ops: equal to the reference's) and raises naming the op where it has none (the loss)."""
    for name, twin, ref_fn, args in _twin_cases(torch.device("cpu"), torch.float32):
        leaves = [a for a in args if a.is_floating_point() and a.requires_grad]
        first = torch.autograd.grad(twin(*args).square().sum(), leaves, create_graph=True)
        total = sum(g.square().sum() for g in first)
        if name.startswith("masked_mse_loss"):
            with pytest.raises(RuntimeError, match=r"masked_mse_loss.* has no second derivative.*_ref"):
                torch.autograd.grad(total, leaves, allow_unused=True)
            continue
        ref_args = [a.detach().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
        ref_leaves = [a for a in ref_args if a.is_floating_point() and a.requires_grad]
        ref_first = torch.autograd.grad(ref_fn(*ref_args).square().sum(), ref_leaves, create_graph=True)
        want = torch.autograd.grad(sum(g.square().sum() for g in ref_first), ref_leaves)
        for i, (got, exp) in enumerate(zip(torch.autograd.grad(total, leaves), want, strict=True)):
            torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4, msg=f"{name} second derivative {i}")


@pytest.mark.gpu
@needs_twins
def test_triton_twins_compiled_by_inductor_match_the_opaque_ops_on_a_gpu():
    """On a GPU: eager twins against the references, then an MAE-like loss compiled both ways, same values and
    gradients (inductor launching fastmim's Triton kernels against the opaque ops)."""
    device = torch.device("cuda")
    _check_twins(device, torch.bfloat16, 2e-2)
    b, n, d, p = 8, 196, 64, 16
    info = random_masking(b, n, 0.75, device=device, generator=torch.Generator().manual_seed(0))
    g = torch.Generator(device=device).manual_seed(0)
    imgs = torch.randn(b, 3, 224, 224, device=device, generator=g)
    x = torch.randn(b, n, d, device=device, generator=g, dtype=torch.bfloat16)
    mt = torch.randn(d, device=device, generator=g)
    pos = torch.randn(n + 1, d, device=device, generator=g)
    cls = torch.randn(b, 1, d, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(d, p * p * 3, device=device, generator=g, dtype=torch.bfloat16) / d**0.5

    def step(x, mt, pos, cls, w):
        vis = ops.gather_visible(x, info.ids_keep)
        dec = ops.scatter_masked(vis, info.ids_restore, mt, pos, cls)[:, 1:]
        pred = (dec.to(torch.bfloat16) @ w) + ops.patchify(imgs, p).to(torch.bfloat16) * 0.01
        return ops.masked_mse_loss(pred, imgs, info.mask, p)

    results = {}
    for mode in ("opaque", "triton"):
        ops.set_compiled_ops(mode)
        torch._dynamo.reset()
        leaves = [t.detach().clone().requires_grad_() for t in (x, mt, pos, cls, w)]
        loss = torch.compile(step, fullgraph=True)(*leaves)
        results[mode] = (loss.detach(), torch.autograd.grad(loss, leaves))
    torch.testing.assert_close(results["triton"][0], results["opaque"][0], atol=1e-4, rtol=1e-3)
    for a, e in zip(results["triton"][1], results["opaque"][1], strict=True):
        torch.testing.assert_close(a.float(), e.float(), atol=2e-3, rtol=2e-2)


@needs_twins
def test_twins_on_meta_tensors_under_a_dispatch_mode_launch_nothing(tmp_path):
    """With compiled ops "triton" a dispatch mode (FlopCounterMode) over meta tensors reaches a twin's fake function
    with plain meta tensors: its kernels must not be launched (no driver is asked; nothing to compute)."""
    code = (
        "import torch, fastmim.ops as ops\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "ops.set_compiled_ops('triton')\n"
        "x = torch.empty(2, 16, 8, device='meta', dtype=torch.bfloat16)\n"
        "ids = torch.empty(2, 4, device='meta', dtype=torch.long)\n"
        "imgs = torch.empty(2, 3, 16, 16, device='meta')\n"
        "with FlopCounterMode(display=False):\n"
        "    print(tuple(ops.gather_visible(x, ids).shape), tuple(ops.patchify(imgs, 4).shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2, 4, 8) (2, 16, 48)" in r.stdout
