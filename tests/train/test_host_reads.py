"""What a training step reads back to the host. On a GPU each read of a tensor's value waits for the GPU to drain,
and breaks a captured CUDA graph: ``.item()``, ``bool(t)``, ``int(t)`` (aten's ``_local_scalar_dense``), the ops
whose output size depends on values (``nonzero``, behind boolean indexing and ``masked_select``; ``unique``,
``bincount``, ``repeat_interleave`` without ``output_size``, ``equal``), and ``.tolist()``, ``.cpu()`` or ``.numpy()``
(which dispatch no aten op on a CPU tensor: counted as the Tensor methods). On this CPU every such
call inside the step is counted, each by the fastmim function that made it, and must be among the checks that run on
CPU tensors only (named here with their guard): a new read in the step fails this test until it is made
device-side or guarded the same way."""

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
READS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
    "repeat_interleave",
    "equal",
}  # fmt: skip (nonzero_static, sync-free, is not one)
METHODS = ("tolist", "cpu", "numpy")  # host copies that dispatch nothing on CPU tensors (a .to(device) cannot be told
# from one here: on this CPU every device is the host)

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
    """Records the host-reading aten calls by their fastmim caller."""

    def __init__(self, reads: collections.Counter):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())
        ):  # fmt: skip (a boolean index: its nonzero runs inside the kernel, below this mode)
            name = f"{name} (boolean)"
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            name = ""  # (its size given: no read)
        if name in READS or name.endswith("(boolean)"):
            _record(self.reads, name)
        return func(*args, **(kwargs or {}))


def _record(reads: collections.Counter, name: str) -> None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(PACKAGE):
            reads[(name, os.path.relpath(frame.filename, PACKAGE), frame.name)] += 1
            return


@pytest.fixture
def step_reads(monkeypatch):
    """A Counter of (aten read, file, function) made inside TrainStep calls, by the innermost fastmim frame. The ops
    keep their eager path (a dispatch mode would otherwise send them through their custom ops)."""
    reads, inside = collections.Counter(), [False]
    monkeypatch.setattr(_dispatch, "_get_current_dispatch_mode", lambda: None)
    real_call = step_module.TrainStep.__call__

    def counted(name):
        real = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if inside[0]:
                _record(reads, name)
            return real(self, *args, **kwargs)

        return method

    for name in METHODS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def call(self, *args, **kwargs):
        inside[0] = True
        try:
            with _Reads(reads):
                return real_call(self, *args, **kwargs)
        finally:
            inside[0] = False

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
