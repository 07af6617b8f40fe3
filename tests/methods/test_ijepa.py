"""I-JEPA on a ViT: the loss against the formula written out (the predictor step by step, smooth L1 against the
teacher's layer-normed features at the target blocks), the truncation of target blocks, the EMA teacher over the
whole run, the timm export, and the CLI (the same losses whether the masks come from loader workers or not, an exact
resume with the teacher)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastmim
from fastmim import pretrain
from fastmim.masking import Masks
from fastmim.methods.ijepa import IJEPA_MOMENTUM, target_indices
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import assert_encoder_matches_timm, tiny_args_for


def _tiny(**kw):
    torch.manual_seed(0)
    return fastmim.create_model("ijepa_vit_tiny_patch16", **{"img_size": 64, "depth": 2, "pred_depth": 2, **kw})


def _imgs(b=4, seed=1):
    return torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_target_indices_truncate_to_the_smallest_block_in_raster_order():
    t = torch.zeros(2, 2, 16, dtype=torch.bool)
    t[0, 0, [1, 2, 5, 6]] = True
    t[0, 1, [0, 3, 9]] = True
    t[1, 0, [7, 8, 11]] = True
    t[1, 1, [4, 12, 13, 14, 15]] = True
    assert target_indices(t).tolist() == [[[1, 2, 5], [0, 3, 9]], [[7, 8, 11], [4, 12, 13]]]
    assert torch.equal(target_indices(t, tokens=3), target_indices(t))  # the count the host knows: no read
    with pytest.raises(ValueError, match="target_tokens=4 but the smallest target block holds 3 tokens"):
        target_indices(t, tokens=4)  # (a wrong count would take tokens outside the blocks: checked where it is free)


def test_loss_is_smooth_l1_of_the_predictor_against_the_teachers_layer_normed_blocks():
    m = _tiny()
    with torch.no_grad():  # the student away from the teacher, as after training
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        g = torch.Generator().manual_seed(7)  # the teacher's final norm learned an affine (it follows the student):
        m.teacher.model.norm.weight.mul_(1 + torch.rand(192, generator=g))  # the target's own layer norm undoes it
        m.teacher.model.norm.bias.add_(torch.randn(192, generator=g) * 0.5)
    imgs = _imgs()
    drawn = m.mask_strategy()(indices=torch.arange(4), epoch=1)
    info = drawn.info()
    loss, pred, mask = m(imgs, mask=info, targets=drawn.targets)
    tgt = target_indices(drawn.targets)  # [B, K, T]
    b, k, t = tgt.shape
    assert pred.shape == (b * k, t, 192) and torch.equal(mask, info.mask)
    with torch.no_grad():
        # context encoder on the context tokens
        x = m.patch_embed(imgs) + m.pos_embed  # no class token
        x = torch.stack([x[i, info.ids_keep[i]] for i in range(b)])
        z = m.encode_tokens(x)
        pos = m.predictor_pos_embed[0]  # [N, Dp]
        rows = []
        for i in range(b):
            ctx = m.predictor_embed(z[i]) + pos[info.ids_keep[i]]
            for j in range(k):
                q = m.mask_token[0] + pos[tgt[i, j]]
                y = torch.cat([ctx, q])[None]
                for blk in m.predictor_blocks:
                    y = blk(y)
                rows.append(m.predictor_proj(m.predictor_norm(y[0, -t:])))
        want_pred = torch.stack(rows)
        h = m.teacher.model.forward_features(imgs)
        h = F.layer_norm(h, h.shape[-1:])
        want_h = torch.stack([h[i, tgt[i, j]] for i in range(b) for j in range(k)])
    torch.testing.assert_close(pred.detach(), want_pred, rtol=1e-4, atol=1e-5)
    want = F.smooth_l1_loss(want_pred, want_h)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_teacher_momentum_runs_over_the_whole_run():
    m = _tiny()
    m.set_total_steps(4)
    moms = []
    for _ in range(5):
        moms.append(m.teacher.momentum())
        m.after_step()
    assert moms == pytest.approx([0.996, 0.997, 0.998, 0.999, 1.0])
    assert IJEPA_MOMENTUM == (0.996, 1.0) and int(m.teacher.updates) == 5
    assert m.encoder_state_dict().keys() == m.context_encoder_state_dict().keys()  # the encoder's keys alone
    assert not any(n.startswith(("teacher.", "predictor_", "mask_token")) for n in m.context_encoder_state_dict())


def test_the_exported_encoder_is_the_target_encoder_as_ijepa_evaluates():
    """encoder.safetensors, the kNN monitor and convert take ``encoder_state_dict()``: I-JEPA's target encoder (the EMA
    teacher, which the paper evaluates) by default, the context encoder with export_encoder="context". The two differ
    once the student has trained; the teacher starts as the student's copy."""
    m = _tiny()
    teacher = {
        k.removeprefix("teacher.model."): v.clone() for k, v in m.state_dict().items() if k.startswith("teacher.model.")
    }
    student = m.context_encoder_state_dict()
    assert teacher.keys() == student.keys() == m.encoder_state_dict().keys()
    m.set_total_steps(10)
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight.add_(1.0)  # the student moves; one EMA step moves the teacher by 1 - 0.996 of it
    m.after_step()
    got, ctx = m.encoder_state_dict(), m.context_encoder_state_dict()
    key = "blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(got[key], m.teacher.model.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(got[key] - teacher[key], torch.full_like(got[key], 0.004), atol=1e-6, rtol=0)
    torch.testing.assert_close(ctx[key], m.blocks[0].mlp.fc1.weight)
    from fastmim.config import migrate_saved_config  # a run saved before the target encoder was the export keeps

    saved = {"model": "ijepa_vit_tiny_patch16", "model_args": {"pred_depth": 2}}  # exporting the context encoder
    assert migrate_saved_config(saved, 2)["model_args"] == {"export_encoder": "context", "pred_depth": 2}
    assert migrate_saved_config(saved, 3)["model_args"] == saved["model_args"]
    context = _tiny(export_encoder="context")
    assert context.encoder_state_dict().keys() == ctx.keys()
    with pytest.raises(ValueError, match="export_encoder must be one of target, context"):
        _tiny(export_encoder="student")


