"""data2vec 2.0 on a ViT: the teacher's targets against the formula written out in float64, the loss against the
paper's formula, M masks per image equal to M single-mask passes against one teacher pass (values and gradients),
the EMA update after each optimizer step, an exact resume with the teacher, the timm export and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fastmim
from fastmim import pretrain
from fastmim.masking import Masks
from fastmim.methods import data2vec2
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import assert_encoder_matches_timm, tiny_args_for


def _tiny(**kw):
    torch.manual_seed(0)
    kw = {"img_size": 64, "depth": 3, "num_masks": 4, **kw}
    return fastmim.create_model("data2vec2_vit_tiny_patch16", **kw)


def _imgs(b=2, seed=1):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed=5):
    """Student weights away from the teacher's (a copy at construction), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("teacher."):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _targets_written_out(model, imgs, top_k):
    """The teacher in float64 block by block (pre-norm: x + attn(norm1 x), then the FFN output t = mlp(norm2 x) before
    the residual); t without the class token, instance-normalised over tokens with biased variance and eps 1e-5,
    averaged over the last top_k blocks, layer-normalised over channels (eps 1e-5, no affine)."""
    t = model.teacher.model.double()
    try:
        with torch.no_grad():
            x = t.patch_embed(imgs.double()) + t.pos_embed[:, 1:]
            x = torch.cat([(t.cls_token + t.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
            outs = []
            for blk in t.blocks:
                x = x + blk.attn(blk.norm1(x))
                f = blk.mlp(blk.norm2(x))
                x = x + f
                outs.append(f[:, 1:])
            normed = []
            for f in outs[-top_k:]:
                mu, var = f.mean(1, keepdim=True), f.var(1, unbiased=False, keepdim=True)
                normed.append((f - mu) / torch.sqrt(var + 1e-5))
            y = sum(normed) / top_k
            mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
            return (y - mu) / torch.sqrt(var + 1e-5)
    finally:
        t.float()


def test_targets_are_the_top_k_ffn_outputs_instance_then_layer_normed():
    m = _tiny(top_k=2)
    imgs = _imgs()
    got = m.targets(imgs)
    assert got.shape == (2, 16, 192) and got.dtype == torch.float32 and not got.requires_grad
    np.testing.assert_allclose(got.numpy(), _targets_written_out(m, imgs, 2).numpy(), rtol=1e-4, atol=1e-4)
    assert m.top_k == 2 and _tiny().top_k == 1  # default: depth - 2 (ViT-B: the top 10 of 12)


def test_loss_is_the_papers_regression_plus_the_class_token_term(monkeypatch):
    """loss = sum_masked sum_d (pred - y)^2 / sqrt(D) / S + 0.01 x 256 x mean_rows sum_d (cls - mean_tokens y)^2 /
    sqrt(D) (fairseq's sum over a GPU's 16 x 16 masked copies, as a mean)."""
    monkeypatch.setattr(data2vec2, "DATA2VEC2_NOISE_STD", 0.0)
    m = _tiny()
    _perturb(m)
    imgs = _imgs()
    info = m.make_mask(2, torch.device("cpu"))
    loss, pred, mask = m(imgs, mask=info)
    assert pred.shape == (8, 16, 192) and mask.shape == (8, 16)
    y = m.targets(imgs).double().repeat_interleave(4, 0)
    with torch.no_grad():
        x = (m.patch_embed(imgs) + m.pos_embed[:, 1:]).repeat_interleave(4, 0)
        x = torch.gather(x, 1, info.ids_keep.unsqueeze(-1).expand(-1, -1, 192))
        cls = m.encode_tokens(x)[:, 0].double()
    d = 192
    reg = (((pred.detach().double() - y) ** 2).sum(-1) * mask).sum() / mask.sum() / math.sqrt(d)
    cls_term = ((cls - y.mean(1)) ** 2).sum(-1).mean() / math.sqrt(d)
    assert float(loss.detach()) == pytest.approx(float(reg + 0.01 * 256 * cls_term), rel=1e-5)


def test_decoder_input_keeps_the_visible_outputs_and_puts_noise_at_the_masked_tokens():
    m = _tiny()
    info = m.make_mask(2, torch.device("cpu"))
    vis = torch.randn(8, info.ids_keep.shape[1], 192)
    torch.manual_seed(3)
    x = m.decoder_input(vis, info.ids_restore)
    expect = torch.gather(x, 1, info.ids_keep.unsqueeze(-1).expand(-1, -1, 192))
    torch.testing.assert_close(expect, vis)
    noise = x[info.mask.bool()]
    assert noise.shape == (8 * 13, 192) and 0.007 < float(noise.std()) < 0.013 and abs(float(noise.mean())) < 0.002


def test_m_masks_equal_m_single_mask_passes_against_one_teacher_pass(monkeypatch):
    """With M masks (equal counts) the loss is the mean of the M single-mask losses, its gradients the mean of theirs;
    the teacher runs once (counted)."""
    monkeypatch.setattr(data2vec2, "DATA2VEC2_NOISE_STD", 0.0)
    m = _tiny()
    _perturb(m)
    imgs = _imgs()
    info = m.make_mask(2, torch.device("cpu"))
    calls = []
    real = data2vec2.teacher_targets
    monkeypatch.setattr(data2vec2, "teacher_targets", lambda *a: calls.append(1) or real(*a))
    embedded = []  # the student's patch embedding: once per image, repeated after (clone_batch), not M times
    hook = m.patch_embed.register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].shape[0]))
    loss = m(imgs, mask=info)[0]
    hook.remove()
    assert len(calls) == 1 and embedded == [2]
    params = [p for p in m.parameters() if p.requires_grad]
    multi = torch.autograd.grad(loss, params, allow_unused=True)
    masks = info.mask.view(2, 4, 16)
    single = sum(m(imgs, mask=Masks(masks[:, j].bool()).info())[0] for j in range(4)) / 4
    assert len(calls) == 5
    assert float(loss.detach()) == pytest.approx(float(single.detach()), rel=1e-5)
    grads = torch.autograd.grad(single, params, allow_unused=True)
    for a, b in zip(multi, grads, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_follows_the_student_by_ema_and_is_not_trained():
    m = _tiny()
    assert all(not p.requires_grad for p in m.teacher.parameters())
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher.") for n in names)
    _perturb(m)
    before = {n: p.detach().clone() for n, p in m.teacher.model.named_parameters()}
    student = dict(m.named_parameters())
    m.after_step()
    mom = data2vec2.DATA2VEC2_MOMENTUM[0]
    for n, p in m.teacher.model.named_parameters():
        want = mom * before[n] + (1 - mom) * student[n].detach()
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    assert int(m.teacher.updates) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(momentum=(0.9, 1.0)), r"momentum must be \[start, end, updates\]"),
        (dict(momentum=(0.9, 1.0, 2.5)), "momentum's updates must be an int >= 1"),
        (dict(top_k=2.5), "top_k must be an int in"),
        (dict(cls_weight=-1), "cls_weight must be a finite number >= 0"),
        (dict(img_size=16), "needs at least 2 patches; img_size 16 at patch 16 gives 1"),
        (dict(mask_ratio=1.5), r"mask_ratio must be a number in the open interval \(0, 1\), got 1.5"),
        (dict(mask_ratio="0.8"), "mask_ratio must be a number"),  # at construction, not at the first forward
        (dict(num_masks=100_000), r"num_masks must be an int in \[1, 256\]"),  # B x M student passes a step
        (dict(mask_adjust=-0.1), "mask_adjust must be a number in"),
    ],
)
def test_settings_from_model_args_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastmim.create_model("data2vec2_vit_tiny_patch16", **{"img_size": 32, **kwargs})


