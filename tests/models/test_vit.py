"""ViT encoder: shapes, registry, and parameter-name and numerical compatibility with timm."""

import re

import pytest
import torch

import fastmim
from fastmim.models import vit as vit_mod
from fastmim.models.pos_embed import sincos_2d
from fastmim.models.vit import vit_sizes

timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e '.[test]')")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def timm_vit(size: str, patch: int, img_size: int = 224):
    return TimmViT(img_size=img_size, patch_size=patch, num_classes=0, **vit_sizes()[size])


@pytest.mark.parametrize("size", list(vit_sizes()))
@pytest.mark.parametrize("patch", [14, 16])
def test_all_sizes_match_timm_names_and_shapes(size, patch):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = fastmim.create_model(f"vit_{size}_patch{patch}")
        theirs = timm_vit(size, patch)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    timm_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == timm_shapes


def test_encoder_matches_timm_numerically_both_ways():
    torch.manual_seed(0)
    ours = fastmim.create_model("vit_tiny_patch16", img_size=64).eval()
    theirs = timm_vit("tiny", 16, img_size=64).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)
    # and timm weights (its own random init) load into fastmim
    theirs2 = timm_vit("tiny", 16, img_size=64).eval()
    ours.load_state_dict(theirs2.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs2.forward_features(x), rtol=1e-5, atol=1e-5)


def test_timm_create_model_accepts_mae_encoder_weights():
    mae = fastmim.create_model("mae_vit_tiny_patch16", decoder_depth=1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    model.load_state_dict(mae.encoder_state_dict(), strict=True)


@pytest.mark.parametrize("size,params_m", [("tiny", 5.5), ("small", 21.7), ("base", 85.8), ("large", 303.3)])
def test_parameter_counts(size, params_m):
    with torch.device("meta"):
        m = fastmim.create_model(f"vit_{size}_patch16")
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)


def test_forward_shapes_and_classifier_head():
    m = fastmim.create_model("vit_tiny_patch14", img_size=56, num_classes=7)
    x = torch.randn(3, 3, 56, 56)
    assert m.forward_features(x).shape == (3, 1 + 16, 192)
    assert m(x).shape == (3, 7)
    m2 = fastmim.create_model("vit_tiny_patch16", img_size=(32, 64))  # non-square
    assert m2.forward_features(torch.randn(1, 3, 32, 64)).shape == (1, 1 + 8, 192)


def test_pos_embed_is_fixed_sincos():
    m = fastmim.create_model("vit_tiny_patch16", img_size=64)
    pe = m.pos_embed[0]
    assert not m.pos_embed.requires_grad
    assert torch.equal(pe[0], torch.zeros(192))  # class token row
    # token (row 0, col 1): first channel is sin(col * omega_0) = sin(1); the row half starts at channel 96
    assert pe[2, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)
    assert pe[2, 96].item() == pytest.approx(0.0, abs=1e-6)  # sin(row 0)
    assert pe[5, 96].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-6)  # row 1, col 0
    assert torch.equal(pe, sincos_2d(192, (4, 4), cls_token=True))
    assert len({tuple(r.tolist()) for r in pe}) == 17


