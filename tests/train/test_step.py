"""TrainStep: the graph-mode step (static inputs, gradients kept and zeroed in place, a tensor learning rate, a fused
capturable optimizer) trains exactly as the eager step. The capture itself needs CUDA (tests/test_gpu.py); here the
same code runs uncaptured, which covers everything a replay depends on except the replay."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fastmim
from fastmim import pretrain
from fastmim.masking import random_masking
from fastmim.train.checkpoint import load_checkpoint
from fastmim.train.optim import build_adamw, set_lr
from fastmim.train.step import TrainStep, check_graph_optimizer
from tests.conftest import TINY_ARGS, tiny_args_for


def _tiny_mae():
    torch.manual_seed(0)
    return fastmim.create_model(
        "mae_vit_tiny_patch16", img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
    )


def _batches(n: int, b: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        m = random_masking(b, 4, 0.75, generator=g)
        out.append((torch.randn(b, 3, 32, 32, generator=g), m.ids_keep, m.ids_restore, m.mask))
    return out


def _stepper(model, graph: bool, accum: int = 2, clip: float | None = 1.0, graph_optimizer: bool | None = None):
    opt = build_adamw(model, 1e-3, 0.05, graph=graph if graph_optimizer is None else graph_optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def forward(imgs, ids_keep, ids_restore, mask):
        return model(imgs, mask=fastmim.masking.MaskInfo(ids_keep, ids_restore, mask))[0]

    step = TrainStep(forward, model.parameters(), opt, scaler, device=torch.device("cpu"), accum_iter=accum,
                     clip_grad=clip, graph=graph)  # fmt: skip
    return step, opt


def _train(model, graph: bool, batches, accum: int = 2, lrs=(1e-3, 3e-3, 2e-3), graph_optimizer=None):
    step, opt = _stepper(model, graph, accum, graph_optimizer=graph_optimizer)
    losses = []
    for i, batch in enumerate(batches):
        if i % accum == 0:
            set_lr(opt, lrs[(i // accum) % len(lrs)])
        losses.append(float(step(*batch, last=i % accum == accum - 1)))
    return step, opt, losses


@pytest.mark.parametrize("optimizer", ["same", "eager's"])
def test_graph_mode_step_trains_as_the_eager_step(optimizer):
    """Three optimizer steps of two accumulated micro-batches each, clipped, with a new learning rate per step: the
    graph-mode step (uncaptured on CPU) ends with the eager step's weights, moments and per-micro-batch losses: bit
    for bit with the same optimizer, to rounding against eager's own (a float learning rate rounds differently in
    the fused kernel than the float32 tensor one: an ulp per update, which parameters whose gradient is rounding
    noise, the attention key biases and some weights, let AdamW scale up)."""
    batches = _batches(6)
    eager_model, graph_model = _tiny_mae(), _tiny_mae()
    _, eager_opt, eager_losses = _train(eager_model, False, batches, graph_optimizer=optimizer == "same")
    step, graph_opt, graph_losses = _train(graph_model, True, batches)
    exact = optimizer == "same"
    assert graph_losses == (eager_losses if exact else pytest.approx(eager_losses, rel=1e-6))
    assert len(set(eager_losses)) == 6  # every micro-batch's input reached the model
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters(), strict=True):
        tol = 0 if exact else 6e-5 if "qkv.bias" in name else 3e-6  # (6e-5: 1% of the 3 steps' updates)
        torch.testing.assert_close(b, a, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    for pa, pb in zip(eager_model.parameters(), graph_model.parameters(), strict=True):
        for k, v in eager_opt.state[pa].items():
            tol = 0 if exact else 1e-5 * float(v.abs().max())
            torch.testing.assert_close(graph_opt.state[pb][k].float(), v.float(), rtol=0, atol=tol)
    # the learning rate the optimizer read was the tensor set_lr filled (a replaced float would be frozen in a graph)
    assert isinstance(graph_opt.param_groups[0]["lr"], torch.Tensor)
    assert float(graph_opt.param_groups[0]["lr"]) == pytest.approx(2e-3)  # the last step's


def test_graph_mode_keeps_its_buffers_and_gradients():
    """What a replay relies on: one static buffer per input, reused; gradients allocated once, zero after each
    optimizer step and never set to None; eager mode frees them instead."""
    model = _tiny_mae()
    step, opt = _stepper(model, True, accum=1)
    batches = _batches(3)
    step(*batches[0])
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) > 10 and all(g is not None for g in grads.values())
    buffers = [t.data_ptr() for t in next(iter(step._static.values()))]
    for batch in batches[1:]:
        step(*batch)
    assert all(p.grad is grads[n] for n, p in model.named_parameters() if p.requires_grad)
    assert all(not g.any() for g in grads.values())
    assert [t.data_ptr() for t in next(iter(step._static.values()))] == buffers and len(step._static) == 1
    eager_model = _tiny_mae()
    eager, _ = _stepper(eager_model, False, accum=1)
    eager(*batches[0])
    assert all(p.grad is None for p in eager_model.parameters())


def test_graph_mode_leaves_parameters_without_gradients_alone():
    """A trainable parameter the loss never reaches gets no gradient in either mode, so AdamW's weight decay does not
    touch it (zero-filled gradients would decay it)."""

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

    torch.manual_seed(0)
    model = WithUnused()
    before = model.unused.weight.detach().clone()
    opt = build_adamw(model, 1e-2, 0.5, graph=True)
    step = TrainStep(lambda x: model.used(x).square().mean(), model.parameters(), opt,
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"), graph=True)  # fmt: skip
    for _ in range(3):
        step(torch.randn(2, 4))
    assert model.unused.weight.grad is None
    torch.testing.assert_close(model.unused.weight, before, rtol=0, atol=0)
    assert not torch.equal(model.used.weight, before)


def test_host_values_are_part_of_the_call():
    """A host value (e.g. the masks' hidden count) is frozen into a graph, so a different value is a different call
    with its own buffers."""
    w = nn.Parameter(torch.ones(4))
    opt = build_adamw(nn.ParameterList([w]), 1e-3, 0.0, graph=True)
    seen = []

    def forward(x, k):
        seen.append(k)
        return (x[:, :k] * w[:k]).sum()

    step = TrainStep(forward, [w], opt, torch.amp.GradScaler("cpu", enabled=False), device="cpu", graph=True)
    step(torch.randn(2, 4), 4)
    step(torch.randn(2, 4), 2)
    step(torch.randn(2, 4), 4)
    assert seen == [4, 2, 4] and len(step._static) == 2


@pytest.mark.parametrize("graph", [False, True])
def test_the_backward_of_a_micro_batch_before_the_last_runs_without_gradient_sync(graph):
    """FSDP2 reads set_requires_gradient_sync in its post-backward hooks: the no-sync context held only the forward,
    so every micro-batch's backward reduce-scattered (DDP decides at the forward). Now it holds the backward too."""
    import contextlib

    w = nn.Parameter(torch.ones(4))
    opt = build_adamw(nn.ParameterList([w]), 1e-3, 0.0, graph=graph)
    state = {"syncing": True}
    seen = []
    w.register_hook(lambda g: seen.append(state["syncing"]))

    @contextlib.contextmanager
    def no_sync():
        state["syncing"] = False
        try:
            yield
        finally:
            state["syncing"] = True

    step = TrainStep(lambda x: (x * w).sum(), [w], opt, torch.amp.GradScaler("cpu", enabled=False), device="cpu",
                     accum_iter=2, no_sync=no_sync, graph=graph)  # fmt: skip
    for _ in range(2):
        step(torch.randn(2, 4), last=False)
        step(torch.randn(2, 4), last=True)
    assert seen == [False, True, False, True]


def test_graph_mode_needs_the_graph_optimizer():
    model = nn.Linear(4, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(ValueError, match="learning rate as a tensor"):
        TrainStep(model, model.parameters(), build_adamw(model, 1e-3, 0.0), scaler, device="cpu", graph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), foreach=False)
    with pytest.raises(ValueError, match="fused"):
        check_graph_optimizer(opt, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)
    with pytest.raises(ValueError, match="capturable"):
        check_graph_optimizer(opt, torch.device("cuda"))
    check_graph_optimizer(opt, torch.device("cpu"))
    with pytest.raises(ValueError, match="accum_iter"):
        TrainStep(model, model.parameters(), opt, scaler, device="cpu", accum_iter=0)


# --- the trainer with --cuda-graph ------------------------------------------------------------------------------


def _args(image_folder, out, *extra, epochs: int = 2) -> list[str]:
    return [*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--log-interval", "1",
            "--vis-interval", "100", "--loader", "torch", "--epochs", str(epochs), *extra]  # fmt: skip


def test_cuda_graph_is_refused_without_cuda(image_folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(pretrain.UsageError, match="--cuda-graph needs a CUDA device"):
        pretrain.run(_args(image_folder, out, "--cuda-graph"))
    assert not out.exists()  # refused before the run directory was made


@pytest.mark.slow
def test_trainer_graph_mode_matches_eager_and_resumes(image_folder, tmp_path, monkeypatch):
    """The trainer's --cuda-graph code path (uncaptured on CPU) against the eager trainer: the same per-step losses and
    final weights with accumulation and clipping; then a run saved in eager mode resumes in graph mode (its
    optimizer stays fused and capturable with a tensor learning rate, whatever the checkpoint held) and continues as
    the eager run does."""
    monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")
    extra = ("--accum-iter", "2", "--clip-grad", "0.5")
    eager, graph = tmp_path / "eager", tmp_path / "graph"
    pretrain.run(_args(image_folder, eager, *extra))
    pretrain.run(_args(image_folder, graph, *extra, "--cuda-graph"))
    a, b = load_checkpoint(eager / "checkpoint.pt"), load_checkpoint(graph / "checkpoint.pt")
    assert a["step"] == b["step"] > 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ra = [json.loads(line) for line in (eager / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (graph / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], rel=1e-6)
    assert [r["lr"] for r in rb] == pytest.approx([r["lr"] for r in ra], rel=1e-12)

    # eager for one epoch, then graph mode from its checkpoint to the end: the eager run's final weights
    half = tmp_path / "half"
    pretrain.run(_args(image_folder, half, *extra, epochs=1))
    state = load_checkpoint(half / "checkpoint.pt")
    assert not isinstance(state["optimizer"]["param_groups"][0]["lr"], torch.Tensor)
    pretrain.run(_args(image_folder, half, *extra, "--cuda-graph", "--resume", str(half / "checkpoint.pt")))
    c = load_checkpoint(half / "checkpoint.pt")
    assert c["step"] == a["step"]
    assert isinstance(c["optimizer"]["param_groups"][0]["lr"], torch.Tensor)
    for k, v in a["model"].items():
        torch.testing.assert_close(c["model"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_trainer_refuses_graph_mode_for_masks_of_varying_count(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")
    from fastmim.masking.strategies import RandomMask

    monkeypatch.setattr(RandomMask, "exact_hidden", property(lambda self: None))
    with pytest.raises(ValueError, match="same number of patches in every sample"):
        pretrain.run(_args(image_folder, tmp_path / "r", "--cuda-graph"))


def test_trainer_graph_mode_takes_mask_token_models_with_varying_counts(image_folder, tmp_path, monkeypatch):
    """MaskFeat keeps every token, so BEiT's masks (a different count per sample) are fine in graph mode (fixed
    [B, N] shapes): the graph-mode code path trains what the eager trainer trains."""
    monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")
    from fastmim.methods import maskfeat

    monkeypatch.setattr(maskfeat, "MASKFEAT_MIN_BLOCK", 3)  # blocks that fit the 4x4 demo grid: BEiT's stop-short
    model = maskfeat.MaskFeatViT(img_size=64, depth=1, embed_dim=32, num_heads=2)
    strategy = model.mask_strategy(seed=0)
    counts = strategy(indices=torch.arange(64), device="cpu").mask.flatten(1).sum(1)
    assert strategy.exact_hidden is None and int(counts.min()) < int(counts.max())  # the counts do vary
    args = [*tiny_args_for("maskfeat_vit_tiny_patch16"), "--data-path", str(image_folder), "--log-interval", "1",
            "--vis-interval", "100", "--loader", "torch", "--epochs", "1"]  # fmt: skip
    eager, graph = tmp_path / "eager", tmp_path / "graph"
    pretrain.run([*args, "--output-dir", str(eager)])
    pretrain.run([*args, "--output-dir", str(graph), "--cuda-graph"])
    ra, rb = (
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for d in (eager, graph)
    )
    assert len(ra) >= 2 and rb == pytest.approx(ra, rel=1e-6)


def test_trainer_graph_mode_fcmae_with_drop_path(image_folder, tmp_path, monkeypatch):
    """FCMAE (sparse ConvNeXt V2, drop path drawing from the RNG) through --cuda-graph's code path trains what the
    eager trainer trains: the same per-step losses and weights."""
    monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")
    fcmae = [
        "--model",
        "fcmae_convnextv2_atto",
        "--img-size",
        "96",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--warmup-epochs",
        "1",
        "--device",
        "cpu",
        "--amp",
        "none",
        "--drop-path",
        "0.3",
        "--max-steps",
        "3",
        "--data-path",
        str(image_folder),
        "--log-interval",
        "1",
        "--vis-interval",
        "100",
        "--loader",
        "torch",
    ]
    eager, graph = tmp_path / "eager", tmp_path / "graph"
    pretrain.run([*fcmae, "--output-dir", str(eager)])
    pretrain.run([*fcmae, "--output-dir", str(graph), "--cuda-graph"])
    la = [json.loads(x)["loss"] for x in (eager / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (graph / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 3 and lb == pytest.approx(la, rel=1e-5)
    a, b = load_checkpoint(eager / "checkpoint.pt"), load_checkpoint(graph / "checkpoint.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-mode"])
def test_a_finished_run_frees_its_trainer_without_the_garbage_collector(image_folder, tmp_path, monkeypatch, graph):
    """No reference cycle keeps a finished (or failed) run's trainer, and with it its loader, alive: a DALI pipeline
    left alive maps the image files, and a run resumed in the same process after a file was fixed read the old one."""
    import gc

    from fastmim.train.engine import Trainer

    monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")
    gc.collect()
    gc.disable()
    try:
        pretrain.run(_args(image_folder, tmp_path / "run", "--max-steps", "1", *(["--cuda-graph"] if graph else [])))
        alive = [o for o in gc.get_objects() if type(o) is Trainer]
    finally:
        gc.enable()
    assert not alive
