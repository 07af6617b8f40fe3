import json

import pytest
import torch

import fastmim
from fastmim.masking import random_masking
from fastmim.ops import patchify_ref
from tests.conftest import run_cli


def small_fcmae(**kwargs):
    torch.manual_seed(0)
    return fastmim.create_model("fcmae_convnextv2_atto", img_size=96, decoder_embed_dim=32, **kwargs)


def test_forward_shapes_and_mask_count():
    m = small_fcmae()
    loss, pred, mask = m(torch.randn(3, 3, 96, 96))
    assert pred.shape == (3, 9, 32 * 32 * 3) and mask.shape == (3, 9) and pred.is_contiguous()
    assert (mask.sum(1) == 9 - int(9 * 0.4)).all() and loss.ndim == 0 and torch.isfinite(loss)


def test_loss_is_norm_pix_mse_on_masked_patches():
    m = small_fcmae(sparse_backend="fastmim")
    imgs = torch.randn(2, 3, 96, 96)
    info = random_masking(2, 9, 0.6, generator=torch.Generator().manual_seed(0))
    loss, pred, mask = m(imgs, mask=info)
    target = patchify_ref(imgs, 32)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_backends_and_the_plain_loss_give_the_same_loss_and_gradients():
    m = small_fcmae(drop_path_rate=0.2)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(2, 3, 96, 96)
    info = random_masking(2, 9, 0.6, generator=torch.Generator().manual_seed(3))
    results = []
    for backend, fused in (("dense_masked", False), ("fastmim", True), ("dense_masked", True)):
        m.sparse_backend, m.fused_ops = backend, fused
        m.zero_grad()
        torch.manual_seed(7)
        loss, _, _ = m(imgs, mask=info)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for n, g in grads.items():
            scale = results[0][1][n].abs().max().clamp_min(1e-8)
            torch.testing.assert_close(g / scale, results[0][1][n] / scale, rtol=1e-4, atol=1e-5, msg=n)


def test_spconv_backend_gives_the_fastmim_loss_and_gradients():
    """sparse_backend="spconv" is accepted (spconv is only imported at the first forward) and, where spconv is
    installed, trains the same as the fastmim rows backend (FCMAE's known per-sample count: the no-sync layouts)."""
    m = small_fcmae(sparse_backend="spconv", drop_path_rate=0.2)
    assert m.backend_for(torch.device("cpu")) == "spconv"
    pytest.importorskip("spconv.pytorch", reason="optional dependency spconv missing: pip install spconv-cu120")
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(2, 3, 96, 96)
    info = random_masking(2, 9, 0.6, generator=torch.Generator().manual_seed(3))
    results = []
    for backend in ("fastmim", "spconv"):
        m.sparse_backend = backend
        m.zero_grad()
        torch.manual_seed(7)
        loss, _, _ = m(imgs, mask=info)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for n, g in grads_b.items():
        scale = grads_a[n].abs().max().clamp_min(1e-8)
        torch.testing.assert_close(g / scale, grads_a[n] / scale, rtol=1e-4, atol=1e-5, msg=n)


def test_auto_backend_picks_the_compiled_sparse_kernels(monkeypatch):
    from fastmim import _ext

    m = small_fcmae()
    assert m.backend_for(torch.device("cuda")) == "fastmim"
    monkeypatch.setattr(_ext, "available", lambda: True)
    assert m.backend_for(torch.device("cpu")) == "fastmim"
    monkeypatch.setattr(_ext, "available", lambda: False)  # no fastmim._C: the dense kernels are faster
    assert m.backend_for(torch.device("cpu")) == "dense_masked"
    m.sparse_backend = "fastmim"
    assert m.backend_for(torch.device("cpu")) == "fastmim"


def test_two_training_steps_reduce_loss_on_a_fixed_batch():
    m = small_fcmae()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    imgs = torch.randn(4, 3, 96, 96)
    info = random_masking(4, 9, 0.6, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss, _, _ = m(imgs, mask=info)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_encoder_state_dict_loads_into_timm():
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    m = small_fcmae()
    enc = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)
    enc.load_state_dict(m.encoder_state_dict(), strict=True)
    assert not any(k.startswith(("proj", "mask_token", "decoder", "pred")) for k in m.encoder_state_dict())


def test_reconstruct_undoes_norm_pix():
    m = small_fcmae()
    imgs = torch.randn(2, 3, 96, 96)
    target = patchify_ref(imgs, 32)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(m.reconstruct(imgs, normed), imgs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patch_size=16), "patch_size must equal the encoder's total stride 32"),
        (dict(img_size=100), "not divisible by the patch size 32"),
        (dict(mask_ratio=1.0), "open interval"),
        (dict(mask_ratio=0.0), "open interval"),
        (dict(sparse_backend="minkowski"), "sparse_backend must be one of"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastmim.create_model("fcmae_convnextv2_atto", **{"img_size": 96, **kwargs})


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="expected images"):
        small_fcmae()(torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_cli_fcmae_on_the_built_in_photos_lowers_the_loss(tmp_path):
    out = tmp_path / "fcmae"
    args = ["--model", "fcmae_convnextv2_atto", "--img-size", "96", "--batch-size", "8", "--epochs", "3",
            "--warmup-epochs", "0.5", "--lr", "2e-3", "--num-workers", "0", "--device", "cpu", "--amp", "none",
            "--log-interval", "1", "--vis-interval", "3", "--decoder-embed-dim", "64",
            "--output-dir", str(out)]  # fmt: skip
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[: len(rows) // 4], rows[-len(rows) // 4 :]
    assert sum(x["loss"] for x in last) / len(last) < 0.95 * sum(x["loss"] for x in first) / len(first)
    assert (out / "encoder.safetensors").exists() and (out / "reconstructions" / "epoch_0003.png").exists()


def test_cli_rejects_mae_only_options_for_fcmae(tmp_path, capsys):
    from fastmim import pretrain

    code = pretrain.main(["--model", "fcmae_convnextv2_atto", "--decoder-num-heads", "4", "--device", "cpu",
                          "--output-dir", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "does not apply to FCMAE" in capsys.readouterr().err


@pytest.mark.slow
def test_fcmae_compiles_as_one_graph_and_matches_eager():
    """With FCMAE's fixed count of visible patches the sparse encoder needs no host sync: fullgraph=True traces it."""
    torch.manual_seed(0)
    m = fastmim.create_model("fcmae_convnextv2_atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                             decoder_embed_dim=16, sparse_backend="fastmim")  # fmt: skip
    imgs = torch.randn(2, 3, 64, 64)
    info = random_masking(2, 4, 0.5, generator=torch.Generator().manual_seed(0))
    loss, _, _ = m(imgs, mask=info)
    loss_c, _, _ = torch.compile(m, fullgraph=True, backend="aot_eager")(imgs, mask=info)
    torch.testing.assert_close(loss_c, loss)