def test_large_and_huge_take_fairseqs_own_configs():
    """fairseq's large_images_only_task.yaml and huge_images14_only_task.yaml (no prenet: top 18 of 24, 24 of 32;
    75% masked with adjust 0.1; a 3-layer kernel-5 decoder 1024 wide; 8 x 16 class rows; their momentum), not ViT-B's
    extrapolated; a keyword still overrides them."""
    want = {"data2vec2_vit_base_patch16": (10, 0.8, 0.07, 256, 6, 3, 768, (0.9998, 0.99999, 100_000)),
            "data2vec2_vit_large_patch16": (18, 0.75, 0.1, 128, 3, 5, 1024, (0.9998, 0.99999, 150_000)),
            "data2vec2_vit_huge_patch14": (24, 0.75, 0.1, 128, 3, 5, 1024, (0.9998, 1.0, 300_000))}  # fmt: skip
    for name, values in want.items():
        with torch.device("meta"):
            m = fastmim.create_model(name)
        convs = [c for c in m.decoder.modules() if isinstance(c, torch.nn.Conv2d)]
        got = (m.top_k, m.mask_ratio, m.mask_adjust, m.cls_rows, len(convs), convs[0].kernel_size[0],
               convs[0].out_channels, (m.teacher.start, m.teacher.end, m.teacher.total_updates))  # fmt: skip
        assert got == values, (name, got)
    with torch.device("meta"):
        assert fastmim.create_model("data2vec2_vit_large_patch16", top_k=12, mask_ratio=0.8).top_k == 12
    # a resume's note names the recipe's own mask ratio for an unset --mask-ratio (it said MAE's and FCMAE's)
    assert pretrain._setting_text("mask_ratio", None, "data2vec2_vit_tiny_patch16") == "unset (the model's, 0.8)"
    assert pretrain._setting_text("mask_ratio", None, "data2vec2_vit_large_patch16") == "unset (the model's, 0.75)"
    assert pretrain._setting_text("mask_ratio", 0.5, "data2vec2_vit_large_patch16") == "0.5"


