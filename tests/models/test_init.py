"""Initial values as the papers' code sets them: MAE's fixed sin-cos position embedding (checked against its numpy
formula, every channel), layer scale, the patch embedding as a linear layer, ConvNeXt V2's truncated normal, the mask
tokens; tests elsewhere overwrite these before comparing, so a wrong start passed them."""

from __future__ import annotations

import math

import numpy as np
import torch

import fastmim
from fastmim.models.pos_embed import sincos_2d


def _maes_sincos(d: int, gh: int, gw: int) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed, written out (no class-token row)."""

    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # (w first, as MAE's grid)
    return np.concatenate([one(d // 2, w), one(d // 2, h)], axis=1)


def test_sincos_is_maes_in_every_channel():
    for d, gh, gw in ((96, 4, 4), (192, 14, 14), (64, 3, 5)):
        pe = sincos_2d(d, (gh, gw), cls_token=True)
        assert not pe[0].any()
        np.testing.assert_allclose(pe[1:].double().numpy(), _maes_sincos(d, gh, gw), rtol=0, atol=1e-6)


def test_vit_starts_as_maes_and_simmims():
    torch.manual_seed(0)
    vit = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, depth=2, init_values=0.1)  # (SimMIM's ViT-B)
    for blk in vit.blocks:
        assert torch.equal(blk.ls1.gamma, torch.full((192,), 0.1)) and torch.equal(blk.ls2.gamma, blk.ls1.gamma)
    w = vit.patch_embed.proj.weight  # xavier-uniform of the [D, C*p*p] linear (MAE's), not of the conv
    bound = math.sqrt(6 / (3 * 16 * 16 + 192))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    from fastmim.models.vit import Block

    assert Block(64, 2, qkv_bias=False).attn.qkv.bias is None and Block(64, 2).attn.qkv.bias is not None
    mae = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, depth=1)
    assert abs(mae.mask_token.std().item() - 0.02) < 0.004 and abs(mae.cls_token.std().item() - 0.02) < 0.006


def test_convnextv2_starts_with_its_truncated_normal():
    torch.manual_seed(0)
    for name, kw in (("convnextv2_atto", {}), ("fcmae_convnextv2_atto", {"img_size": 64})):
        m = fastmim.create_model(name, **kw)
        kinds = (torch.nn.Conv2d, torch.nn.Linear)
        layers = [x for x in m.modules() if isinstance(x, kinds) and x.weight.numel() > 2000]
        assert layers, name
        for layer in layers:
            assert abs(layer.weight.std().item() - 0.02) < 0.003, (name, layer)
            assert layer.bias is None or not layer.bias.any(), (name, layer)
    fcmae = fastmim.create_model("fcmae_convnextv2_atto", img_size=64)
    assert abs(fcmae.mask_token.std().item() - 0.02) < 0.004
