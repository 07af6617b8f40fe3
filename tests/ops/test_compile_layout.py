"""Under torch.compile the fused ops take their inputs in whatever layout inductor made them: they are tagged
flexible_layout (their kernels read any strides, so inductor need not force a stride order on their inputs), and a
strided producer's view reaches them without a copy."""

from __future__ import annotations

import re

import pytest
import torch

from fastmim import _ext
from fastmim.ops import gather_visible, masked_mse_loss
from fastmim.ops._dispatch import FLEXIBLE_LAYOUT


@pytest.mark.skipif(not _ext.available(), reason="fastmim._C not built: inductor's CPU path needs the C++ backend")
@pytest.mark.skipif(not FLEXIBLE_LAYOUT, reason="this torch has no flexible_layout tag")
def test_a_strided_input_reaches_the_op_without_a_copy(monkeypatch):
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("FASTMIM_BACKEND", "cpp")
    for op in ("gather_visible", "scatter_masked", "masked_loss", "patchify", "unpatchify"):
        assert torch.Tag.flexible_layout in getattr(torch.ops.fastmim, op).default.tags, op

    def f(x, ids, pred, mask):
        y = (x * 2).transpose(1, 2)  # [B, N, D] view of the multiply's buffer, not contiguous
        imgs = (x * 3).reshape(2, 1, 8, 5).transpose(2, 3)  # [B, 1, 5, 8] NCHW view, W not innermost
        return gather_visible(y, ids), masked_mse_loss(pred, imgs[..., :4, :4], mask, 2)

    x, ids = torch.randn(2, 8, 5), torch.tensor([[0, 3], [1, 2]])
    pred, mask = torch.randn(2, 4, 4), torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    torch._dynamo.reset()
    (out, loss), codes = run_and_get_code(torch.compile(f, fullgraph=True), x, ids, pred, mask)
    ref_out, ref_loss = f(x, ids, pred, mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss)
    code = "\n".join(codes)
    calls = re.findall(r"torch\.ops\.fastmim\.(\w+)\.default\((.*)\)", code)
    assert {name for name, _ in calls} >= {"gather_visible", "masked_loss"}, code
    for name, args in calls:
        first = args.split(",")[0]
        assert first.startswith("reinterpret_tensor(buf") or name == "masked_loss", (name, args)
    gather_args = next(a for n, a in calls if n == "gather_visible")
    assert "(40, 1, 5)" in gather_args, gather_args  # the transposed strides, as the producer left them
    # only the two multiplies are kernels: nothing copies a view into a contiguous buffer for the ops
    assert len(re.findall(r"^cpp_fused_\w+ = async_compile", code, flags=re.M)) <= 2, code
