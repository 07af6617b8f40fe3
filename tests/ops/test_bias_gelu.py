"""bias_gelu (a transformer MLP's bias + exact GELU after fc1's matmul): the reference against nn.Linear + nn.GELU,
every backend against the reference (values and both gradients, low precision, an fp32 bias with bf16 x, strides,
partial tiles, gradient subsets), the ViT MLP with ``fused_gelu`` against the unfused one, bad inputs, opcheck and
torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmim.ops import bias_gelu, bias_gelu_ref
from tests.ops.helpers import check_against_reference, compile_backend

OP = "bias_gelu"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)


def _problem(shape, device, dtype=torch.float32, bdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2).to(device, dtype).requires_grad_()
    b = torch.randn(shape[-1], generator=g).to(device, bdtype or dtype).requires_grad_()
    return [x, b]


def test_reference_is_linear_then_gelu():
    """bias_gelu_ref(h @ W^T, b) is nn.GELU()(nn.Linear(h)): value and the gradients of h, W and b."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 5, generator=g, requires_grad=True)
    lin = torch.nn.Linear(5, 9)

    def ours(h, w, b):
        return bias_gelu_ref(F.linear(h, w), b)

    def plain(h, w, b):
        return F.gelu(F.linear(h, w, b))

    check_against_reference(ours, plain, [h, lin.weight, lin.bias], "reference", rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 17), (1, 1), (64, 3072), (33, 300), (2, 7, 1024)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(backend, shape, dtype):
    device, name = backend
    check_against_reference(bias_gelu, bias_gelu_ref, _problem(shape, device, dtype), f"bias_gelu[{name}]")


def test_fp32_bias_with_bf16_x(backend):
    """Under autocast fc1's output is bf16 and its bias an fp32 parameter: added in fp32, each gradient in its own
    dtype."""
    device, name = backend
    x, b = _problem((4, 9, 48), device, torch.bfloat16, torch.float32)
    y = bias_gelu(x, b)
    assert y.dtype == torch.bfloat16
    gx, gb = torch.autograd.grad(y.float().square().sum(), [x, b])
    assert gx.dtype == torch.bfloat16 and gb.dtype == torch.float32
    check_against_reference(bias_gelu, bias_gelu_ref, [x, b], f"mixed[{name}]")


@pytest.mark.parametrize("config", [(1, 16, 1), (2, 8, 2), (16, 256, 4)], ids=str)
def test_triton_tiles_smaller_than_the_problem(config):
    """Partial row and column tiles and several row programs per column block (their partial bias sums)."""
    from fastmim.ops._dispatch import triton_problem

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if triton_problem(device):
        pytest.skip(triton_problem(device))
    from fastmim.ops.triton import bias_gelu as kernels

    x, b = (t.detach() for t in _problem((37, 45), device))
    dy = torch.randn(37, 45, device=device)
    u = (x + b).requires_grad_()
    ref = F.gelu(u)
    (gu,) = torch.autograd.grad(ref, u, dy)
    torch.testing.assert_close(kernels.bias_gelu_fwd(x, b, config), ref, rtol=1e-6, atol=1e-6)
    dx, db = kernels.bias_gelu_bwd(dy, x, b, True, config)
    torch.testing.assert_close(dx, gu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, gu.sum(0), rtol=1e-5, atol=1e-5)


def test_default_column_tiles_leave_no_lanes_idle_at_mlp_widths():
    """MLP widths (ViT-S 1536, decoders 768 and 2048, ViT-B 3072, 1152) split into whole column tiles; other widths
    one power-of-two tile (capped), never more than the cap."""
    pytest.importorskip("triton", reason="the tile choice lives in the Triton module")
    from fastmim.ops.triton.bias_gelu import bwd_blocks, col_block, fwd_blocks

    for n in (768, 1152, 1536, 2048, 3072, 4096, 5120):
        for blocks, cap in ((fwd_blocks, 1024), (bwd_blocks, 256)):
            block_n = blocks(n)[1]
            assert n % block_n == 0 and block_n <= cap and block_n >= cap // 8, (n, block_n)
    assert col_block(1000, 1024) == 1024 and col_block(37, 1024) == 64 and col_block(5000, 1024) == 1024


def test_gradient_subsets_and_strides(backend):
    device, name = backend
    x, b = _problem((6, 40), device)
    xt = x.detach().t().contiguous().t().requires_grad_()  # a transposed layout: copied to rows inside
    (gx,) = torch.autograd.grad(bias_gelu(xt, b.detach()).sum(), [xt])
    (gx_ref,) = torch.autograd.grad(bias_gelu_ref(xt, b.detach()).sum(), [xt])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    (gb,) = torch.autograd.grad(bias_gelu(x.detach(), b).sum(), [b])
    (gb_ref,) = torch.autograd.grad(bias_gelu_ref(x.detach(), b).sum(), [b])
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(bias_gelu(x, b), bias_gelu_ref(x, b))