def test_attention_impls_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ref = fastmim.create_model("vit_tiny_patch16", img_size=32, attn_impl="math").eval()
    sdpa = fastmim.create_model("vit_tiny_patch16", img_size=32, attn_impl="sdpa").eval()
    sdpa.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sdpa.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_flash_attn_path_layout(monkeypatch):
    """flash-attn is not installed here: a stand-in with flash_attn_qkvpacked_func's contract checks the plumbing."""

    def fake_flash(qkv, dropout_p, softmax_scale, causal):
        assert qkv.dim() == 5 and qkv.shape[2] == 3 and dropout_p == 0.0 and not causal  # [B, N, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
        return out.transpose(1, 2)  # [B, N, H, hd]

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = fastmim.create_model("vit_tiny_patch16", img_size=32).eval()
    with torch.no_grad():
        expected = m.forward_features(x)
        monkeypatch.setattr(vit_mod, "_flash_qkvpacked", fake_flash)
        monkeypatch.setattr(vit_mod.Attention, "_use_flash", lambda self, t: True)
        torch.testing.assert_close(m.forward_features(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny_patch15'; did you mean"):
        fastmim.create_model("vit_tiny_patch15")
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        fastmim.create_model("vit_tiny_patch16", img_size=100)
    with pytest.raises(ValueError, match="bad arguments for model") as e:
        fastmim.create_model("vit_tiny_patch16", not_an_arg=1)
    assert "did you mean" not in str(e.value)
    # a misspelt keyword: the close ones the builder (a partial of a function returning the class) or the class takes
    for name, typo, meant in [("vit_tiny_patch16", "fcnorm", "fc_norm"),
                              ("convnextv2_atto", "drop_path", "drop_path_rate"),
                              ("mae_vit_tiny_patch16", "decoder_dim", "decoder_embed_dim"),
                              ("fcmae_convnextv2_atto", "mask_ration", "mask_ratio")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"unexpected keyword argument '{typo}'; did you mean {meant}"):
            fastmim.create_model(name, **{typo: 1})
    with pytest.raises(ValueError, match="'img_size'") as e:  # (the builder's own size is bound: not a hint)
        fastmim.create_model("convnextv2_atto", img_size=64)
    assert "did you mean" not in str(e.value)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        fastmim.create_model("vit_tiny_patch16", attn_impl="xformers")
    m = fastmim.create_model("vit_tiny_patch16", img_size=32)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\], got \(1, 3, 48, 48\)"):
        m(torch.randn(1, 3, 48, 48))
    # the channels too (a grey batch met the convolution's own error), and A2MIM's mean fill, which reshaped first
    for name in ("vit_tiny_patch16", "mae_vit_tiny_patch16", "a2mim_vit_tiny_patch16"):
        model = fastmim.create_model(name, img_size=64)
        for shape in ((2, 1, 64, 64), (2, 3, 32, 32), (3, 64, 64)):
            with pytest.raises(ValueError, match=rf"expected images \[B, 3, 64, 64\], got {re.escape(str(shape))}"):
                model(torch.randn(*shape))
    for bad in ("64", (64,), 64.0, (64, "a")):
        with pytest.raises(ValueError, match="img_size must be an int or a pair of ints"):
            fastmim.create_model("mae_vit_tiny_patch16", img_size=bad)


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "simmim_vit_tiny_patch16", "fcmae_convnextv2_atto"])
def test_sizes_may_be_numpy_ints(name):
    # (a size read from a numpy array or a sweep's np.arange: "object of type 'numpy.int64' has no len()" before)
    np = pytest.importorskip("numpy")
    kwargs = {"img_size": np.int64(64)}
    if "convnext" not in name:
        kwargs.update(img_size=np.int32(64), patch_size=np.int64(16))
    loss = fastmim.create_model(name, **kwargs)(torch.randn(2, 3, 64, 64))[0]
    loss.backward()
    assert torch.isfinite(loss)


def test_registry_lists_all_sizes():
    names = fastmim.list_models("*vit_*")
    for size in vit_sizes():
        for p in (14, 16):
            assert f"vit_{size}_patch{p}" in names and f"mae_vit_{size}_patch{p}" in names


def _mae_pair(name: str, **kw):
    torch.manual_seed(0)
    plain = fastmim.create_model(name, img_size=64, **kw)
    fused = fastmim.create_model(name, img_size=64, fused_norm=True, **kw)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _loss_and_grads(model, name, imgs, amp):
    torch.manual_seed(2)  # the masks come from torch's RNG: the same for every run
    mask = model.make_mask(imgs.shape[0], "cpu") if name.startswith("mae") else None
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
        loss = model(imgs, mask=mask)[0] if mask is not None else model(imgs)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "simmim_vit_tiny_patch16"])
def test_fused_norm_blocks_compute_the_same_model(name, amp, backend, monkeypatch):
    """fused_norm=True (each residual add fused with the next LayerNorm, across blocks, into the final norm) is the
    same function: the loss and every gradient of MAE (encoder and decoder) and SimMIM match the plain blocks in
    fp32; under bf16 autocast each is as close to the fp32 model's as the plain blocks' are (within 2x + 1e-3)."""
    import os

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTMIM_BACKEND", backend)
    kw = dict(decoder_depth=2, decoder_embed_dim=64, decoder_num_heads=2) if name.startswith("mae") else {}
    plain, fused = _mae_pair(name, **kw)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    l0, g0 = _loss_and_grads(plain, name, imgs, amp)
    l1, g1 = _loss_and_grads(fused, name, imgs, amp)
    assert g0.keys() == g1.keys() and len(g0) > 20
    if amp is None:
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-4 * g0[k].abs().max().item(),
                                       msg=lambda m, k=k: f"{k}: {m}")  # fmt: skip
        return
    gold_loss, gold = _loss_and_grads(plain, name, imgs, None)
    assert abs(float(l1 - gold_loss)) <= 2 * abs(float(l0 - gold_loss)) + 1e-3 * abs(float(gold_loss))
    for k in g0:
        e_fused, e_plain = _rel(g1[k], gold[k]), _rel(g0[k], gold[k])
        assert e_fused <= 2 * e_plain + 1e-3, f"{k}: fused bf16 error {e_fused:.3g}, plain bf16 error {e_plain:.3g}"


