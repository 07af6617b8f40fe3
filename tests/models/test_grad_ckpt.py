"""Activation checkpointing (``--grad-ckpt``): the same loss and gradients as without it, the blocks run again in
the backward (counted), for the ViT recipes (encoder, MAE's decoder, I-JEPA's predictor) and FCMAE's ConvNeXt V2."""

from __future__ import annotations

import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.models.vit import set_grad_ckpt
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import TINY_ARGS

MODELS = {
    "mae_vit_tiny_patch16": dict(img_size=64, depth=2, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2),
    "ijepa_vit_tiny_patch16": dict(img_size=64, depth=2, pred_depth=1),
    "fcmae_convnextv2_atto": dict(img_size=64, drop_path_rate=0.1),
}


def _loss_and_grads(name, ckpt):
    torch.manual_seed(0)
    m = fastmim.create_model(name, **MODELS[name])
    assert set_grad_ckpt(m, ckpt) >= 1
    calls = []
    # the first block of each trained stack (the teacher runs without gradients: nothing to recompute)
    blocks = [mod for n, mod in m.named_modules() if n.endswith("blocks.0") and not n.startswith("teacher.")]
    for b in blocks:
        b.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, 64, 64)
    loss = m(imgs)[0]
    forward_calls = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, forward_calls, len(calls)


@pytest.mark.parametrize("name", list(MODELS))
def test_same_loss_and_gradients_with_the_blocks_recomputed(name):
    loss, grads, fwd, total = _loss_and_grads(name, False)
    loss_c, grads_c, fwd_c, total_c = _loss_and_grads(name, True)
    assert loss_c == loss and grads_c.keys() == grads.keys()
    for k, g in grads.items():
        torch.testing.assert_close(grads_c[k], g, rtol=1e-5, atol=1e-7, msg=k)
    if name.startswith("fcmae_"):  # FCMAE's blocks run through functions, not their forward: no hook to count
        return
    assert total == fwd and fwd_c == fwd and total_c == 2 * fwd  # each hooked block ran again in the backward


def test_cli_flag(image_folder, tmp_path):
    """--grad-ckpt trains the same weights as without it."""
    runs = {}
    for flag in ([], ["--grad-ckpt"]):
        out = tmp_path / ("ckpt" if flag else "plain")
        pretrain.run([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--max-steps", "2",
                      *flag])  # fmt: skip
        runs[bool(flag)] = load_checkpoint(out / "checkpoint.pt")["model"]
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=1e-6, atol=1e-7, msg=k)