def test_empty_rows(backend):
    device, _ = backend
    x, b = _problem((0, 8), device)
    y = bias_gelu(x, b)
    assert y.shape == (0, 8)
    gx, gb = torch.autograd.grad(y.sum(), [x, b])
    assert gx.shape == (0, 8) and torch.equal(gb, torch.zeros_like(gb))


def test_bad_inputs_raise():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="bias has shape"):
        bias_gelu(x, torch.zeros(5))
    with pytest.raises(TypeError, match="floating-point"):
        bias_gelu(x.long(), torch.zeros(4))
    with pytest.raises(ValueError, match="N >= 1"):
        bias_gelu(torch.randn(3, 0), torch.zeros(0))
    with pytest.raises(TypeError, match="must be a tensor"):
        bias_gelu(x, 0.5)


def test_opcheck_and_compile(backend):
    device, name = backend
    x, b = _problem((5, 24), device)
    torch.library.opcheck(torch.ops.fastmim.bias_gelu.default, (x.detach().requires_grad_(), b))
    dy = torch.randn(5, 24, device=device)
    torch.library.opcheck(torch.ops.fastmim.bias_gelu_backward.default, (dy, x.detach(), b.detach(), True))
    torch._dynamo.reset()
    fn = torch.compile(lambda x, b: bias_gelu(x, b) * 2, fullgraph=True, backend=compile_backend(x.device, name))
    check_against_reference(fn, lambda x, b: bias_gelu_ref(x, b) * 2, [x, b], f"compiled[{name}]")


def test_vit_mlp_with_fused_gelu_matches_the_plain_one(backend):
    """``fused_gelu`` changes how the ViT MLP computes, not what: values and every parameter's gradient, the same
    state dict keys."""
    from fastmim.models.vit import VisionTransformer

    device, name = backend
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    plain = VisionTransformer(**kw).to(device)
    fused = VisionTransformer(**kw, fused_gelu=True).to(device)
    fused.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == fused.state_dict().keys()
    imgs = torch.randn(2, 3, 32, 32, device=device)
    out_p, out_f = plain.forward_features(imgs), fused.forward_features(imgs)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    w = torch.randn(out_p.shape, device=device)  # a loss whose gradient does not cancel (LayerNorm'd squares would)
    (out_p * w).sum().backward()
    (out_f * w).sum().backward()
    for (n, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        if p.grad is not None:
            # (a summed gradient, the class token's, carries its sum's rounding: tolerance to the gradient's scale)
            atol = max(1e-5, 1e-4 * float(p.grad.abs().max()))
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["simmim_vit_tiny_patch16", "data2vec2_vit_tiny_patch16", "ijepa_vit_tiny_patch16"])
def test_every_vit_recipe_takes_fused_gelu(name):
    """create_model(..., fused_gelu=True) switches every ViT MLP of any recipe (encoder, decoder, predictor, teacher);
    a model without ViT MLPs says it has none."""
    import fastmim
    from fastmim.models.vit import Mlp

    model = fastmim.create_model(name, img_size=64, fused_gelu=True)  # (SimMIM's masks need two 32-px cells)
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert mlps and all(m.fused_gelu for m in mlps) and model.fused_gelu
    with pytest.raises(ValueError, match="fused_gelu applies to models whose MLPs are fastmim ViT MLPs"):
        fastmim.create_model("fcmae_convnextv2_atto", fused_gelu=True)
    fastmim.create_model("fcmae_convnextv2_atto", fused_gelu=False)  # off is always fine


def test_any_layout_inside_the_op(backend):
    """Under torch.compile inductor may hand the custom op any layout (it is tagged flexible): a transposed x and a
    strided bias give the same contiguous result and gradients, and opcheck's fake kernels agree on it."""
    device, name = backend
    base = torch.randn(24, 6, device=device)
    x = base.t().requires_grad_()  # [6, 24], column-major
    b = torch.randn(48, device=device)[::2].requires_grad_()  # stride 2
    y = torch.ops.fastmim.bias_gelu(x, b)
    assert y.is_contiguous()
    torch.testing.assert_close(y, bias_gelu_ref(x, b), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.fastmim.bias_gelu.default, (x, b))
    dy = torch.randn(24, 6, device=device).t()
    torch.library.opcheck(torch.ops.fastmim.bias_gelu_backward.default, (dy, x.detach(), b.detach(), True))
