"""CUDA checks, run on a GPU machine (benchmarks/gpu_suite.sh); skipped where torch sees no GPU."""

import json

import pytest
import torch
from PIL import Image

import fastmim
from fastmim.masking import random_masking
from tests.conftest import ROOT, TINY_ARGS, run_cli

pytestmark = pytest.mark.gpu


def test_mae_cuda_matches_cpu_fp32():
    torch.manual_seed(0)
    m = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1).eval()
    imgs = torch.randn(4, 3, 64, 64)
    mask = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch-embedding conv would otherwise round to TF32
    try:
        with torch.no_grad():
            loss_cpu, pred_cpu, _ = m(imgs, mask=mask)
            mc = m.cuda()
            mask_c = type(mask)(*(t.cuda() for t in mask))
            loss_gpu, pred_gpu, _ = mc(imgs.cuda(), mask=mask_c)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(pred_gpu.cpu(), pred_cpu, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=2e-3, atol=2e-3)


def test_bf16_training_step_close_to_fp32():
    torch.manual_seed(0)
    m = fastmim.create_model("mae_vit_base_patch16").cuda()
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    mask = random_masking(8, 196, 0.75, device="cuda")
    loss32, _, _ = m(imgs, mask=mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss16, _, _ = m(imgs, mask=mask)
    loss16.backward()
    assert torch.isfinite(loss16) and loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_cli_on_cuda_bf16(image_folder, tmp_path):
    out = tmp_path / "gpu"
    args = [a for a in TINY_ARGS]
    args[args.index("--device") + 1] = "cuda"
    args[args.index("--amp") + 1] = "bf16"
    r = run_cli([*args, "--data-path", str(image_folder), "--epochs", "1", "--output-dir", str(out),
                 "--log-interval", "1"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "on cuda:0" in r.stdout and "amp=bfloat16" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("max_mem_gb" in r for r in rows)


def test_throughput_benchmark_on_cuda(tmp_path):
    """The CUDA path of benchmarks/throughput.py: event timing, peak memory, a measured bf16 peak, and a profile
    whose kernels are attributed (cuBLAS matmuls, fastmim.ops' Triton kernels)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput

    out = tmp_path / "rows.jsonl"
    args = ["--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "16", "--model-arg", "depth=2",
            "--modes", "reference,fastmim", "--steps", "5", "--warmup", "2", "--peak-matmul-size", "4096",
            "--profile", "--profile-steps", "2", "--profile-dir", str(tmp_path / "prof"),
            "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["reference", "fastmim"]
    for r in rows:
        assert r["device"].startswith("NVIDIA") and r["peak_mem_gb"] > 0 and r["img_per_s"] > 0
        assert r["peak_source"] == "measured" and r["peak_tflops"] > 50
        assert r["peak_measured_with"].startswith("bfloat16 matmul"), r["peak_measured_with"]
        assert r["flop_check"]["formula_gflop"] == pytest.approx(r["flop_check"]["counted_gflop"], rel=0.01)
        assert r["flop_check"]["pass"] == "fwd+bwd" and r["flop_check"]["formula_gflop"] == r["gflop_per_img"]
        assert r["profile"]["device"] == "cuda" and "matmul" in r["profile"]["kinds_pct"]
    assert "fastmim.ops" in rows[1]["profile"]["kinds_pct"] and "fastmim.ops" not in rows[0]["profile"]["kinds_pct"]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=2e-2)  # same masks; bf16 rounding apart


def test_sparse_convnextv2_triton_backend_matches_dense_masked_on_cuda():
    """The rows backend on CUDA (the Triton depthwise kernels) against the dense reference, fp32, values and grads."""
    from fastmim.models.convnextv2_sparse import sparse_forward

    torch.manual_seed(0)
    model = fastmim.create_model("convnextv2_atto", head=False).cuda()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    imgs = torch.randn(4, 3, 224, 224, device="cuda")
    visible = torch.rand(4, 7, 7, device="cuda") > 0.6
    results = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the dense reference's convs would otherwise round to TF32
    for backend in ("dense_masked", "fastmim"):
        model.zero_grad()
        x = imgs.clone().requires_grad_(True)
        out = sparse_forward(model, x, visible, backend)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.backends.cudnn.allow_tf32 = tf32
    (o1, gx1, g1), (o2, gx2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx2, gx1, rtol=2e-3, atol=2e-3)
    for n in g1:
        scale = g1[n].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g2[n] / scale, g1[n] / scale, rtol=2e-3, atol=2e-3, msg=n)


def test_fcmae_bf16_sparse_loss_matches_dense_masked_on_cuda():
    from fastmim.masking import random_masking

    torch.manual_seed(0)
    m = fastmim.create_model("fcmae_convnextv2_atto").cuda()
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    info = random_masking(8, 49, 0.6, device="cuda")
    losses = {}
    for backend in ("dense_masked", "fastmim"):
        m.sparse_backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[backend] = m(imgs, mask=info)[0].item()
    assert losses["fastmim"] == pytest.approx(losses["dense_masked"], rel=1e-2)


def test_fcmae_bf16_training_step_on_cuda():
    torch.manual_seed(0)
    m = fastmim.create_model("fcmae_convnextv2_atto").cuda()
    assert m.backend_for(torch.device("cuda")) == "fastmim"
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, pred, mask = m(imgs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and pred.shape == (8, 49, 3072)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def _no_tf32():
    """fp32 comparisons on CUDA: cuDNN convolutions and cuBLAS matmuls would otherwise round inputs to TF32."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    return ctx()


@pytest.mark.parametrize("img, batch", [(96, 3), (64, 2), (160, 2)])
def test_sparse_convnextv2_on_cuda_equals_dense_masked(img, batch):
    """The fastmim backend (Triton depthwise kernels, rows-only LayerNorm/MLP/GRN) on CUDA against the dense_masked
    reference on CUDA: outputs, input and parameter gradients, fp32."""
    from tests.models.test_convnextv2_sparse import assert_same, patch_mask, run, small_model

    model = small_model(drop_path_rate=0.2).train().cuda()
    imgs = torch.randn(batch, 3, img, img, device="cuda")
    visible = patch_mask(batch, img // 32, img // 32, seed=img).cuda()
    with _no_tf32():
        ref = run(model, imgs, visible, "dense_masked")
        got = run(model, imgs, visible, "fastmim")
    assert_same(ref, got, rtol=1e-4, atol=1e-4)


def test_fcmae_bf16_step_on_cuda_matches_dense_masked():
    """A ConvNeXtV2-atto FCMAE training step under bf16 autocast, both backends on the same mask: same loss, the
    same gradients up to bf16 rounding; the fastmim step also runs with the visible count known (no host syncs)."""
    torch.manual_seed(0)
    models = {b: fastmim.create_model("fcmae_convnextv2_atto", sparse_backend=b).cuda() for b in
              ("dense_masked", "fastmim")}  # fmt: skip
    models["fastmim"].load_state_dict(models["dense_masked"].state_dict())
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    mask = models["fastmim"].make_mask(8, torch.device("cuda"))
    losses, grads = {}, {}
    for name, m in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, pred, _ = m(imgs, mask=mask)
        loss.backward()
        assert pred.dtype == torch.bfloat16 and torch.isfinite(loss)
        losses[name] = loss.detach().float()
        grads[name] = torch.cat([p.grad.flatten().float() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(losses["fastmim"], losses["dense_masked"], rtol=2e-2, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(grads["fastmim"], grads["dense_masked"], dim=0)
    assert cos > 0.99, f"gradient cosine similarity {cos:.5f}"


def test_fcmae_compiles_on_cuda():
    """FCMAE with the fastmim backend under torch.compile(fullgraph=True) on CUDA: the Triton custom ops trace and
    the compiled step matches eager."""
    torch.manual_seed(0)
    m = fastmim.create_model("fcmae_convnextv2_atto", img_size=128, sparse_backend="fastmim").cuda()
    imgs = torch.randn(4, 3, 128, 128, device="cuda")
    mask = m.make_mask(4, torch.device("cuda"))
    with _no_tf32():
        eager, _, _ = m(imgs, mask=mask)
        compiled, _, _ = torch.compile(m, fullgraph=True)(imgs, mask=mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["random", "block", "simmim", "uniform", "multiblock", "tube", "attention",
                                  "hardpatch"])  # fmt: skip
def test_mask_strategies_on_cuda(name):
    """The batched strategies on the GPU: the integer-hash draws give the CPU's masks bit for bit where only
    comparisons and sorts follow them; block and multiblock size their rectangles with float maths (sqrt, exp) that may
    round differently, so there the invariants and determinism are checked."""
    from fastmim.masking import build_mask

    s = build_mask(name, 14, impl="torch", seed=5)
    inputs = {}
    if name in ("attention", "hardpatch"):
        inputs = {"scores" if name == "attention" else "losses": torch.rand(256, 196)}
    idx = torch.arange(1000, 1256)
    cpu = s(indices=idx, epoch=2, **inputs)
    gpu = s(indices=idx.cuda(), epoch=2, device="cuda", **{k: v.cuda() for k, v in inputs.items()})
    assert gpu.mask.is_cuda
    if name == "block":
        assert (gpu.mask.flatten(1).sum(1) == s.num_hidden).all()
    elif name == "multiblock":
        assert not (~gpu.mask & gpu.targets.any(1)).any()
    else:
        assert torch.equal(gpu.mask.cpu(), cpu.mask)
    again = s(indices=idx.cuda(), epoch=2, device="cuda", **{k: v.cuda() for k, v in inputs.items()})
    assert torch.equal(again.mask, gpu.mask)


@pytest.mark.gpu
def test_block_mask_triton_on_cuda_matches_the_torch_loop_and_auto_picks_it():
    """The one-launch Triton block kernel against the batched PyTorch loop on the same device (the same float64
    maths in the same order: identical masks expected), on 14x14 and a non-square grid; "auto" runs Triton on CUDA."""
    from fastmim.masking import build_mask

    for grid, ratio in ((14, 0.4), ((12, 20), 0.6)):
        idx = torch.arange(5000, 7048, device="cuda")
        a = build_mask("block", grid, impl="torch", ratio=ratio, seed=3)(indices=idx, epoch=1, device="cuda").mask
        s = build_mask("block", grid, impl="triton", ratio=ratio, seed=3)
        b = s(indices=idx, epoch=1, device="cuda").mask
        same = (a == b).flatten(1).all(1).float().mean().item()
        assert same >= 0.999, f"{grid}: only {same:.4f} of the samples equal the torch loop's"
        assert (b.flatten(1).sum(1) == s.num_hidden).all()
    auto = build_mask("block", 14, ratio=0.4, seed=3)
    assert auto.resolve_impl(torch.device("cuda")) == "triton"


@pytest.mark.gpu
def test_dali_mixed_decodes_on_the_gpu_like_the_cpu_pipeline(tmp_path):
    """DALI's nvJPEG path: CUDA batches of the CPU pipeline's shapes and sample order (the reader is the same), and
    an exact restore from a checkpoint."""
    from fastmim.data.dali import DaliLoader, dali_problem
    from fastmim.data.folder import list_images
    from tests.conftest import make_image_folder

    if dali_problem() is not None:
        pytest.skip(f"optional dependency absent: {dali_problem()}")
    files = list_images(make_image_folder(tmp_path / "d", n=32, size=(120, 90)))
    gpu = DaliLoader(files, 8, 64, device="mixed", seed=2, num_threads=2)
    cpu = DaliLoader(files, 8, 64, device="cpu", seed=2, num_threads=2)
    g, c = list(gpu), list(cpu)
    assert len(g) == len(c) == 4
    for (xg, ig), (xc, ic) in zip(g, c, strict=True):
        assert xg.is_cuda and xg.shape == xc.shape == (8, 3, 64, 64) and torch.equal(ig, ic)
    again = DaliLoader(files, 8, 64, device="mixed", seed=2, num_threads=2)
    it = iter(again)
    next(it)
    state = again.state_dict()
    rest = [x.clone() for x, _ in it]
    restored = DaliLoader(files, 8, 64, device="mixed", seed=2, num_threads=2)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for (a, _), b in zip(restored, rest, strict=True))
    # pixels: solid-colour images, each row the colour of the index beside it (nvJPEG decodes, GPU crops)
    from tests.data import test_dali_rows as rows

    solid = tmp_path / "solid"
    solid.mkdir()
    for i in range(rows.N):
        Image.new("RGB", (48 + 3 * i, 40 + 2 * i), rows.colour(i)).save(solid / f"img{i:03d}.jpg", quality=95)
    mixed = DaliLoader(list_images(solid), 4, 32, device="mixed", seed=5, num_threads=2)
    assert rows.check_rows([(x.cpu(), i.cpu()) for x, i in mixed], "mixed") == rows.N