def test_without_set_total_steps_the_momentum_stays_at_its_start_and_says_so():
    """A training loop of one's own that never calls set_total_steps: the teacher keeps following at 0.996 (it used
    to freeze at 1.0 after one update, silently) and the first after_step warns."""
    m = _tiny()
    with pytest.warns(UserWarning, match=r"set_total_steps\(N\) was not called"):
        m.after_step()
    m.after_step()
    assert m.teacher.momentum() == pytest.approx(0.996)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(momentum=0.9), r"momentum must be \[start, end\]"),
        (dict(momentum=(0.9, 1.0, 5)), r"momentum must be \[start, end\]"),
        (dict(momentum=(0.9, 1.5)), "momentum's end must be a number in"),
        (dict(pred_depth="two"), "pred_depth must be an int >= 1, got 'two'"),
        (dict(pred_depth=0), "pred_depth must be an int >= 1, got 0"),
        (dict(batch_shared="maybe"), "batch_shared must be true or false, got 'maybe'"),
        (dict(img_size=32), "needs a grid of at least 3x3 patches.*img_size 32 at patch 16 gives 2x2"),
        (dict(img_size=16), "gives 1x1"),  # (every target token was in the context there)
    ],
)
def test_settings_from_model_args_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**kwargs)


def test_bad_inputs():
    m = _tiny()
    drawn = m.mask_strategy()(indices=torch.arange(4))
    with pytest.raises(ValueError, match="needs the target blocks"):
        m(_imgs(), mask=drawn.info())
    with pytest.raises(ValueError, match="needs the masks' index form"):
        m(_imgs(), mask=Masks(drawn.mask).info(ids=False), targets=drawn.targets)
    with pytest.raises(ValueError, match="pred_dim 100 must divide"):
        _tiny(pred_dim=100)
    with pytest.raises(ValueError, match="mask_ratio does not apply"):
        m(_imgs(), mask_ratio=0.5)
    with pytest.raises(ValueError, match="every target block must hold at least one token"):
        m(_imgs(), mask=drawn.info(), targets=torch.zeros_like(drawn.targets))
    with pytest.raises(ValueError, match="targets hold True/1 at each block's tokens"):
        m(_imgs(), mask=drawn.info(), targets=drawn.targets.float() * 2)
    torch.manual_seed(0)  # 0/1 blocks are the bool ones
    want = m(_imgs(), mask=drawn.info(), targets=drawn.targets)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(m(_imgs(), mask=drawn.info(), targets=drawn.targets.float())[0], want)