def test_block_drop_path_drops_each_branch_per_sample_in_training_only():
    """Stochastic depth on a block, against the formula written out: each branch's output times a per-sample keep
    of 0 or 1 / (1 - p), drawn from torch's generator for the attention branch, then for the MLP's; in eval mode the
    block is the plain one."""
    p = 0.5
    torch.manual_seed(0)
    blk = vit_mod.Block(32, 4, drop_path=p)
    x = torch.randn(6, 5, 32)
    torch.manual_seed(3)
    got = blk(x)
    torch.manual_seed(3)
    keep1 = torch.empty(6).bernoulli_(1 - p).view(6, 1, 1) / (1 - p)
    keep2 = torch.empty(6).bernoulli_(1 - p).view(6, 1, 1) / (1 - p)
    h = x + keep1 * blk.attn(blk.norm1(x))
    want = h + keep2 * blk.mlp(blk.norm2(h))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert 0 < int((keep1 == 0).sum() + (keep2 == 0).sum()) < 12  # some samples dropped a branch, not all
    blk.eval()
    torch.testing.assert_close(blk(x), x + blk.attn(blk.norm1(x)) + blk.mlp(blk.norm2(x + blk.attn(blk.norm1(x)))))


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16", "simmim_vit_tiny_patch16", "maskfeat_vit_tiny_patch16"])
def test_drop_path_rises_over_the_blocks_and_fused_norm_draws_the_same(name):
    """drop_path_rate: 0 at the first block rising linearly to the rate at the last (timm's); with fused_norm the
    same drops happen (the same loss and gradients for the same seed); in eval mode the model is the one without
    drop path; the state dict has no new key (encoders export to timm unchanged)."""
    kw = dict(decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2) if name.startswith("mae") else {}
    plain, fused = _mae_pair(name, drop_path_rate=0.3, **kw)
    rates = [blk.drop_path.p for blk in plain.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    torch.manual_seed(0)
    none = fastmim.create_model(name, img_size=64, **kw)
    assert none.state_dict().keys() == plain.state_dict().keys()
    none.load_state_dict(plain.state_dict())
    imgs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    l0, g0 = _loss_and_grads(plain, name, imgs, None)
    l1, g1 = _loss_and_grads(fused, name, imgs, None)
    l2, _ = _loss_and_grads(none, name, imgs, None)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-4 * g0[k].abs().max().item())
    assert not torch.equal(l0, l2)  # the drops happened
    for m in (plain, none):
        m.eval()
    with torch.no_grad():
        tokens = [m.encode_tokens(m.patch_embed(imgs) + m.pos_embed[:, 1:]) for m in (plain, none)]
    torch.testing.assert_close(tokens[0], tokens[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"drop_path_rate must be a number in \[0, 1\), got 1.0"):
        fastmim.create_model(name, img_size=64, drop_path_rate=1.0, **kw)


def test_layer_scale_is_timms_init_values_both_ways_and_in_the_fused_blocks():
    """init_values: each block's branches times a learned per-channel gamma (timm's ls1.gamma / ls2.gamma), the same
    keys and values as timm's VisionTransformer(init_values=...) both ways; fused_norm computes the same; a bad value
    is refused."""
    torch.manual_seed(0)
    ours = fastmim.create_model("vit_tiny_patch16", img_size=64, init_values=0.1).eval()
    with torch.no_grad():
        for blk in ours.blocks:  # learned values, not the init: a scale left out or applied twice would show
            blk.ls1.gamma.uniform_(0.05, 2.0)
            blk.ls2.gamma.uniform_(0.05, 2.0)
    theirs = TimmViT(img_size=64, patch_size=16, num_classes=0, init_values=1.0, **vit_sizes()["tiny"]).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = theirs.forward_features(x)
        torch.testing.assert_close(ours.forward_features(x), want, rtol=1e-5, atol=1e-5)
        plain = fastmim.create_model("vit_tiny_patch16", img_size=64).eval()
        plain.load_state_dict({k: v for k, v in ours.state_dict().items() if ".ls" not in k}, strict=True)
        assert (plain.forward_features(x) - want).abs().max() > 1e-2  # the scales matter
        fused = fastmim.create_model("vit_tiny_patch16", img_size=64, init_values=0.1, fused_norm=True).eval()
        fused.load_state_dict(ours.state_dict(), strict=True)
        torch.testing.assert_close(fused.forward_features(x), want, rtol=1e-5, atol=1e-5)
    assert ours.blocks[0].ls1.gamma.shape == (192,)
    with pytest.raises(ValueError, match="init_values .* must be a finite number > 0 or None, got 0"):
        fastmim.create_model("vit_tiny_patch16", init_values=0)
