"""The training step captured in CUDA graphs (``TrainStep(graph=True)``, ``--cuda-graph``) against the same step run
eagerly: the same weights, losses and gradient-scaler state, with accumulation, clipping, fp16 loss scaling (a
step with an infinite gradient skipped on the device), drop path drawing from the CUDA generator, torch.compile,
and a resume. Needs a GPU (benchmarks/gpu_suite.sh runs them); tests/train/test_step.py runs the same code uncaptured
on CPU."""

from __future__ import annotations

import json

import pytest
import torch

import fastmim
from fastmim.masking import MaskInfo, random_masking
from fastmim.train.checkpoint import load_checkpoint
from fastmim.train.optim import build_adamw, set_lr
from fastmim.train.step import TrainStep
from tests.conftest import TINY_ARGS, run_cli

pytestmark = pytest.mark.gpu

MODELS = {
    "mae": ("mae_vit_tiny_patch16", dict(img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2), 64),
    "fcmae": ("fcmae_convnextv2_atto", dict(img_size=96, drop_path_rate=0.3), 96),
}


def _build(kind: str):
    name, kwargs, _ = MODELS[kind]
    torch.manual_seed(0)
    return fastmim.create_model(name, **kwargs).cuda()


def _batches(kind: str, n: int, b: int = 4, inf_at: int | None = None):
    model_img = MODELS[kind][2]
    tokens = (model_img // (16 if kind == "mae" else 32)) ** 2
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        m = random_masking(b, tokens, 0.75 if kind == "mae" else 0.6, generator=g)
        imgs = torch.randn(b, 3, model_img, model_img, generator=g)
        if i == inf_at:
            imgs[0, 0, 0, 0] = float("inf")  # a non-finite loss and gradients: fp16's scaler must skip this step
        out.append((imgs.pin_memory(), m.ids_keep, m.ids_restore, m.mask))
    return out


def _train(kind: str, graph: bool, dtype, batches, accum: int = 2, compile: bool = False, clip: float | None = 1.0):
    model = _build(kind)
    fwd = torch.compile(model) if compile else model
    opt = build_adamw(model, 1e-3, 0.05, graph=True)  # the same optimizer in both modes: results comparable bitwise
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16, init_scale=2.0**12)

    def forward(imgs, ids_keep, ids_restore, mask):
        return fwd(imgs, mask=MaskInfo(ids_keep, ids_restore, mask))[0]

    step = TrainStep(forward, model.parameters(), opt, scaler, device=torch.device("cuda"), accum_iter=accum,
                     clip_grad=clip, amp_dtype=dtype, graph=graph)  # fmt: skip
    torch.manual_seed(123)  # drop path draws from the CUDA generator: the same stream for both modes
    losses = []
    for i, batch in enumerate(batches):
        if i % accum == 0:
            set_lr(opt, 1e-3 * (1 + i // accum))
        losses.append(float(step(*batch, last=i % accum == accum - 1)))
    torch.cuda.synchronize()
    return model, step, scaler, losses


@pytest.mark.parametrize(
    "kind, dtype",
    [("mae", torch.bfloat16), ("mae", torch.float16), ("fcmae", torch.bfloat16), ("mae", None)],
    ids=["mae-bf16", "mae-fp16", "fcmae-bf16-drop-path", "mae-fp32"],
)
def test_captured_step_trains_as_the_eager_step(kind, dtype):
    """8 optimizer steps of 2 micro-batches: 3 eager warm-up steps, the capture of both calls (micro-batch, last
    micro-batch), then replays; the losses and weights follow the eager run's. fp16: one batch holds an infinite
    pixel, and both modes skip that step and halve the scale."""
    inf_at = 9 if dtype == torch.float16 else None
    batches = _batches(kind, 16, inf_at=inf_at)
    eager, _, eager_scaler, eager_losses = _train(kind, False, dtype, batches)
    graph, step, graph_scaler, graph_losses = _train(kind, True, dtype, batches)
    assert step.captured == 2
    finite = [i for i, x in enumerate(eager_losses) if x == x and abs(x) != float("inf")]
    assert len(finite) == 16 - (inf_at is not None)
    assert [graph_losses[i] for i in finite] == pytest.approx([eager_losses[i] for i in finite], rel=1e-3, abs=1e-4)
    for (name, a), b in zip(eager.named_parameters(), graph.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    if dtype == torch.float16:
        assert graph_scaler.get_scale() == eager_scaler.get_scale() < 2.0**12  # the skipped step halved it
    # the replays read new inputs: a graph that kept its first batch would repeat its losses
    assert len({round(x, 6) for x in graph_losses[8:]}) == 8


@pytest.mark.parametrize("kind", ["mae", "fcmae"])
def test_an_eager_step_never_waits_for_the_gpu(kind):
    """After two warm-up steps (lazy initialisation), three eager steps of the fused-op model (forward, backward,
    clipping, the fused AdamW) make no host-device synchronisation: torch's sync debug mode raises on any (an
    ``.item()``, a data-dependent shape, a copy to the host). The CPU test tests/train/test_host_reads.py counts the
    same step's reads by their fastmim caller."""
    model = _build(kind)
    opt = build_adamw(model, 1e-3, 0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def forward(imgs, ids_keep, ids_restore, mask):
        return model(imgs, mask=MaskInfo(ids_keep, ids_restore, mask))[0]

    step = TrainStep(forward, model.parameters(), opt, scaler, device=torch.device("cuda"), clip_grad=1.0,
                     amp_dtype=torch.bfloat16)  # fmt: skip
    batches = [tuple(t.cuda() for t in batch) for batch in _batches(kind, 5)]
    torch.cuda.synchronize()
    for batch in batches[:2]:
        step(*batch)
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            losses.append(step(*batch))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(torch.stack(losses)).tolist())


def test_captured_step_with_torch_compile():
    batches = _batches("mae", 12)
    eager, _, _, eager_losses = _train("mae", False, torch.bfloat16, batches, compile=True)
    graph, step, _, graph_losses = _train("mae", True, torch.bfloat16, batches, compile=True)
    assert step.captured == 2
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-4)
    for a, b in zip(eager.parameters(), graph.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def _cuda_args(image_folder, amp: str) -> list[str]:
    """The tiny MAE run of the CPU tests on the GPU, under ``--amp amp``, logging every step's loss."""
    args = list(TINY_ARGS)
    args[args.index("--device") + 1] = "cuda"
    args[args.index("--amp") + 1] = amp
    return [*args, "--data-path", str(image_folder), "--log-interval", "1", "--vis-interval", "100", "--loader",
            "torch"]  # fmt: skip


def _losses(args: list[str], out, *extra: str) -> list[float]:
    """Runs the CLI into ``out``; the losses of its metrics.jsonl (a resumed run's follow the earlier run's)."""
    r = run_cli([*args, "--output-dir", str(out), *extra])
    assert r.returncode == 0, r.stderr
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_cli_cuda_graph_trains_as_eager_and_resumes_exactly(image_folder, tmp_path):
    """--cuda-graph end to end: the eager run's losses, and a run stopped after one epoch and resumed (warm-up and
    capture again) ends with the uninterrupted run's weights, bit for bit."""
    args = _cuda_args(image_folder, "bf16")
    eager = _losses(args, tmp_path / "eager", "--epochs", "2")
    graph = _losses(args, tmp_path / "graph", "--epochs", "2", "--cuda-graph")
    assert graph == pytest.approx(eager, rel=2e-3)
    half = tmp_path / "half"
    _losses(args, half, "--epochs", "1", "--cuda-graph")
    _losses(args, half, "--epochs", "2", "--cuda-graph", "--resume", str(half / "checkpoint.pt"))
    a = load_checkpoint(tmp_path / "graph" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "half" / "checkpoint.pt")
    assert a["step"] == b["step"] == len(graph)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_cli_resume_with_drop_path_on_cuda_draws_the_straight_runs_masks(image_folder, tmp_path):
    """Stochastic depth on a GPU draws from the CUDA generator: its state is saved and restored with the checkpoint,
    so a run stopped after an epoch and resumed ends with the uninterrupted run's weights (the CPU tests cannot see
    the CUDA generator; without its restore the resumed run drops other paths)."""
    args = [*_cuda_args(image_folder, "none"), "--drop-path", "0.3"]
    straight = _losses(args, tmp_path / "straight", "--epochs", "2")
    _losses(args, tmp_path / "half", "--epochs", "1")
    resumed = _losses(args, tmp_path / "half", "--epochs", "2", "--resume", str(tmp_path / "half" / "checkpoint.pt"))
    assert resumed == pytest.approx(straight, rel=1e-5)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "half" / "checkpoint.pt")
    assert a["step"] == b["step"] == len(straight)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_cli_cuda_graph_with_grad_ckpt_drop_path_and_layer_scale_on_a_vit_trains_as_eager(image_folder, tmp_path):
    """SimMIM's ViT-B encoder (at tiny size) with stochastic depth (CUDA generator draws in every block), activation
    checkpointing (which replays the generator's state to recompute a block), layer scale and the shared relative
    position bias without an absolute one (the table's gather and its scatter-add backward captured): the captured
    step's losses follow the eager step's, so the recompute inside the graph drew the forward's drop masks."""
    args = _cuda_args(image_folder, "bf16")
    args[args.index("--model") + 1] = "simmim_vit_tiny_patch16"
    for flag in ("--decoder-embed-dim", "--decoder-depth", "--decoder-num-heads"):
        i = args.index(flag)
        del args[i : i + 2]
    args += ["--epochs", "2", "--grad-ckpt", "--drop-path", "0.3", "--layer-scale", "0.1", "--rel-pos-bias", "shared",
             "--abs-pos", "none"]  # fmt: skip
    eager, graph = _losses(args, tmp_path / "eager"), _losses(args, tmp_path / "graph", "--cuda-graph")
    assert len(graph) == len(eager) == 12
    assert graph == pytest.approx(eager, rel=2e-3)


def test_captured_step_under_ddp_trains_as_the_eager_ddp_step(tmp_path):
    """DDP (a one-process NCCL group: DDP's reducer, buckets and all-reduce run as with more) with accumulation
    (``no_sync`` on the first micro-batch) captured after DDP's 11 warm-up runs, as the trainer does: the losses and
    weights follow the eager DDP step's, replays included."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        batches = _batches("mae", 32)
        results = []
        for graph in (False, True):
            model = _build("mae")
            ddp = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
            opt = build_adamw(model, 1e-3, 0.05, graph=True)
            scaler = torch.amp.GradScaler("cuda", enabled=False)

            def forward(imgs, ids_keep, ids_restore, mask, ddp=ddp):
                return ddp(imgs, mask=MaskInfo(ids_keep, ids_restore, mask))[0]

            step = TrainStep(forward, model.parameters(), opt, scaler, device=torch.device("cuda"), accum_iter=2,
                             clip_grad=1.0, amp_dtype=torch.bfloat16, graph=graph, warmup=11,
                             no_sync=ddp.no_sync)  # fmt: skip
            losses = [float(step(*batch, last=i % 2 == 1)) for i, batch in enumerate(batches)]
            torch.cuda.synchronize()
            results.append((model, step, losses))
        (eager, _, eager_losses), (captured, step, graph_losses) = results
        assert step.captured == 2  # both calls (micro-batch, last micro-batch), replayed 5 times each
        assert graph_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-4)
        for a, b in zip(eager.parameters(), captured.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    finally:
        dist.destroy_process_group()


def test_throughput_graph_modes_on_cuda(tmp_path):
    """benchmarks/throughput.py's +graph modes on a GPU: the step is captured (cuda_graph true) and trains what the
    eager modes train (the same masks and weights; bf16 rounding and the tensor learning rate apart)."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput

    out = tmp_path / "rows.jsonl"
    args = ["--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "16", "--model-arg", "depth=2",
            "--modes", "fastmim,fastmim+graph,reference,reference+graph", "--steps", "5", "--warmup", "5",
            "--peak-tflops", "790", "--no-flop-count", "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = {r["mode"]: r for r in (json.loads(x) for x in out.read_text().splitlines())}
    assert [rows[m]["cuda_graph"] for m in ("fastmim", "fastmim+graph", "reference", "reference+graph")] == [
        False, True, False, True]  # fmt: skip
    assert rows["fastmim+graph"]["loss"] == pytest.approx(rows["fastmim"]["loss"], rel=2e-2)
    assert rows["reference+graph"]["loss"] == pytest.approx(rows["reference"]["loss"], rel=2e-2)