def test_encoder_exports_to_timm():
    """No class token, as I-JEPA's ViT: timm's class_token=False with average pooling over the final-normed tokens;
    fastmim's forward pools the same way."""
    m = _tiny()
    assert m.cls_token is None and m.pos_embed.shape == (1, 16, 192)
    assert_encoder_matches_timm(m, depth=2, class_token=False, global_pool="avg", fc_norm=False)
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    enc = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=16, num_classes=0, embed_dim=192,
                                                          depth=2, num_heads=3, class_token=False,
                                                          global_pool="avg", fc_norm=False)  # fmt: skip
    enc.load_state_dict(m.encoder_state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = fastmim.models.vit.VisionTransformer.forward(m, x)  # the encoder's forward: the tokens' mean
        torch.testing.assert_close(enc(x), pooled, rtol=1e-5, atol=1e-5)


def _cli_args(image_folder, out, *extra, epochs=2):
    return [*tiny_args_for("ijepa_vit_tiny_patch16"), "--data-path", str(image_folder), "--output-dir", str(out),
            "--log-interval", "1", "--vis-interval", "100", "--loader", "torch", "--epochs", str(epochs),
            *extra]  # fmt: skip


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_cli_trains_with_worker_masks_and_resumes_exactly(image_folder, tmp_path, capsys):
    """Masks drawn in loader workers (with their target blocks) or on the device: the same losses; a run stopped after
    5 steps and resumed equals the straight run bit for bit, the teacher included (its momentum runs over the
    configured epochs, whatever --max-steps stops at)."""
    full, workers, half = tmp_path / "full", tmp_path / "workers", tmp_path / "half"
    pretrain.run(_cli_args(image_folder, full))
    pretrain.run([*_cli_args(image_folder, workers), "--num-workers", "2"])
    assert _losses(workers) == _losses(full) and len(_losses(full)) >= 4
    a = load_checkpoint(full / "checkpoint.pt")
    assert int(a["model"]["teacher.updates"]) == a["step"]
    pretrain.run([*_cli_args(image_folder, half), "--max-steps", "5"])  # stopped mid-run: the schedules stay the run's
    steps = str(a["step"])
    pretrain.run([*_cli_args(image_folder, half), "--resume", str(half / "checkpoint.pt"), "--max-steps", steps])
    b = load_checkpoint(half / "checkpoint.pt")
    assert _losses(half) == _losses(full)
    for key, v in a["model"].items():
        assert torch.equal(b["model"][key], v), key
    assert pretrain.main(_cli_args(image_folder, tmp_path / "x", "--mask-ratio", "0.5")) == 2
    assert "--mask-type and --mask-ratio do not apply" in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["ref", "torch", "cpp"])
def test_per_sample_blocks_are_truncated_to_the_batch_smallest_context(impl):
    """batch_shared=False: each sample draws its own block sizes; every context is then truncated to the call's
    smallest (its first tokens in raster order), so the model can gather it and train (it raised before)."""
    from fastmim import _ext
    from fastmim.masking import build_mask

    if impl == "cpp" and not _ext.available():
        pytest.skip("fastmim._C not built")
    model = fastmim.create_model("ijepa_vit_tiny_patch16", img_size=224, depth=2, pred_depth=1, batch_shared=False)
    strategy = model.mask_strategy(seed=3)
    strategy.impl = impl
    from fastmim.methods.ijepa import IJEPA_MASK

    plain = build_mask("multiblock", model.grid_size, seed=3, impl=impl, batch_shared=False,
                       **{**IJEPA_MASK, "min_keep": strategy.min_keep})  # fmt: skip
    idx = torch.arange(8)
    untruncated, truncated = plain(indices=idx), strategy(indices=idx)
    before = (~untruncated.mask.flatten(1)).sum(1)
    assert before.unique().numel() > 1  # the per-sample contexts differ in size: the case that raised
    after = ~truncated.mask.flatten(1)
    assert (after.sum(1) == before.min()).all() and truncated.num_hidden == after.shape[1] - int(before.min())
    ctx = ~untruncated.mask.flatten(1)
    assert not (after & ~ctx).any()  # a subset of each sample's context ...
    assert (after == (ctx & (torch.cumsum(ctx, 1) <= before.min()))).all()  # ... its first tokens in raster order
    assert torch.equal(truncated.targets, untruncated.targets)
    loss = model(torch.randn(8, 3, 224, 224), mask=truncated.info(), targets=truncated.targets)[0]
    loss.backward()
    assert torch.isfinite(loss)