def test_the_teacher_stays_fp32_or_says_why_and_follows_parameters_a_load_replaced():
    m = _tiny(momentum=(0.0, 0.0, 1))  # momentum 0: after an update the teacher equals the student
    m.after_step()  # (the student's parameter list is built here)
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)  # new Parameter objects
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight.add_(1)
    m.after_step()
    assert torch.equal(m.teacher.model.blocks[0].mlp.fc1.weight, m.blocks[0].mlp.fc1.weight)
    with pytest.raises(ValueError, match="teacher was cast to torch.bfloat16; it must stay fp32.*torch.autocast"):
        _tiny().to(torch.bfloat16).after_step()


def test_bad_mask_counts_and_options():
    m = _tiny()
    with pytest.raises(ValueError, match="masks for 3 images"):
        m(_imgs(3), mask=m.make_mask(2, torch.device("cpu")))
    with pytest.raises(ValueError, match="needs the masks' index form"):
        m(_imgs(2), mask=Masks(torch.zeros(8, 16, dtype=torch.bool)).info(ids=False))
    with pytest.raises(ValueError, match=r"num_masks must be an int in \[1, 256\], got 0"):
        _tiny(num_masks=0)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 3\]"):
        _tiny(top_k=4)
    with pytest.raises(ValueError, match="kernel must be odd"):
        _tiny(decoder_kernel=4)
    with pytest.raises(ValueError, match="embed_dim 192 is not divisible by groups 5"):
        _tiny(decoder_groups=5)


def test_encoder_exports_to_timm():
    m = _tiny()
    _perturb(m)
    assert_encoder_matches_timm(m, depth=3)


