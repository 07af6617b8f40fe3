"""BEiT's relative position bias in fastmim's ViT (SimMIM's shared one, A2MIM's per block), and the ViT without an
absolute position embedding: the index against BEiT's definition written out here, the encoder against timm's Beit
(an independent implementation) in values, and its parameters trained."""

from __future__ import annotations

import math

import pytest
import torch

from fastmim.models.vit import (
    VisionTransformer,
    beit_kwargs,
    from_beit_state_dict,
    relative_position_index,
    set_grad_ckpt,
    to_beit_state_dict,
)

KW = dict(img_size=(24, 32), patch_size=8, embed_dim=24, depth=3, num_heads=3)


def _perturbed(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Every parameter moved off its initial value (a zero bias table would hide a wrong index)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    return model.eval()


@pytest.mark.parametrize("grid", [(3, 4), (2, 2), (1, 3)])
def test_relative_position_index_is_beits(grid):
    """Row (dy + h - 1) * (2w - 1) + (dx + w - 1) for patches i, j at offset (y_i - y_j, x_i - x_j); the three rows
    after the (2h - 1)(2w - 1) offsets: class token -> patch, patch -> class token, class token -> class token."""
    h, w = grid
    got = relative_position_index(grid)
    n = h * w
    offsets = (2 * h - 1) * (2 * w - 1)
    assert got.shape == (n + 1, n + 1)
    for i in range(n + 1):
        for j in range(n + 1):
            if i == 0 and j == 0:
                want = offsets + 2
            elif i == 0:
                want = offsets
            elif j == 0:
                want = offsets + 1
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, w), divmod(j - 1, w)
                want = (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)
            assert got[i, j] == want, (i, j)
    assert got.max() == offsets + 2 and len(set(got[1:, 1:].flatten().tolist())) == offsets


@pytest.mark.parametrize(
    "mode, abs_pos, init_values",
    [("shared", False, 0.1), ("block", True, 0.1), ("shared", True, None), ("block", False, None)],
)
def test_the_encoder_is_timms_beit_both_ways(mode, abs_pos, init_values):
    """``to_beit_state_dict`` loads strictly into timm's Beit of ``beit_kwargs``, with the same tokens and pooled
    output; ``from_beit_state_dict`` brings a Beit's weights back (its key bias zero), the same function again."""
    timm_beit = pytest.importorskip("timm.models.beit", reason="timm is a test dependency (pip install -e '.[test]')")
    ours = _perturbed(VisionTransformer(**KW, init_values=init_values, abs_pos_embed=abs_pos, rel_pos_bias=mode))
    assert (ours.pos_embed is None) == (not abs_pos)
    theirs = timm_beit.Beit(**beit_kwargs(ours)).eval()
    theirs.load_state_dict(to_beit_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        back = VisionTransformer(**KW, init_values=init_values, abs_pos_embed=abs_pos, rel_pos_bias=mode).eval()
        state = from_beit_state_dict(theirs.state_dict())
        back.load_state_dict(state, strict=True)
        assert not state["blocks.0.attn.qkv.bias"][24:48].any()  # BEiT's zero key bias
        torch.testing.assert_close(back.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "block"])
def test_sdpa_math_fused_norm_and_checkpointing_agree_and_the_table_learns(mode):
    """SDPA with the bias as its mask, the explicit softmax, the fused residual LayerNorms and per-block
    checkpointing give the same tokens and gradients; the bias table's gradient is the sum over the index of the
    logits' gradient (nonzero), so it trains."""
    base = VisionTransformer(**KW, init_values=0.1, abs_pos_embed=False, rel_pos_bias=mode, attn_impl="sdpa")
    base = _perturbed(base)
    base.train()
    x = torch.randn(2, 3, 24, 32)
    outs = {}
    for name, kw in {"sdpa": {}, "math": dict(attn_impl="math"), "fused": dict(fused_norm=True)}.items():
        for ckpt in (False, True):
            m = VisionTransformer(**{**KW, **kw}, init_values=0.1, abs_pos_embed=False, rel_pos_bias=mode)
            m.load_state_dict(base.state_dict())
            set_grad_ckpt(m, ckpt)
            y = m.forward_features(x)
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            table = m.rel_pos_bias if mode == "shared" else m.blocks[1].attn
            outs[name, ckpt] = (y.detach(), table.relative_position_bias_table.grad.clone())
    want_y, want_g = outs["math", False]
    assert want_g.abs().sum() > 0
    for key, (y, g) in outs.items():
        torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5, msg=str(key))
        torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-5, msg=str(key))


def test_the_bias_changes_attention_by_relative_offset_only():
    """With a table that favours one offset (dx = +1, the patch to the right) and zero attention weights elsewhere,
    each patch attends to its right neighbour alone (where it has one): positions from the bias alone, as SimMIM's
    ViT without an absolute position embedding."""
    m = VisionTransformer(**{**KW, "depth": 1}, abs_pos_embed=False, rel_pos_bias="shared", attn_impl="math").eval()
    h, w = m.grid_size
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        row = (h - 1) * (2 * w - 1) + (w - 1) - 1  # dy = 0, dx = x_i - x_j = -1: key j one to the right of i
        m.rel_pos_bias.relative_position_bias_table[row] = 30.0
        attn = m.blocks[0].attn
        v = torch.arange(1 + h * w, dtype=torch.float32)
        tokens = torch.zeros(1, 1 + h * w, KW["embed_dim"])
        tokens[0, :, 0] = v  # the value path copies channel 0 of each token
        attn.qkv.weight[2 * 24, 0] = 1.0
        attn.proj.weight[0, 0] = 1.0
        out = attn(tokens, m.rel_pos_bias())[0, :, 0]
    for i in range(h * w):
        y, x = divmod(i, w)
        if x < w - 1:
            assert out[1 + i] == pytest.approx(1 + i + 1, abs=1e-4), (y, x)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="rel_pos_bias must be one of"):
        VisionTransformer(**KW, rel_pos_bias="window")
    with pytest.raises(ValueError, match="has rows for the class token"):
        VisionTransformer(**KW, rel_pos_bias="shared", class_token=False)
    with pytest.raises(ValueError, match="takes no attention bias"):
        VisionTransformer(**KW, rel_pos_bias="block", attn_impl="fastmim")
    with pytest.raises(ValueError, match="no position information"):
        VisionTransformer(**KW, abs_pos_embed=False)
    m = VisionTransformer(**KW, rel_pos_bias="shared")
    with pytest.raises(ValueError, match="sees every token"):
        m.encode_tokens(torch.randn(1, 5, 24))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["shared", "block"])
