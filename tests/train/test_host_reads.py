"""What a training step reads back to the host. On a GPU each read of a tensor's value (``.item()``, ``bool(t)``,
``int(t)``, ``.tolist()``, ``.cpu()``, boolean indexing's ``nonzero``) waits for the GPU to drain, and breaks a
captured CUDA graph. On this CPU the step's reads are counted, each by the fastmim function that made it, and must be
among the checks that run on CPU tensors only (named here with their guard): a new read in the step fails this test
until it is made device-side or guarded the same way."""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch

from fastmim import ops, pretrain
from fastmim.train import step as step_module
from tests.conftest import TINY_ARGS, tiny_args_for

PACKAGE = os.path.dirname(os.path.dirname(step_module.__file__))
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero")

# (file, function) -> why it reads nothing on a GPU
CPU_ONLY = {
    ("ops/_dispatch.py", "check_id_values"): "index values are checked where ids_checked_here (CPU tensors)",
    ("ops/_dispatch.py", "<genexpr>"): "check_id_values' min and max",
    ("ops/masked_loss.py", "_check_denom"): "denom.device.type == 'cpu'",
    ("ops/reference.py", "masked_mse_loss_patchified_ref"): "denom.device.type == 'cpu'",
    ("ops/_cpu.py", "masked_loss_backward"): "the C++ CPU kernels' scalar arguments",
    ("ops/sparse_conv.py", "_check_symmetric"): "ids_checked_here (CPU tensors)",
    ("ops/sparse_conv.py", "from_mask"): "active.device.type == 'cpu'",
    ("masking/base.py", "smallest_block"): "I-JEPA's check of a given count, targets.device.type == 'cpu'",
}


@pytest.fixture
def step_reads(monkeypatch):
    """A Counter of (read, file, function) made inside TrainStep calls, by the innermost fastmim frame."""
    reads, inside = collections.Counter(), [False]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0]:
                for frame in reversed(traceback.extract_stack()[:-1]):
                    if frame.filename.startswith(PACKAGE):
                        reads[(name, os.path.relpath(frame.filename, PACKAGE), frame.name)] += 1
                        break
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    real_call = step_module.TrainStep.__call__

    def call(self, *args, **kwargs):
        inside[0] = True
        try:
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
