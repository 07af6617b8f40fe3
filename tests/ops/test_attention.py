"""attention (multi-head self-attention from a packed qkv, for short sequences): the reference against
scaled_dot_product_attention, every backend against the reference (values and gradients; several key/query blocks,
head dims that are not powers of two, low precision, strided qkv, a custom scale), empty and bad inputs, opcheck,
torch.compile, and the ViT's attn_impl="fastmim"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmim
from fastmim.ops import attention, attention_ref
from fastmim.ops._dispatch import choose_backend
from tests.ops.helpers import check_against_reference, compile_backend

OP = "attention"  # no C++ kernel: the backend fixture skips "cpp" (it would run the torch backend again)


def _qkv(b, n, h, d, device, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, 3, h, d, generator=g) * scale).to(device, dtype).requires_grad_()


def test_reference_is_sdpa():
    qkv = _qkv(2, 11, 3, 16, "cpu")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(attention_ref(qkv), want, rtol=1e-5, atol=1e-6)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(attention_ref(qkv, 0.3), want, rtol=1e-5, atol=1e-6)


# (B, N, H, hd): one token, one block, several query/key blocks with a ragged last one, MAE's encoder (50 tokens,
# hd 64) and decoder (197 tokens, hd 32) head shapes at batch 1, head dims that are not powers of two
SHAPES = [(2, 1, 2, 16), (1, 13, 3, 32), (2, 100, 2, 64), (1, 50, 2, 64), (1, 197, 1, 32), (2, 37, 3, 20), (1, 9, 1, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, shape):
    device, name = backend
    check_against_reference(attention, attention_ref, [_qkv(*shape, device)], f"fp32[{name}]", rtol=1e-4)


def _same_dtype_attention(qkv):
    """Attention computed in qkv's own dtype (PyTorch's plain low-precision path): the baseline error of the rule
    "at most 2x PyTorch's own error against fp32" (flash-attention's test rule). attention_ref computes in fp32."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    p = torch.softmax((q @ k.transpose(-2, -1)) * qkv.shape[-1] ** -0.5, dim=-1)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_matches_reference(backend, dtype):
    device, name = backend
    check_against_reference(attention, _same_dtype_attention, [_qkv(2, 70, 2, 32, device, dtype, scale=2.0)],
                            f"{dtype}[{name}]")  # fmt: skip


def test_strided_qkv_and_scale(backend):
    """q, k, v read through any strides (here heads and the q/k/v axis swapped in memory), a custom scale, and a
    large score range (softmax close to one-hot: the online maximum must be right)."""
    device, name = backend
    base = _qkv(2, 40, 3, 16, device, scale=2.5).detach()
    strided = base.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # [B, N, 3, H, hd], H-major
    assert not strided.is_contiguous()
    check_against_reference(lambda t: attention(t, 0.7), lambda t: attention_ref(t, 0.7), [strided],
                            f"strided[{name}]", rtol=1e-4)  # fmt: skip


def test_empty_and_bad_inputs(backend):
    device, _ = backend
    qkv = _qkv(0, 5, 2, 16, device)
    out = attention(qkv)
    assert out.shape == (0, 5, 2, 16)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
    with pytest.raises(ValueError, match=r"qkv must be \[B, N, 3, H, hd\]"):
        attention(torch.zeros(2, 5, 2, 4, 16, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        attention(torch.zeros(2, 5, 3, 4, 16, device=device, dtype=torch.long))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attention(torch.zeros(2, 5, 3, 4, 16, device=device), float("inf"))
    with pytest.raises(ValueError, match=r"got a \(5, 5\) tensor \(attention takes no mask"):  # a mask given as scale
        attention(torch.zeros(2, 5, 3, 4, 16, device=device), torch.ones(5, 5, dtype=torch.bool, device=device))
    qkv = _qkv(2, 5, 2, 16, device)  # a 0-d tensor is the number it holds
    torch.testing.assert_close(attention(qkv, torch.tensor(0.3)), attention(qkv, 0.3), rtol=0, atol=0)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTMIM_BACKEND", raising=False)
    assert choose_backend(OP, torch.device("cpu"), (torch.float32,)) == "torch"


def test_opcheck(backend):
    device, _ = backend
    qkv = _qkv(2, 19, 2, 16, device)
    torch.library.opcheck(torch.ops.fastmim.attention.default, (qkv, 0.25))
    out, lse = (t.detach() for t in torch.ops.fastmim.attention(qkv, 0.25))
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastmim.attention_backward.default, (grad, qkv.detach(), out, lse, 0.25))


def test_compile_fullgraph(backend):
    device, name = backend
    w = torch.randn(48, 3 * 48, device=device) * 0.1

    def block(x):
        qkv = (x @ w).reshape(x.shape[0], x.shape[1], 3, 3, 16)
        return attention(qkv).reshape(x.shape) + x

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend(device, name))
    torch._dynamo.reset()
    x = torch.randn(2, 21, 48, device=device, requires_grad=True)
    check_against_reference(compiled, block, [x], f"compiled[{name}]", rtol=1e-4)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_vit_attn_impl_fastmim_is_the_same_model(backend, amp):
    """MAE with attn_impl="fastmim" against SDPA: the same loss and gradients (fp32), as close as SDPA is to fp32
    under bf16 autocast (within 2x + 1e-3)."""
    device, name = backend

    def build(impl):
        torch.manual_seed(0)
        kw = dict(img_size=64, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2, attn_impl=impl)
        return fastmim.create_model("mae_vit_tiny_patch16", **kw).to(device)

    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)

    def run(model, dtype):
        torch.manual_seed(2)
        mask = model.make_mask(2, device)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model(imgs, mask=mask)[0]
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    sdpa, ours = build("sdpa"), build("fastmim")
    (l0, g0), (l1, g1) = run(sdpa, amp), run(ours, amp)
    assert g0.keys() == g1.keys()
    if amp is None:
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-4 * g0[k].abs().max().item())
        return
    lg, gg = run(sdpa, None)
    assert abs(float(l1 - lg)) <= 2 * abs(float(l0 - lg)) + 1e-3 * abs(float(lg))
    for k in g0:
        e1 = float((g1[k] - gg[k]).norm() / gg[k].norm().clamp_min(1e-30))
        e0 = float((g0[k] - gg[k]).norm() / gg[k].norm().clamp_min(1e-30))
        assert e1 <= 2 * e0 + 1e-3, f"{k}: fastmim attention bf16 error {e1:.3g}, SDPA's {e0:.3g}"


def test_flop_counter_counts_it_as_attention():
    """FlopCounterMode (a model's FLOPs, MFU) counted 0 for it: now the forward counts what the reference's two
    matmuls count, and forward + backward torch's formula for scaled_dot_product_attention (4 + 10 B H N^2 hd)."""
    from torch.utils.flop_counter import FlopCounterMode

    b, n, h, d = 2, 17, 4, 8
    qkv = torch.randn(b, n, 3, h, d, requires_grad=True)
    with FlopCounterMode(display=False) as ref:
        attention_ref(qkv.detach())
    with FlopCounterMode(display=False) as fwd:
        attention(qkv.detach())
    with FlopCounterMode(display=False) as both:
        attention(qkv).sum().backward()
    assert fwd.get_total_flops() == ref.get_total_flops() == 4 * b * h * n * n * d
    assert both.get_total_flops() == 14 * b * h * n * n * d
