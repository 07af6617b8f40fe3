"""Every public fused op through ``torch.export``: the exported program holds the custom op (not a decomposition of
it), survives ``torch.export.save``/``load`` in a process that has imported fastmim.ops, and gives eager mode's values
and gradients, at the traced size and, with every dimension exported as automatic-dynamic, at another size."""

from __future__ import annotations

import io

import pytest
import torch

from tests.ops.helpers import check_against_reference
from tests.ops.test_compile_dynamic import CASES


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _exported(fn, inputs, dynamic: bool):
    shapes = tuple({i: torch.export.Dim.AUTO for i in range(x.dim())} for x in inputs) if dynamic else None
    program = torch.export.export(_Call(fn), tuple(inputs), dynamic_shapes=(shapes,) if dynamic else None)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    return torch.export.load(buf)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_holds_the_op_and_matches_eager(name):
    fn, make = CASES[name]
    small = make(2, 16)
    program = _exported(fn, small, dynamic=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("fastmim.") for t in targets), f"{name}: no fastmim op in the exported graph: {targets}"
    check_against_reference(program.module(), fn, small, f"{name} exported", rtol=1e-5)
    dynamic = _exported(fn, small, dynamic=True).module()
    check_against_reference(dynamic, fn, make(2, 16), f"{name} exported dynamic B=2 n=16", rtol=1e-5)
    check_against_reference(dynamic, fn, make(3, 24), f"{name} exported dynamic B=3 n=24", rtol=1e-5)