def _cli_args(image_folder, out, epochs=2):
    return [*tiny_args_for("data2vec2_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
            "--num-masks", "2", "--log-interval", "1", "--vis-interval", "100", "--loader", "torch", "--epochs",
            str(epochs)]  # fmt: skip


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_cli_trains_updates_the_teacher_and_resumes_exactly(image_folder, tmp_path, capsys):
    """Two epochs straight; one epoch, then a resume to two: the same per-step losses bit for bit and the same
    teacher (its EMA state is in the checkpoint); the teacher moved once per optimizer step."""
    full, half = tmp_path / "full", tmp_path / "half"
    pretrain.run(_cli_args(image_folder, full))
    a = load_checkpoint(full / "checkpoint.pt")
    steps = a["step"]
    assert steps >= 4 and int(a["model"]["teacher.updates"]) == steps
    student, teacher = a["model"]["blocks.0.mlp.fc1.weight"], a["model"]["teacher.model.blocks.0.mlp.fc1.weight"]
    assert not torch.equal(student, teacher)
    assert (full / "encoder.safetensors").exists() and not (full / "reconstructions").exists()
    from safetensors import safe_open

    with safe_open(str(full / "encoder.safetensors"), "pt") as f:
        assert f.metadata()["encoder"] == "student"  # (I-JEPA's files say target or context)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    start, end, total = data2vec2.DATA2VEC2_MOMENTUM  # each step's EMA momentum is logged, as fairseq's ema_decay:
    # its update n reads the schedule at n (set_num_updates after the increment), 2e-9 more than at n - 1
    want = [start + (end - start) * n / total for n in range(1, steps + 1)]
    assert [r["ema_momentum"] for r in rows] == pytest.approx(want, rel=0, abs=1e-13)
    pretrain.run(_cli_args(image_folder, half, epochs=1))
    pretrain.run([*_cli_args(image_folder, half), "--resume", str(half / "checkpoint.pt")])
    b = load_checkpoint(half / "checkpoint.pt")
    assert b["step"] == steps and _losses(half) == _losses(full)
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert pretrain.main([*_cli_args(image_folder, tmp_path / "x"), "--decoder-depth", "2"]) == 2
    assert "does not apply to data2vec 2.0" in capsys.readouterr().err
    assert pretrain.main([*_cli_args(image_folder, tmp_path / "y"), "--mask-type", "block"]) == 2
    mae = [*tiny_args_for("mae_vit_tiny_patch16"), "--data-path", str(image_folder), "--num-masks", "2"]
    assert pretrain.main([*mae, "--output-dir", str(tmp_path / "z")]) == 2
    assert "--num-masks applies to data2vec 2.0" in capsys.readouterr().err


@pytest.mark.slow
def test_the_teacher_moves_toward_the_student_after_its_optimizer_step(image_folder, tmp_path):
    """Step 2's EMA update reads the student's weights after step 2's optimizer update, not before (a teacher one
    step behind, with nothing else to show it). A momentum of 0.5 makes the difference far larger than rounding."""
    out = tmp_path / "run"
    args = [*_cli_args(image_folder, out), "--model-args", "momentum=(0.5, 0.5, 1)", "--warmup-epochs", "0",
            "--lr", "1e-3"]  # fmt: skip
    pretrain.run([*args, "--max-steps", "1"])
    h = load_checkpoint(out / "checkpoint.pt")
    pretrain.run([*args, "--resume", str(out / "checkpoint.pt"), "--max-steps", "2"])
    h1 = load_checkpoint(out / "checkpoint.pt")
    assert (h["step"], h1["step"]) == (1, 2) and int(h1["model"]["teacher.updates"]) == 2
    moved = [key for key in h1["model"] if key.startswith("teacher.model.") and h1["model"][key].is_floating_point()]
    assert len(moved) > 10
    apart = 0.0
    for key in moved:
        before, after = (s["model"][key.removeprefix("teacher.model.")].double() for s in (h, h1))
        teacher = h1["model"][key].double()
        torch.testing.assert_close(teacher, 0.5 * h["model"][key].double() + 0.5 * after, rtol=0, atol=1e-7, msg=key)
        apart = max(apart, (0.5 * (after - before)).abs().max().item())
    assert apart > 1e-5  # (the student's step moved the expected teacher by more than the tolerance)


@pytest.mark.slow
def test_torchrun_two_processes_keep_one_teacher(image_folder, tmp_path):
    """DDP: each rank updates its teacher after every all-reduced step, so the ranks' weights, teachers included,
    stay equal bit for bit (the trainer checks the sums of every parameter per rank before saving)."""
    from tests.conftest import run_cli

    out = tmp_path / "ddp"
    args = [*_cli_args(image_folder, out), "--batch-size", "2", "--max-steps", "3"]
    r = run_cli(["--standalone", "--nproc_per_node", "2", "-m", "fastmim.pretrain", *args],
                module=["-m", "torch.distributed.run"], env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and int(state["model"]["teacher.updates"]) == 3
    assert len(state["weights_sum_per_rank"]) == 2 and len(set(state["weights_sum_per_rank"])) == 1
