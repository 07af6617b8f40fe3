"""fuse_timm_vit: timm's own ViT, run by timm's blocks and by the fused ones on the same weights and inputs, gives the
same outputs and every gradient (fp32; bf16 autocast within 2x timm's own bf16 error); the model keeps its state
dict, pickles, deep-copies and compiles fused, and unfuses back to timm's classes."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch

timm = pytest.importorskip("timm", reason="the timm integration's tests need timm (pip install 'fastmim[eval]')")

import fastmim  # noqa: E402
from fastmim.integrations.timm import fuse_timm_vit, fused_parts, unfuse_timm_vit  # noqa: E402
from tests.ops.conftest import assert_lowp_close  # noqa: E402


def tiny(**kw):
    torch.manual_seed(0)
    shape = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5, drop_path_rate=0.1)
    return timm.models.vision_transformer.VisionTransformer(**{**shape, **kw})


def _run(model, x, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path draws the same in both
    out = model(x)
    out.square().mean().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [{}, dict(class_token=False, global_pool="avg"), dict(reg_tokens=2),
                                dict(init_values=1e-5)])  # fmt: skip
def test_fused_blocks_equal_timms_own_in_outputs_and_every_gradient(kw):
    ref = tiny(**kw).train()
    ours = fuse_timm_vit(copy.deepcopy(ref))
    assert fused_parts(ours) == {"norm": 4, "attention": 2, "gelu": 2} and fused_parts(ref)["norm"] == 0
    x = torch.randn(3, 3, 32, 32)
    a, ga = _run(ref, x)
    b, gb = _run(ours, x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_within_twice_timms_own_error():
    ref = tiny().eval()
    ours = fuse_timm_vit(copy.deepcopy(ref))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        gold = ref.double()(x.double()).float()
        ref.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = ref(x), ours(x)
    assert a.dtype == b.dtype  # the final norm is timm's: the caller reads what timm gives
    assert_lowp_close(b, a, gold, "fused timm ViT under bf16 autocast", atol=1e-3)


def test_the_fused_model_saves_copies_unfuses_and_refits_idempotently():
    ref = tiny()
    ours = fuse_timm_vit(copy.deepcopy(ref))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    buf = io.BytesIO()
    torch.save(ours, buf)  # the whole module: its fused classes are found again on load
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fused_parts(loaded) == fused_parts(ours) == fused_parts(copy.deepcopy(ours))
    fuse_timm_vit(ours)  # twice: nothing more
    assert fused_parts(ours) == {"norm": 4, "attention": 2, "gelu": 2}
    unfuse_timm_vit(ours)
    assert fused_parts(ours) == {"norm": 0, "attention": 0, "gelu": 0}
    assert [type(m) for m in ours.modules()] == [type(m) for m in ref.modules()]
    only = fuse_timm_vit(copy.deepcopy(ref), parts=("norm",))
    assert fused_parts(only) == fused_parts(fuse_timm_vit(copy.deepcopy(ref), parts="norm")) \
        == {"norm": 4, "attention": 0, "gelu": 0}  # fmt: skip
    # what would always fall back to timm's code is not re-classed, so not counted as fused
    plain = tiny(norm_layer=functools.partial(torch.nn.LayerNorm, elementwise_affine=False))
    for block in plain.blocks:
        block.mlp.fc1.register_parameter("bias", None)
    assert fused_parts(fuse_timm_vit(plain)) == {"norm": 0, "attention": 2, "gelu": 0}
    with pytest.raises(ValueError, match="unknown parts \\['flash'\\]"):
        fuse_timm_vit(ref, parts=("flash",))
    with pytest.raises(TypeError, match="holds no timm ViT Block"):
        fuse_timm_vit(torch.nn.Linear(2, 2))


def test_what_fastmims_attention_does_not_do_runs_timms_own():
    """An attention mask, qk_norm, and attention dropout in training: timm's forward, the same values."""
    x = torch.randn(2, 17, 64)
    ref = tiny().blocks[0].attn.eval()
    ours = fuse_timm_vit(torch.nn.Sequential(timm.models.vision_transformer.Block(64, 2, qkv_bias=True)))[0].attn
    ours.load_state_dict(ref.state_dict())
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask))
    qk = tiny(qk_norm=True)
    fused = fuse_timm_vit(copy.deepcopy(qk))
    assert fused_parts(fused)["attention"] == 0  # not re-classed: its qk_norm would always take timm's path
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fused.eval()(x), qk.eval()(x), rtol=1e-5, atol=1e-5)


def test_fused_model_compiles_whole_and_wraps_in_mae():
    ref = tiny(num_classes=0).eval()
    ours = fuse_timm_vit(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    mae = fastmim.create_model("mae", encoder=ours, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    loss = mae(torch.randn(2, 3, 32, 32))[0]
    loss.backward()
    assert torch.isfinite(loss) and fused_parts(mae.encoder)["attention"] == 2