def test_cuda_bf16_sdpa_with_the_bias_matches_the_fp32_math_path(mode):
    """On the GPU SDPA picks a kernel that takes a bias needing a gradient (memory-efficient or cuDNN): under bf16
    autocast its tokens and the table's gradient match the explicit fp32 softmax within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    kw = dict(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, init_values=0.1, rel_pos_bias=mode)
    ref = _perturbed(VisionTransformer(**kw, abs_pos_embed=False, attn_impl="math")).cuda().train()
    fast = VisionTransformer(**kw, abs_pos_embed=False).cuda().train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 224, 224, device="cuda")
    grads = []
    for m, amp in ((ref, False), (fast, True)):
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            y = m.forward_features(x).float()
        y.square().mean().backward()
        table = m.rel_pos_bias if mode == "shared" else m.blocks[0].attn
        grads.append((y.detach(), table.relative_position_bias_table.grad))
    (y_ref, g_ref), (y, g) = grads
    assert (y - y_ref).abs().max() <= 0.05 * y_ref.abs().max()
    assert (g - g_ref).norm() <= 0.05 * g_ref.norm() and g_ref.norm() > 0


def test_beit_init_is_truncated_normal_with_the_depth_rescaling():
    """init="beit": linears, the patch embedding and the tokens from a normal of std 0.02 cut at one std, as BEiT's and
    SimMIM's pretraining models draw them (``_trunc_normal_(a=-std, b=std)``: the draw's std is 0.02 x 0.5396), zero
    biases, each block's attn.proj and mlp.fc2 divided by sqrt(2 x depth); "trunc" (mmpretrain's MaskFeat, openmixup's
    A2MIM) a normal of std 0.02 cut at +-2, no rescaling, the patch embedding's bias PyTorch's uniform draw; "mae" keeps
    the xavier-uniform ones (another std)."""
    import fastmim

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=192, depth=4, num_heads=3)
    beit = VisionTransformer(**kw, init="beit", rel_pos_bias="shared", abs_pos_embed="learned").requires_grad_(False)
    mae = VisionTransformer(**kw).requires_grad_(False)
    cut = 0.02 * (1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(2**-0.5)) ** 0.5  # N(0, 1) within +-1
    for w in (beit.patch_embed.proj.weight, beit.cls_token, beit.pos_embed):
        assert w.abs().max() <= 0.02 and w.std().item() == pytest.approx(cut, rel=0.1 if w.numel() < 10**4 else 0.05)
    assert not beit.patch_embed.proj.bias.any()
    for depth, blk in enumerate(beit.blocks, start=1):
        assert blk.attn.qkv.weight.std().item() == pytest.approx(cut, rel=0.05)
        assert blk.mlp.fc1.weight.std().item() == pytest.approx(cut, rel=0.05)
        assert blk.mlp.fc1.weight.abs().max() <= 0.02
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(cut / (2 * depth) ** 0.5, rel=0.05)
        assert not blk.attn.qkv.bias.any() and not blk.mlp.fc2.bias.any()
    simmim = fastmim.create_model("simmim_vit_tiny_patch16", depth=1, init="beit").requires_grad_(False)
    assert simmim.mask_token.abs().max() <= 0.02 and simmim.mask_token.std().item() == pytest.approx(cut, rel=0.15)
    xavier = (6 / (192 + 576)) ** 0.5 / 3**0.5  # uniform(-a, a) has std a / sqrt(3)
    assert mae.blocks[0].attn.qkv.weight.std().item() == pytest.approx(xavier, rel=0.05)
    assert not beit.rel_pos_bias.relative_position_bias_table.any()  # BEiT starts the table at zero
    trunc = VisionTransformer(**kw, init="trunc").requires_grad_(False)  # no cut to speak of, no rescaling
    for w in (trunc.patch_embed.proj.weight, trunc.cls_token, *[b.attn.proj.weight for b in trunc.blocks],
              *[b.mlp.fc2.weight for b in trunc.blocks]):  # fmt: skip
        assert w.std().item() == pytest.approx(0.02, rel=0.1 if w.numel() < 1000 else 0.05)
    assert trunc.blocks[0].mlp.fc1.weight.abs().max() > 0.06  # a normal's tails, beyond +-3 std
    assert not trunc.blocks[-1].attn.proj.bias.any()
    bias, bound = trunc.patch_embed.proj.bias, (3 * 8 * 8) ** -0.5  # PyTorch's Conv2d default: U(+-1/sqrt(fan_in))
    assert bias.abs().max() <= bound and bias.std().item() == pytest.approx(bound / 3**0.5, rel=0.25)
    with pytest.raises(ValueError, match="init must be one of"):
        VisionTransformer(**kw, init="xavier")
