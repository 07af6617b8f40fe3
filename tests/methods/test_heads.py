"""The heads and decoder inputs against their formulas written out: the recipes' loss tests take the model's own
decoder outputs, so a head that scrambled tokens, read the class token or placed mask tokens wrongly passed them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastmim
from fastmim.heads import ConvDecoder2d, LinearHead, PixelShuffleHead
from fastmim.masking import random_masking


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pixel_shuffle_head_maps_each_token_to_its_own_patch():
    """SimMIM's head: a 1x1 conv to p*p*C channels on the [B, D, gh, gw] token grid, then PixelShuffle(p)."""
    torch.manual_seed(0)
    head = PixelShuffleHead(8, 4, 3)
    tokens = torch.randn(2, 6, 8, generator=_g(1))  # a 2x3 grid
    grid = tokens.transpose(1, 2).reshape(2, 8, 2, 3)
    want = F.pixel_shuffle(F.conv2d(grid, head[0].weight, head[0].bias), 4)
    with torch.no_grad():
        out = head.forward_tokens(tokens, (2, 3))
        torch.testing.assert_close(out, want)
        moved = tokens.clone()
        moved[1, 4] += 1.0  # token 4 = row 1, column 1: only that 4x4 patch changes
        diff = (head.forward_tokens(moved, (2, 3)) - out).abs().sum(1)[1]
    assert diff[4:8, 4:8].min() > 0 and diff.sum() == diff[4:8, 4:8].sum()


def test_conv_decoder_is_data2vec2s_decoder2d_written_out():
    """fairseq's Decoder2d: per layer Conv2d (same padding, groups) -> LayerNorm over channels without affine ->
    GELU, plus the layer's input where the widths match; then a per-token linear."""
    torch.manual_seed(0)
    dec = ConvDecoder2d(16, (3, 4), decoder_dim=32, layers=3, kernel=3, groups=4)
    x = torch.randn(2, 12, 16, generator=_g(2))
    h = x.transpose(1, 2).reshape(2, 16, 3, 4)
    for i, conv in enumerate(dec.convs):
        y = F.conv2d(h, conv.weight, conv.bias, padding=1, groups=4)
        mu, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
        y = F.gelu((y - mu) / (var + 1e-5).sqrt())
        h = y if i == 0 else y + h  # (layer 0 widens 16 -> 32: no residual)
    want = h.flatten(2).transpose(1, 2) @ dec.proj.weight.T + dec.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(dec(x), want, rtol=1e-5, atol=1e-5)


def test_linear_head_starts_as_maskfeats_neck():
    torch.manual_seed(0)
    head = LinearHead(384, 2000)
    assert abs(head.weight.std().item() - 0.02) < 0.001  # (nn.Linear's own: 1 / sqrt(3 * 384) = 0.029)
    assert not head.bias.any()


def test_simmim_predicts_each_patch_from_its_own_token_never_the_class_token():
    torch.manual_seed(0)
    m = fastmim.create_model("simmim_vit_tiny_patch16", img_size=64, depth=1).eval()
    latent = torch.randn(2, 17, 192, generator=_g(3))
    with torch.no_grad():
        out = m.forward_decoder(latent)
        torch.testing.assert_close(out, m.decoder.forward_tokens(latent[:, 1:], (4, 4)))
        other_cls = latent.clone()
        other_cls[:, 0] += 5.0
        torch.testing.assert_close(m.forward_decoder(other_cls), out, rtol=0, atol=0)


def test_fcmae_decoder_takes_projected_features_at_visible_cells_and_the_mask_token_at_hidden_ones():
    """ConvNeXt V2's FCMAE: x * (1 - mask) + mask_token * mask on the projected [B, Dd, gh, gw] features (replacing,
    not adding: the projection's bias is non-zero here), mask in raster order."""
    torch.manual_seed(0)
    m = fastmim.create_model("fcmae_convnextv2_atto", img_size=64).eval()
    gh, gw = m.grid_size
    latent = torch.randn(2, m.proj.in_channels, gh, gw, generator=_g(4))
    mask = random_masking(2, gh * gw, 0.6, generator=_g(5)).mask
    mask[0, 1] = 1.0  # (row 0, column 1 hidden, row 1 column 0 visible: a transposed mask differs)
    mask[0, gw] = 0.0
    seen = {}
    handle = m.decoder.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        m.proj.bias.normal_(generator=_g(6))
        m.mask_token.normal_(generator=_g(7))
        m.forward_decoder(latent, mask)
    handle.remove()
    hidden = mask.view(2, 1, gh, gw).bool()
    proj = m.proj(latent).detach()
    token = m.mask_token.detach().view(1, -1, 1, 1).expand_as(proj)
    torch.testing.assert_close(seen["x"], torch.where(hidden, token, proj))