def test_a_resume_at_another_batch_size_keeps_the_teachers_schedule_with_the_steps(image_folder, tmp_path, capsys):
    """Stopped inside the epoch at step 1 with batch 8 and resumed with batch 4: the step count moves to the new
    units (step 2) and the teacher's update count with it, so its momentum stays where the learning rate is."""
    out = tmp_path / "run"
    pretrain.run([*_cli_args(image_folder, out), "--batch-size", "8", "--max-steps", "1"])
    pretrain.run(["--resume", "--output-dir", str(out), "--batch-size", "4", "--max-steps", "3"])
    said = capsys.readouterr().out
    assert "note: step 1 of the saved run is step 2 now: an epoch is 6 steps (batch_size 8 -> 4) (metrics.jsonl's " \
        "rows from here carry the new numbers); --max-steps 3 counts steps of 4 images" in said  # fmt: skip
    # the peak lr follows the images per step unless --lr fixes it: said, with the way to keep the run's
    assert "note: the peak lr follows the images per step (8 -> 4, --blr" in said and "--lr " in said, said
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and int(state["model"]["teacher.updates"]) == 3


@pytest.mark.parametrize("workers", ["0", "1"])
def test_the_trainer_gives_the_forward_the_target_size_from_the_host(image_folder, tmp_path, monkeypatch, workers):
    """The smallest target block's size is counted where the masks are drawn, on the CPU, and handed to the forward:
    counted there from targets on a GPU it was a host sync every step (and a graph break under torch.compile)."""
    import fastmim.methods.ijepa as ijepa

    real, given = ijepa.target_indices, []

    def recording(targets, tokens=None):
        given.append(tokens)
        return real(targets, tokens)

    monkeypatch.setattr(ijepa, "target_indices", recording)
    out = tmp_path / "run"
    pretrain.run(_cli_args(image_folder, out, "--max-steps", "2", "--num-workers", workers, epochs=1))
    assert len(_losses(out)) == 2 and len(given) >= 2 and None not in given, given


def test_a_gpu_run_draws_masks_with_a_cpp_generator_on_the_cpu(monkeypatch):
    """Drawn for a GPU without loader workers (DALI): a strategy with a C++ generator draws on the CPU, counts there
    and the masks are copied asynchronously; drawn on the GPU, its counts were host syncs. One without (data2vec 2.0's
    inverse blocks) draws on the GPU."""
    from types import SimpleNamespace

    from fastmim.masking import build_mask
    from fastmim.train.engine import Trainer

    asked = []

    class Recording:
        def __init__(self, strategy):
            self.strategy, self.impl, self.has_cpp = strategy, strategy.impl, strategy.has_cpp

        def __call__(self, **kw):
            asked.append(str(kw["device"]))
            return self.strategy(**{**kw, "device": "cpu"})

    idx = torch.arange(8, 16)
    multiblock = build_mask("multiblock", 14, seed=3)
    trainer = SimpleNamespace(device=torch.device("cuda", 0), masks=Recording(multiblock))
    masks = Trainer._draw_masks(trainer, idx, 2)
    if fastmim._ext.available():
        assert asked == ["cpu"] and masks.target_tokens is not None
        expected = build_mask("multiblock", 14, seed=3, impl="cpp")(indices=idx, epoch=2)
        assert torch.equal(masks.mask, expected.mask) and torch.equal(masks.targets, expected.targets)
    trainer.masks = Recording(build_mask("inverse_block", 14, seed=3))
    Trainer._draw_masks(trainer, idx, 2)
    assert asked[-1] == "cuda:0"
