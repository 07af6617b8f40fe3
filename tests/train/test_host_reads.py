"""What a training step reads back to the host. On a GPU each read of a tensor's value (``.item()``, ``bool(t)``,
``int(t)``, ``.tolist()``: aten's ``_local_scalar_dense``; ``nonzero``, behind boolean indexing and
``masked_select``; a copy to the CPU) waits for the GPU to drain, and breaks a captured CUDA graph. On this CPU a
dispatch mode sees every such aten call inside the step, each named by the fastmim function that made it, and they
must be among the checks that run on CPU tensors only (named here with their guard): a new read in the step fails
this test until it is made device-side or guarded the same way."""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmim import ops, pretrain
from fastmim.ops import _dispatch
from fastmim.train import step as step_module
from tests.conftest import TINY_ARGS, tiny_args_for

PACKAGE = os.path.dirname(os.path.dirname(step_module.__file__))
READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "nonzero_static"}

# (file, function) -> why it reads nothing on a GPU
CPU_ONLY = {
    ("ops/_dispatch.py", "check_id_values"): "index values are checked where ids_checked_here (CPU tensors)",
    ("ops/masked_loss.py", "_check_denom"): "denom.device.type == 'cpu'",
    ("ops/reference.py", "masked_mse_loss_patchified_ref"): "denom.device.type == 'cpu'",
    ("ops/_cpu.py", "masked_loss_backward"): "the C++ CPU kernels' scalar arguments",
    ("ops/sparse_conv.py", "_check_symmetric"): "ids_checked_here (CPU tensors)",
    ("ops/sparse_conv.py", "from_mask"): "active.device.type == 'cpu' (the count check; the layout is built with "
    "nonzero_static, no read)",
    ("masking/base.py", "smallest_block"): "I-JEPA's check of a given count, targets.device.type == 'cpu'",
}


class _Reads(TorchDispatchMode):
    """Records the host-reading aten calls (and copies to the CPU of tensors elsewhere) by their fastmim caller."""

    def __init__(self, reads: collections.Counter):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())
        ):  # fmt: skip (a boolean index: its nonzero runs inside the kernel, below this mode)
            name = f"{name} (boolean)"
        if name in READS or name.endswith("(boolean)"):
            for frame in reversed(traceback.extract_stack()[:-1]):
                if frame.filename.startswith(PACKAGE):
                    self.reads[(name, os.path.relpath(frame.filename, PACKAGE), frame.name)] += 1
                    break
        return func(*args, **(kwargs or {}))


@pytest.fixture
def step_reads(monkeypatch):
    """A Counter of (aten read, file, function) made inside TrainStep calls, by the innermost fastmim frame. The ops
    keep their eager path (a dispatch mode would otherwise send them through their custom ops)."""
    reads = collections.Counter()
    monkeypatch.setattr(_dispatch, "_get_current_dispatch_mode", lambda: None)
    real_call = step_module.TrainStep.__call__

    def call(self, *args, **kwargs):
        with _Reads(reads):
            return real_call(self, *args, **kwargs)

    monkeypatch.setattr(step_module.TrainStep, "__call__", call)
    return reads


def _unguarded(reads) -> list[str]:
    return [f"{name} in {file}:{fn} ({n}x)" for (name, file, fn), n in reads.items() if (file, fn) not in CPU_ONLY]


@pytest.mark.parametrize(
    "model",
    ["mae_vit_tiny_patch16", "mae_torch_backend", "fcmae_convnextv2_atto", "data2vec2_vit_tiny_patch16",
     "ijepa_vit_tiny_patch16"],
)  # fmt: skip
def test_a_training_step_reads_nothing_back_outside_cpu_only_checks(model, step_reads, tmp_path):
    """The torch backend is what a GPU without Triton or the CUDA kernels runs: its scatter backward indexed with a
    boolean mask and asked ``(~vis).any()`` (five syncs in every MAE backward, and no CUDA graph)."""
    args = TINY_ARGS if model.startswith("mae") else tiny_args_for(model)
    args = [*args, "--max-steps", "3", "--epochs", "1", "--vis-interval", "0", "--output-dir", str(tmp_path / "run")]
    args[args.index("--model") + 1] = "mae_vit_tiny_patch16" if model == "mae_torch_backend" else model
    prev = ops.set_backend("torch" if model == "mae_torch_backend" else None)
    try:
        assert pretrain.main(args) == 0
    finally:
        ops.set_backend(prev)
    assert step_reads, "no read counted: the counters are not in place (every recipe checks its ids on CPU)"
    assert not _unguarded(step_reads), _unguarded(step_reads)
