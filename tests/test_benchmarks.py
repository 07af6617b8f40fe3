import argparse
import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fastmim
from fastmim.masking import masking_from_noise
from tests.conftest import make_image_folder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import recipes  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402

# ViT-tiny, one encoder and one decoder block, 2x2 patches: compiles in seconds on 2 cores
SMALL = ["--model", "vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--model-arg", "depth=1",
         "--model-arg", "decoder_depth=1", "--device", "cpu", "--amp", "none"]  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_throughput_all_modes_two_steps_on_cpu(tmp_path):
    """The CI smoke test: every mode (both compiled ones too) runs two steps, profiled, and reports what it must."""
    out = tmp_path / "rows.jsonl"
    args = [*SMALL, "--steps", "2", "--warmup", "1", "--profile", "--profile-steps", "1", "--profile-dir",
            str(tmp_path / "prof"), "--out", str(out), "--peak-tflops", "50"]  # fmt: skip
    assert throughput.main(args) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == list(throughput.MODES)
    for r in rows:
        assert r["img_per_s"] > 0 and r["mfu"] > 0 and r["step_ms_p20"] <= r["step_ms_p80"]
        assert r["device"] == "cpu" and r["torch"] and r["date"] and r["commit"] and r["data"] == "synthetic"
        assert r["flop_check"]["formula_gflop"] == pytest.approx(r["flop_check"]["counted_gflop"], rel=0.01)
        assert r["flop_check"]["pass"] == "fwd+bwd" and r["flop_check"]["formula_gflop"] == r["gflop_per_img"]
        assert r["peak_source"] == "given" and r["peak_tflops"] == 50 and r["peak_tflops_measured"] > 0
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 50, rel=2e-3)  # MFU against the given spec peak
        # the floor: FLOPs at the matmul rate measured in the run (not the spec) plus the parameter traffic at the
        # measured copy bandwidth
        flops = r["gflop_per_img"] * 1e9 * r["batch_size"]
        assert r["floor_matmul_ms"] == pytest.approx(flops / (r["peak_tflops_measured"] * 1e12) * 1e3, rel=1e-3)
        assert r["copy_gbps_measured"] > 0 and r["floor_bytes_gb"] > 0
        assert r["floor_bytes_ms"] == pytest.approx(r["floor_bytes_gb"] / r["copy_gbps_measured"] * 1e3, rel=2e-3)
        assert r["floor_ms"] == pytest.approx(r["floor_matmul_ms"] + r["floor_bytes_ms"], rel=1e-4)
        assert r["floor_gap"] == pytest.approx(r["step_ms_median"] / r["floor_ms"], rel=1e-2)
        prof = r["profile"]
        assert Path(prof["trace"]).exists() and json.loads(gzip.open(prof["trace"]).read())["traceEvents"]
        assert prof["top"] and sum(prof["kinds_pct"].values()) == pytest.approx(100, abs=0.5)
    by_mode = {r["mode"]: r for r in rows}
    # the fused ops' time is their own kind on CPU too (their autograd functions are named fastmim_*)
    assert by_mode["fastmim"]["profile"]["kinds_pct"].get("fastmim.ops", 0) > 0
    assert "fastmim.ops" not in by_mode["reference"]["profile"]["kinds_pct"]
    # the compiled-ops setting and the compile mode belong to the compiled rows only
    assert [(r["compiled_ops"], r["compile_mode"]) for r in rows] == [
        (None, None) if "compile" not in m else ("auto", "default") for m in throughput.MODES
    ]
    # both compiled models trace as one graph: the fused ops are compile-safe, the reference too
    assert by_mode["fastmim+compile"]["graph_breaks"] == 0 and by_mode["reference+compile"]["graph_breaks"] == 0
    assert "speedup_vs_reference" not in by_mode["reference"]
    for m in ("fastmim", "reference+compile", "fastmim+compile"):
        ratio = by_mode[m]["img_per_s"] / by_mode["reference"]["img_per_s"]
        assert by_mode[m]["speedup_vs_reference"] == pytest.approx(ratio, rel=0.002)  # rounding only
    # same seed, same masks, same data: reference and fastmim train the same model to the same loss, eager and
    # compiled (inductor draws its own random numbers, so compiled masks differ from eager ones)
    for a, b in (("reference", "fastmim"), ("reference+compile", "fastmim+compile")):
        assert by_mode[a]["loss"] == pytest.approx(by_mode[b]["loss"], rel=1e-3)


def test_throughput_graph_modes_on_cpu(tmp_path, capsys):
    """The +graph modes step through TrainStep(graph=True) (uncaptured on CPU: there is nothing to capture) with the
    masks drawn outside the step; they train what the eager modes train, step for step."""
    out = tmp_path / "rows.jsonl"
    args = [*SMALL, "--steps", "2", "--warmup", "5", "--no-flop-count", "--peak-tflops", "0.01",
            "--modes", "fastmim,fastmim+graph,reference,reference+graph", "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = {r["mode"]: r for r in read_rows(out)}
    assert list(rows) == ["fastmim", "fastmim+graph", "reference", "reference+graph"]
    assert not any(r["cuda_graph"] for r in rows.values())  # CPU: uncaptured, and the line says so
    assert capsys.readouterr().err.count("(uncaptured: CUDA graphs need a CUDA device") == 2
    assert rows["fastmim"]["warmup"] == 5 and rows["fastmim+graph"]["warmup"] >= 5  # what each ran
    assert rows["fastmim+graph"]["loss"] == pytest.approx(rows["fastmim"]["loss"], rel=1e-4)
    assert rows["reference+graph"]["loss"] == pytest.approx(rows["reference"]["loss"], rel=1e-4)
    with pytest.raises(SystemExit):
        throughput.main([*SMALL, "--modes", "fastmim+graph+compile"])  # the order is MODE+graph


def test_a_mode_that_fails_is_a_row_and_the_next_mode_runs(tmp_path, monkeypatch, capsys):
    """A failed capture or a non-finite first loss in one mode costs that mode's row only (on a GPU window, the
    command's other modes are the expensive part); only running out of memory was caught before."""
    out = tmp_path / "rows.jsonl"
    real = throughput.run_mode

    def flaky(mode, *args, **kwargs):
        if mode == "fastmim+graph":
            raise RuntimeError("CUDA graph capture failed: operation not permitted when stream is capturing")
        return real(mode, *args, **kwargs)

    monkeypatch.setattr(throughput, "run_mode", flaky)
    args = [*SMALL, "--steps", "1", "--warmup", "1", "--no-flop-count", "--peak-tflops", "0.01",
            "--modes", "fastmim+graph,fastmim", "--out", str(out)]  # fmt: skip
    throughput.main(args)
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["fastmim+graph", "fastmim"]
    assert rows[0]["error"].startswith("RuntimeError: CUDA graph capture failed") and rows[1]["img_per_s"] > 0
    assert "Traceback" in capsys.readouterr().err


def test_throughput_fsdp_rows_train_as_the_plain_model(tmp_path):
    """--fsdp (FSDP2 over a group of one): the eager modes' rows say so and train to the plain modes' losses; the
    group is left again."""
    out = tmp_path / "rows.jsonl"
    common = [*SMALL, "--steps", "2", "--warmup", "1", "--no-flop-count", "--peak-tflops", "0.01", "--out", str(out)]
    assert throughput.main([*common, "--modes", "fastmim,reference"]) == 0
    assert throughput.main([*common, "--modes", "fastmim,reference", "--fsdp"]) == 0
    plain, sharded = read_rows(out)[:2], read_rows(out)[2:]
    assert [r["fsdp"] for r in plain + sharded] == [False, False, True, True]
    for a, b in zip(plain, sharded, strict=True):
        assert a["mode"] == b["mode"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert not torch.distributed.is_initialized()


def test_throughput_on_a_real_image_folder(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=6)
    out = tmp_path / "rows.jsonl"
    args = [*SMALL, "--modes", "fastmim", "--steps", "3", "--warmup", "1", "--data", str(folder), "--workers", "0"]
    assert throughput.main([*args, "--no-flop-count", "--peak-tflops", "0.01", "--out", str(out)]) == 0
    (row,) = read_rows(out)
    assert str(folder) in row["data"] and "6 images" in row["data"] and row["img_per_s"] > 0
    assert row["peak_source"] == "given"
    # a peak of 10 GFLOP/s
    assert row["mfu"] == pytest.approx(row["gflop_per_img"] * row["img_per_s"] / 10, rel=0.01)


def test_throughput_real_data_beside_synthetic_with_the_gpu_decoding_loader(tmp_path, capsys):
    """--loader torch-gpu (decoding on the CPU here) --also-synthetic: a synthetic and a real-data row per mode, the
    ratio of their wall img/s and where the loader's time went."""
    folder = make_image_folder(tmp_path / "imgs", n=6)
    out = tmp_path / "rows.jsonl"
    args = [
        *SMALL,
        "--modes",
        "fastmim",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--data",
        str(folder),
        "--workers",
        "1",
        "--loader",
        "torch-gpu",
        "--also-synthetic",
        "--no-flop-count",
        "--peak-tflops",
        "0.01",
        "--out",
        str(out),
    ]
    assert throughput.main(args) == 0
    synthetic, real = read_rows(out)
    assert synthetic["data"] == "synthetic" and "loader torch-gpu, 1 workers" in real["data"]
    assert real["real_over_synthetic"] == pytest.approx(real["img_per_s_wall"] / synthetic["img_per_s_wall"], rel=1e-3)
    assert set(real["loader_ms_per_batch"]) == {"read", "decode", "augment", "wait"}
    assert all(v >= 0 for v in real["loader_ms_per_batch"].values()) and real["loader_ms_per_batch"]["decode"] > 0
    err = capsys.readouterr().err  # (the 90% target is a GPU's: a CPU dry run said "NOT met")
    assert "target >= 90%: a GPU target, not judged on cpu" in err and "NOT met" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "fastmim,turbo"], "unknown mode"),
        (["--modes", "fastmim+compile+graph", "--compile-mode", "reduce-overhead"], "inductor's own CUDA graphs"),
        (["--model", "vit_gigantic_patch16"], "unknown model"),
        (["--recipe", "simclr"], "invalid choice"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--model-arg", "depth"], "expected KEY=VALUE"),
        (["--model-arg", "depthh=2"], "bad arguments for model"),
        (["--peak-tflops", "-1"], "--peak-tflops must be positive"),
        (["--fsdp", "--modes", "fastmim+compile"], "--fsdp runs the eager modes"),
        (["--modes", "reference", "--compile-mode", "max-autotune"], "applies to the compiled modes"),  # (ignored)
    ],
)
def test_throughput_bad_arguments_name_the_problem(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.main([*SMALL, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_throughput_flags_rows_it_cannot_trust():
    """A step faster than its floor, MFU above 100%, too few timed steps or step times spread wide, or a CPU run on a
    machine loaded past its cores: the printed line says DOUBTFUL and why; a plausible row says nothing."""
    ok = {"floor_gap": 1.8, "mfu": 0.4, "host_load_1m": 2.5, "host_cpus": 2, "host_threads": 2}  # its own threads
    assert throughput.sanity_notes(ok, "cpu") == []
    assert "faster than its floor" in throughput.sanity_notes({**ok, "floor_gap": 0.66, "mfu": 1.25}, "cuda")[0]
    assert "above 100% MFU" in throughput.sanity_notes({**ok, "mfu": 1.2}, "cuda")[0]
    assert "load 5.0 on 2 CPUs, 3.0 beyond this run's threads" in throughput.sanity_notes({**ok, "host_load_1m": 5.0},
                                                                                        "cpu")[0]  # fmt: skip
    assert throughput.sanity_notes({**ok, "host_load_1m": 5.0}, "cuda") == []
    # a 3-step run, and one whose steps spread from 64.9 to 104.6 ms (a trial's: 0.86x one run, 1.75x the next)
    timed = {**ok, "steps": 20, "step_ms_p20": 70.0, "step_ms_p80": 80.0}
    assert throughput.sanity_notes(timed, "cuda") == []
    assert "3 timed step(s)" in throughput.sanity_notes({**timed, "steps": 3}, "cuda")[0]
    spread = throughput.sanity_notes({**timed, "step_ms_p20": 64.9, "step_ms_p80": 104.6}, "cuda")
    assert spread == ["DOUBTFUL: step times spread from 64.9 ms (p20) to 104.6 ms (p80): something else ran, or the "
                      "steps differ (more --steps, an idle machine)"]  # fmt: skip


def test_throughput_refuses_what_it_cannot_run_before_measuring_anything(tmp_path, capsys, monkeypatch):
    """A missing --data folder, another recipe's model name (with the flag that fixes it), and loader flags without
    --data are refused by argparse, before the peak is measured; --recipe fcmae alone times a ConvNeXt V2."""
    monkeypatch.setattr(throughput, "measure_peak_tflops", lambda *a: pytest.fail("measured before refusing"))
    for extra, message in [
        (["--data", str(tmp_path / "nope")], "does not exist"),
        (["--data", __file__], "is not a folder of images"),  # (tracebacks, before)
        (["--data", str(tmp_path), "--workers", "-1"], "--workers must be 0 or more"),
        (["--device", "meta"], "the benchmarks run on cpu or cuda"),
        (["--peak-matmul-size", "-5"], "--peak-matmul-size must be at least 1"),
        (["--model", "fcmae_convnextv2_atto"], "is a fcmae model: add --recipe fcmae"),
        (["--also-synthetic"], "are for --data"),
        (["--workers", "2"], "are for --data"),
    ]:
        with pytest.raises(SystemExit):
            throughput.main([*SMALL, "--modes", "fastmim", "--no-flop-count", *extra])
        assert message in capsys.readouterr().err
    args = throughput.build_parser().parse_args(["--recipe", "fcmae"])
    throughput.check_args(throughput.build_parser(), args)
    assert args.model == "convnextv2_base"


@pytest.mark.parametrize("norm_pix", [True, False])
def test_paper_reference_equals_fastmim_model(norm_pix):
    """The benchmark's reference (the MAE paper's code path) computes what the fastmim model computes: same loss,
    prediction, mask and gradients on the same weights and mask."""
    torch.manual_seed(0)
    fast = fastmim.create_model("mae_vit_tiny_patch16", img_size=48, decoder_depth=1, norm_pix_loss=norm_pix)
    paper = recipes.PaperMAE(fastmim.create_model("mae_vit_tiny_patch16", img_size=48, decoder_depth=1,
                                                  norm_pix_loss=norm_pix, fused_ops=False))  # fmt: skip
    paper.mae.load_state_dict(fast.state_dict())
    imgs = torch.randn(3, 3, 48, 48)
    noise = torch.rand(3, fast.num_patches)
    info = masking_from_noise(noise, fastmim.masking.random.num_visible(fast.num_patches, fast.mask_ratio))
    loss_f, pred_f, mask_f = fast(imgs, mask=info)
    loss_p, pred_p, mask_p = paper(imgs, ids_shuffle=torch.argsort(noise, dim=1))
    torch.testing.assert_close(mask_p, mask_f)
    torch.testing.assert_close(pred_p, pred_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_p, loss_f, rtol=1e-5, atol=1e-6)
    loss_f.backward()
    loss_p.backward()
    grads_p = dict(paper.mae.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads_p[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_paper_reference_checkpoints_its_blocks_with_grad_ckpt():
    """--grad-ckpt applies to the reference as to fastmim's model (set_grad_ckpt on the wrapped model): its blocks
    run again in the backward, and the gradients are those without checkpointing."""
    from fastmim.models.vit import set_grad_ckpt

    torch.manual_seed(0)
    paper = recipes.PaperMAE(fastmim.create_model("mae_vit_tiny_patch16", img_size=32, decoder_depth=1,
                                                  fused_ops=False))  # fmt: skip
    imgs, ids = torch.randn(2, 3, 32, 32), torch.argsort(torch.rand(2, 4), dim=1)
    calls = []
    for blk in [*paper.mae.blocks, *paper.mae.decoder_blocks]:
        blk.register_forward_pre_hook(lambda *a: calls.append(1))
    grads = []
    for on in (False, True):
        set_grad_ckpt(paper, on)
        paper.zero_grad()
        calls.clear()
        paper(imgs, ids_shuffle=ids)[0].backward()
        grads.append([p.grad.clone() for p in paper.parameters() if p.grad is not None])
        blocks = len(paper.mae.blocks) + len(paper.mae.decoder_blocks)
        assert len(calls) == (2 * blocks if on else blocks)  # recomputed in the backward
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_paper_reference_draws_a_fresh_mask_with_the_recipe_count():
    torch.manual_seed(0)
    paper = recipes.PaperMAE(fastmim.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1))
    _, _, m1 = paper(torch.randn(2, 3, 64, 64))
    _, _, m2 = paper(torch.randn(2, 3, 64, 64))
    assert (m1.sum(1) == 12).all() and not torch.equal(m1, m2)  # 16 patches, int(16 * 0.25) = 4 visible


def test_flop_formula_matches_published_mae_base_count():
    with torch.device("meta"):
        m = fastmim.create_model("mae_vit_base_patch16")
    assert recipes.mae_flops_per_image(m) / 1e9 == pytest.approx(58.7, abs=0.3)  # FIELD-NOTES: ~3x 19.6 forward


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(mask_ratio=0.6, decoder_depth=3, decoder_embed_dim=96, decoder_num_heads=4, mlp_ratio=2.0),
        dict(patch_size=8, in_chans=1, depth=2),
    ],
)
def test_flop_formula_matches_torch_flop_counter(kwargs):
    from torch.utils.flop_counter import FlopCounterMode

    # explicit attention matmuls: the counter does not see the CPU SDPA kernel
    m = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, attn_impl="math", **kwargs)
    chans = kwargs.get("in_chans", 3)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = m(torch.randn(1, chans, 64, 64))
        loss.backward()
    assert recipes.mae_flops_per_image(m) == pytest.approx(fc.get_total_flops(), rel=0.005)


def test_kernel_kinds():
    kind = throughput.kernel_kind
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kind("triton_per_fused_native_layer_norm_0") == "triton (inductor)"
    assert kind("_masked_loss_fwd_kernel") == kind("_scatter_masked_bwd_kernel") == "fastmim.ops"
    assert kind("fastmim::gather_visible") == kind("_gather_rows_kernel") == "fastmim.ops"
    assert kind("void at::native::_scatter_gather_elementwise_kernel<128, 8>") == "gather/scatter/index"
    assert kind("void at::native::CatArrayBatchedCopy<float, 4, 64>") == "copy/memset"
    assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamWMathFunctor>") == (
        "optimizer"
    )
    assert kind("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "elementwise/other"


def test_ops_benchmark_smoke_on_cpu(tmp_path):
    import ops

    out = tmp_path / "ops.jsonl"
    args = ["--device", "cpu", "--batch-size", "2", "--img-size", "32", "--patch-size", "8", "--encoder-dim", "16",
            "--decoder-dim", "8", "--reps", "2", "--no-compile", "--out", str(out)]  # fmt: skip
    assert ops.main(args) == 0
    rows = read_rows(out)
    assert rows[0]["op"] == "copy" and rows[0]["gbps"] > 0
    timed = [r for r in rows[1:] if "error" not in r]
    # attention is also timed against each of SDPA's kernels pinned; those that cannot run on CPU say why
    errors = {r["impl"]: r["error"] for r in rows[1:] if "error" in r}
    assert set(errors) == {"sdpa[cudnn]", "sdpa[efficient]"} and all(errors.values())
    assert {r["impl"] for r in timed if r["op"] == "attention"} == {"fastmim[torch]", "eager", "sdpa[flash]",
                                                                     "sdpa[math]"}  # fmt: skip
    assert all(r["speedup_vs_sdpa_math"] > 0 for r in timed if r["op"] == "attention" and r["impl"] == "fastmim[torch]")
    ops_seen = {"gather_visible", "scatter_masked", "masked_mse_loss", "patchify", "grn", "add_layer_norm",
                "layer_norm", "bias_gelu", "attention", "attention (encoder)", "hog_target", "fft_loss",
                "patch_fft_loss", "low_pass_target"}  # fmt: skip
    assert {r["op"] for r in timed} == ops_seen
    assert {r["pass"] for r in timed} == {"fwd", "bwd", "fwd+bwd"}
    for target in ("hog_target", "low_pass_target"):
        assert {r["pass"] for r in timed if r["op"] == target} == {"fwd"}  # a target: forward only
    fused = [r for r in timed if r["impl"].startswith("fastmim")]
    assert len(fused) == 38 and all(r["speedup_vs_eager"] > 0 and r["ms_median"] > 0 for r in fused)
    assert all(r["commit"] and r["torch"] and r["date"] and r["device"] == "cpu" for r in rows)


def test_ops_benchmark_refuses_options_it_cannot_honour_here(capsys):
    """No silent empty columns: --cuda-graph without CUDA, --compiled-fused with --no-compile, and a CUDA device
    that is not there are refused by name."""
    import ops

    cases = [(["--device", "cpu", "--cuda-graph"], "--cuda-graph times CUDA-graph replays"),
             (["--device", "cpu", "--compiled-fused", "--no-compile"], "leave out --no-compile"),
             (["--device", "bogus"], "--device 'bogus'"), (["--device", "meta"], "run on cpu or cuda"),
             (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),  # (it ran the default)
             (["--reps", "-1"], "--reps: must be at least 1"), (["--ops", ","], "--ops names no op"),
             (["--img-size", "30"], "--img-size 30 is not a multiple of --patch-size 16"),
             (["--mask-ratio", "1.0"], "--mask-ratio must be in (0, 1)")]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available here"))
    for argv, message in cases:
        with pytest.raises(SystemExit):
            ops.main(argv)
        assert message in capsys.readouterr().err, argv


def test_ops_benchmark_times_the_fused_ops_compiled_both_ways(tmp_path):
    import ops

    out = tmp_path / "ops.jsonl"
    args = ["--device", "cpu", "--batch-size", "2", "--img-size", "16", "--patch-size", "8", "--encoder-dim", "8",
            "--decoder-dim", "8", "--reps", "1", "--ops", "gather", "--compiled-fused", "--out", str(out)]  # fmt: skip
    assert ops.main(args) == 0
    rows = [r for r in read_rows(out) if r["op"] == "gather_visible"]
    impls = {r["impl"] for r in rows}
    assert {"eager", "compiled", "fastmim+compile[opaque]", "fastmim+compile[triton]"} <= impls
    for r in rows:
        if r["impl"].startswith("fastmim+compile"):
            assert r["speedup_vs_compiled"] > 0 and r["ms_median"] > 0


# --- the results tables ---


def _tp(mode, ips, date="2026-12-01T10:00:00+00:00", device="NVIDIA H100 80GB HBM3", **extra):
    return {"benchmark": "throughput", "recipe": "mae", "model": "mae_vit_base_patch16", "mode": mode,
            "batch_size": 256, "img_size": 224, "amp": "bf16", "img_per_s": ips, "img_per_s_wall": ips,
            "mfu": ips / 13460, "peak_mem_gb": 10.0, "device": device, "date": date, "commit": "abc1234",
            **extra}  # fmt: skip


def test_report_one_row_per_device_and_date_with_the_latest_of_each_mode(tmp_path):
    rows = [_tp("reference", 3000.0), _tp("fastmim", 3500.0), _tp("fastmim+compile", 6000.0),
            _tp("fastmim+compile", 6800.0, date="2026-12-01T11:00:00+00:00"),  # later that day: replaces 6000
            _tp("reference", 1000.0, device="cpu"),
            _tp("reference", 3100.0, date="2026-12-02T09:00:00+00:00")]  # fmt: skip
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = report.throughput_table(report.load_rows(tmp_path))
    lines = [line for line in table.splitlines() if line.startswith("| 2026")]
    assert len(lines) == 3
    h100 = next(line for line in lines if "H100" in line and "2026-12-01" in line)
    assert "6,800" in h100 and "6,000" not in h100 and "3,500" in h100 and "2.27x (fastmim+compile)" in h100
    assert "50.5%" in h100  # 6800 / 13460


def test_report_takes_a_speedup_only_between_rows_of_one_run(tmp_path):
    """The latest rows of a day can come from separate runs: the H200 table's 1.40x divided a compiled row of commit
    6686661 by 9d62092's reference, measured by another process. The ratio is now that of the fastest mode measured
    beside the reference (the same "run"; rows without one: the same commit and file), the others named."""
    one, two = {"run": "11-aa"}, {"run": "22-bb"}
    rows = [_tp("reference", 3000.0, **one), _tp("fastmim", 3300.0, **one),
            _tp("fastmim+compile", 6000.0, date="2026-12-01T11:00:00+00:00", **two)]  # fmt: skip
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    line = next(x for x in report.throughput_table(report.load_rows(tmp_path)).splitlines() if x.startswith("| 2026"))
    assert "1.10x (fastmim; fastmim+compile: another run)" in line and "2.00x" not in line, line
    assert "44.6%" in line  # the best MFU is still the fastest row's (6000 / 13460)
    legacy = [_tp("reference", 3000.0), _tp("fastmim+compile", 6000.0, commit="def5678")]  # (no "run": by commit)
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in legacy) + "\n")
    line = next(x for x in report.throughput_table(report.load_rows(tmp_path)).splitlines() if x.startswith("| 2026"))
    assert "(fastmim+compile: another run)" in line and "x (" not in line, line
    from benchmarks.common import environment

    assert environment(torch.device("cpu"))["run"] == environment(torch.device("cpu"))["run"]  # one per process


def test_report_leaves_out_uncaptured_graph_rows_and_too_few_steps(tmp_path):
    """A CPU 'fastmim+graph' row ran the eager step (cuda_graph false) and filled the graph column and the best MFU;
    a 3-step row went in as any other. Both are left out; a captured graph row and an older row without a step count
    stay."""
    rows = [_tp("reference", 3000.0, steps=20), _tp("fastmim", 3300.0, steps=20),
            _tp("fastmim+graph", 9000.0, steps=20, cuda_graph=False), _tp("reference+compile", 9500.0, steps=3),
            _tp("fastmim+compile", 4000.0)]  # fmt: skip
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = report.throughput_table(report.load_rows(tmp_path))
    assert "+graph" not in table and "9,000" not in table and "9,500" not in table and "4,000" in table
    rows[2]["cuda_graph"] = True
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert "3.00x (fastmim+graph)" in report.throughput_table(report.load_rows(tmp_path))
    assert report.MIN_STEPS == throughput.MIN_TRUSTED_STEPS


def test_report_keeps_other_compile_modes_and_compiled_ops_apart(tmp_path):
    rows = [_tp("fastmim+compile", 5000.0, compile_mode="default", compiled_ops="opaque"),
            _tp("fastmim+compile", 5200.0, date="2026-12-01T11:00:00+00:00", compile_mode="reduce-overhead",
                compiled_ops="opaque"),
            _tp("fastmim+compile", 5100.0, date="2026-12-01T12:00:00+00:00", compile_mode="default",
                compiled_ops="triton")]  # fmt: skip
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = [x for x in report.throughput_table(report.load_rows(tmp_path)).splitlines() if x.startswith("| 2026")]
    assert len(lines) == 3  # one configuration each: none replaces another
    assert any("5,000" in x and "compile_mode" not in x and "compiled_ops" not in x for x in lines)
    assert any("5,200" in x and "compile_mode=reduce-overhead" in x for x in lines)
    assert any("5,100" in x and "compiled_ops=triton" in x for x in lines)
    # nor do activation checkpointing and FSDP runs replace the plain one
    rows += [_tp("fastmim+compile", 3000.0, date="2026-12-01T13:00:00+00:00", compile_mode="default", grad_ckpt=True),
             _tp("fastmim+compile", 2000.0, date="2026-12-01T14:00:00+00:00", compile_mode="default", fsdp=True,
                 grad_ckpt=False)]  # fmt: skip
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = [x for x in report.throughput_table(report.load_rows(tmp_path)).splitlines() if x.startswith("| 2026")]
    assert len(lines) == 5 and any("5,000" in x and "grad_ckpt" not in x and "fsdp" not in x for x in lines)
    assert any("3,000" in x and "grad_ckpt=on" in x for x in lines) and any(
        "2,000" in x and "fsdp=on" in x and "grad_ckpt" not in x for x in lines
    )


def test_report_ops_backend_cells():
    assert [report._backend(i) for i in ("fastmim[cuda]", "fastmim+compile[opaque]", "fastmim+compile[triton]")] \
        == ["cuda", "compile[opaque]", "compile[triton]"]  # fmt: skip


def test_report_shows_graph_modes_once_measured(tmp_path):
    (tmp_path / "r").mkdir()
    rows = [_tp("reference", 3000.0), _tp("fastmim+compile", 5000.0)]
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert "+graph" not in report.throughput_table(report.load_rows(tmp_path))
    rows.append(_tp("fastmim+compile+graph", 6000.0))
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = report.throughput_table(report.load_rows(tmp_path))
    head = table.splitlines()[0].split(" | ")
    assert "fastmim+compile+graph" in head and "reference+graph" not in head
    assert "6,000" in table and "2.00x (fastmim+compile+graph)" in table


def test_report_ratios_of_fused_block_rows_and_forced_backends(tmp_path):
    """A row with fastmim's model options (fused blocks, graph modes) takes its ratio from the same model's plain
    reference row of that day, said so; a forced backend's row is its own, not the auto backend's."""
    rows = [_tp("reference", 2000.0), _tp("fastmim", 2500.0, ops_backend="auto[sm90] gather=cuda"),
            _tp("fastmim", 2400.0, date="2026-12-01T11:00:00+00:00", ops_backend="triton"),
            _tp("fastmim+graph", 5000.0, model_args={"fused_norm": True})]  # fmt: skip
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = [x for x in report.throughput_table(report.load_rows(tmp_path)).splitlines() if x.startswith("| 2026")]
    assert len(lines) == 3
    assert any("2,500" in x and "1.25x (fastmim)" in x and "backend" not in x for x in lines)
    assert any("2,400" in x and "backend=triton" in x and "1.20x (fastmim; its plain row)" in x for x in lines)
    assert any("5,000" in x and "fused_norm=True" in x and "2.50x (fastmim+graph; its plain row)" in x for x in lines)
    # an option that changes the network (SimMIM's paper encoder) is not divided by the plain one's reference
    rows.append(_tp("fastmim", 1500.0, model_args={"rel_pos_bias": "shared", "abs_pos_embed": False}))
    (tmp_path / "r" / "throughput.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = [x for x in report.throughput_table(report.load_rows(tmp_path)).splitlines() if x.startswith("| 2026")]
    rel = next(x for x in lines if "rel_pos_bias" in x)
    assert "1,500" in rel and "its plain row" not in rel
    # rows bundled in a results.tar (a GPU run with more files than the device tool returns) are read too
    import tarfile

    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "ops.jsonl").write_text(json.dumps(_tp("fastmim+compile", 7777.0)) + "\n")
    with tarfile.open(tmp_path / "r2" / "results.tar", "w") as t:
        t.add(tmp_path / "r2" / "ops.jsonl", arcname="./throughput.jsonl")
    (tmp_path / "r2" / "ops.jsonl").unlink()
    assert "7,777" in report.throughput_table(report.load_rows(tmp_path))


def test_report_keeps_the_gpu_loaders_crop_and_timing_rows_apart():
    base = {"benchmark": "dataload", "loader": "torch-gpu", "workers": 8, "batch": 256, "img_size": 224,
            "device": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00", "commit": "abc"}  # fmt: skip
    rows = [base | {"img_per_s": 9000.0}, base | {"img_per_s": 7000.0, "sync_timing": True},
            base | {"img_per_s": 6000.0, "sync_timing": True, "crop": "simple"}]  # fmt: skip
    lines = [x for x in report.dataload_table(rows).splitlines() if x.startswith("| 2026")]
    assert len(lines) == 3 and "9,000" in lines[0] and "(sync-timed)" not in lines[0]
    assert any("(simple crop) (sync-timed)" in x and "6,000" in x for x in lines)


def test_report_rejects_a_broken_row_naming_the_file(tmp_path, capsys):
    """A truncated line, a line that is a list, a row without its device: one line naming the file and line (the
    last two were a TypeError and a KeyError with no file named)."""
    (tmp_path / "bad.jsonl").write_text('{"benchmark": "ops"\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        report.load_rows(tmp_path)
    assert report.main(["--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: bad.jsonl:1 is not a JSON row")
    row = json.dumps(_tp("reference", 3000.0))
    for bad, said in (("[1, 2]", "bad.jsonl:2 is not a JSON row: a list, not an object"),
                      (json.dumps({"benchmark": "throughput", "img_per_s": 5.0, "date": "2026-12-01"}),
                       "bad.jsonl:2 is not a benchmark's row: it has no device")):  # fmt: skip
        (tmp_path / "bad.jsonl").write_text(f"{row}\n{bad}\n")
        assert report.main(["--results", str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"error: {said}\n"


def test_report_write_and_check_round_trip(tmp_path):
    results = tmp_path / "results"
    (results / "r").mkdir(parents=True)
    (results / "r" / "throughput.jsonl").write_text(json.dumps(_tp("reference", 3000.0)) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    argv = ["--results", str(results), "--readme", str(readme)]
    assert report.main([*argv, "--check"]) == 1
    assert report.main([*argv, "--write"]) == 0
    text = readme.read_text()
    assert report.main([*argv, "--check"]) == 0 and "3,000" in text and "intro" in text and "after" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.main([*argv, "--write"])


def test_benchmarks_readme_tables_are_up_to_date():
    """benchmarks/README.md shows what benchmarks/results/ holds: run `python benchmarks/report.py --write`."""
    assert report.main(["--check"]) == 0


def test_gpu_suite_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    import subprocess

    proc = subprocess.run([bash, "-n", str(BENCH / "gpu_suite.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_suite_dry_run_runs_the_named_steps_in_order_and_refuses_an_unknown_one(tmp_path):
    """GPU_SUITE_DRY_RUN=1 prints the commands of the selected steps, in GPU_SUITE_ONLY's order (a window spent on the
    most important first); a misspelt step name stops it before anything runs (it ran nothing, silently, before)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    import subprocess
    import sys

    env = {**os.environ, "GPU_SUITE_DRY_RUN": "1", "PYTHON": sys.executable, "FASTMIM_COMMIT": "abc1234"}

    def suite(only: str | None, out: str):
        e = dict(env, GPU_SUITE_ONLY=only) if only else env
        return subprocess.run([bash, str(BENCH / "gpu_suite.sh"), str(tmp_path / out)], capture_output=True,
                              text=True, env=e, timeout=300)  # fmt: skip

    proc = suite("gpu_data,ops", "a")
    assert proc.returncode == 0, proc.stdout[-2000:]
    log = proc.stdout
    assert "command not found" not in log and "No such file" not in log
    assert log.index("GPU JPEG decoding") < log.index("ops benchmark") and "pytest: the ops on CUDA" not in log
    assert "dataload.py --images 16384 --prepare-only" in log and "--ops gather,scatter,loss" in log
    # what the selection's commands may take against the budget (a call sized past it loses its last steps), and
    # each command as a shell takes it back (a -k filter with spaces quoted)
    limits = [int(n) for n in re.findall(r"DRY RUN \(limit (\d+) s", log)]
    assert len(limits) >= 7 and f"limits add up to {sum(limits)} s against a budget of 480 s" in log
    # what a 300 s call would skip were each step to take its estimate: the graph step's later runs
    env["GPU_SUITE_BUDGET_S"] = "300"
    graph = suite("graph", "g").stdout
    del env["GPU_SUITE_BUDGET_S"]
    said = re.search(r"DRY RUN: at the steps' estimates \(about (\d+) s for those that fit\), skipped: (.*)", graph)
    assert said and int(said.group(1)) <= 300 and "FCMAE graph throughput" in said.group(2), graph[-1500:]
    assert graph.count("SKIPPED: ") == said.group(2).count(";") + 1
    quoted = suite("ops_tests", "q").stdout
    assert "-k 'cuda-cuda or test_gpu_ops or " in quoted, quoted
    proc = suite("ops,graphs", "b")
    assert proc.returncode == 2 and "unknown step 'graphs'" in proc.stdout and "DRY RUN (limit" not in proc.stdout
    for budget in ("abc", "5m", "-1", "0900"):  # (not whole seconds: the budget was off, every step ran to its limit)
        env["GPU_SUITE_BUDGET_S"] = budget
        proc = suite("ops", "b")
        assert proc.returncode == 2 and f"expected whole seconds (300), got '{budget}'" in proc.stdout, proc.stdout
    del env["GPU_SUITE_BUDGET_S"]
    rows = [f"r{i}.jsonl" for i in range(9)]  # an earlier run's rows: a dry run leaves them (it bundled them)
    (tmp_path / "c").mkdir()
    for name in rows:
        (tmp_path / "c" / name).write_text("{}\n")
    full = suite(None, "c")
    assert full.returncode == 0 and "command not found" not in full.stdout + full.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([*rows, "suite.log"])
    script = (BENCH / "gpu_suite.sh").read_text()
    names = re.search(r'STEPS="([^"]*)"', script).group(1).split()
    assert len(names) == len(set(names)) and all(f"\ns_{n}() {{" in script for n in names)
    assert full.stdout.count("\n=== ") >= len(names)


def _suite_commands() -> list[tuple[str, list[str]]]:
    """(module, argv) of every Python benchmark and fastmim CLI command benchmarks/gpu_suite.sh runs, with its shell
    variables filled in (each value of a for loop's variable; $RESULTS and $SCRATCH as folders; ${X:-default} as the
    default)."""
    import re
    import shlex

    text = (BENCH / "gpu_suite.sh").read_text().replace("\\\n", " ")
    loops = {var: values.split() for var, values in re.findall(r"for (\w+) in ([\w .-]+); do", text)}
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or "$PY" not in line:
            continue
        line = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line).replace("$RESULTS", "/tmp/r").replace("$SCRATCH", "/tmp/s")
        variants = [line]
        for var, values in loops.items():
            if f"${var}" in line:
                variants = [v.replace(f"${var}", value) for v in variants for value in values]
        for variant in variants:
            for part in variant.split("$PY ")[1:]:
                argv = []
                for tok in shlex.split(part, comments=False):
                    if tok in ("&&", "||", ";", "|", "{", "}") or re.match(r"\d?>", tok):
                        break
                    argv.append(tok)
                if argv[0] == "-m" and argv[1].startswith("fastmim."):
                    commands.append((argv[1], argv[2:]))
                elif argv[0].startswith("benchmarks/") and argv[0].endswith(".py"):
                    commands.append((Path(argv[0]).stem, argv[1:]))
    return commands


def test_every_gpu_suite_command_parses(monkeypatch):
    """Each benchmark and CLI command of the GPU suite is accepted by its argument parser (a misspelt flag costs a
    GPU window otherwise): the command's main() runs up to its parse_args and stops there."""
    import argparse
    import importlib

    class Parsed(BaseException):  # not an Exception: the CLIs' error handlers must not catch it
        pass

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    commands = _suite_commands()
    assert {"throughput", "ops", "host_overhead", "fastmim.pretrain", "fastmim.eval"} <= {m for m, _ in commands}
    for module, argv in commands:
        mod = importlib.import_module(module + ".__main__" if module == "fastmim.eval" else module)
        with pytest.raises(Parsed):
            try:
                mod.main(argv)
            except SystemExit as e:
                raise AssertionError(f"gpu_suite.sh: {module} {' '.join(argv)}: rejected (exit {e.code})") from e


# --- FCMAE and the sparse ConvNeXt V2 encoder ---


def test_throughput_fcmae_recipe_on_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    args = ["--recipe", "fcmae", "--model", "convnextv2_atto", "--img-size", "64", "--batch-size", "2", "--device",
            "cpu", "--amp", "none", "--modes", "reference,fastmim", "--steps", "2", "--warmup", "1",
            "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["reference", "fastmim"] and rows[0]["model"] == "fcmae_convnextv2_atto"
    # same weights and masks: the dense_masked reference and the sparse encoder train to the same loss
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-4)
    # the counter sees the rows backend's matmuls and the sparse depthwise conv (a registered formula); forward only
    check = rows[1]["flop_check"]
    assert check["pass"] == "fwd" and check["formula_gflop"] == pytest.approx(check["counted_gflop"], rel=0.01)


def test_fcmae_flop_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from fastmim.masking import random_masking

    for backend, visible in (("dense_masked", 1.0), ("fastmim", None)):
        torch.manual_seed(0)
        m = fastmim.create_model("fcmae_convnextv2_atto", img_size=96, decoder_embed_dim=64, sparse_backend=backend)
        info = random_masking(1, 9, 0.6, generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as fc:  # forward only: the counter's grouped-conv backward over-counts
            m(torch.randn(1, 3, 96, 96), mask=info)
        # dense_masked runs every conv densely: the formula at visible fraction 1 counts exactly that
        formula = recipes.fcmae_flops_per_image(m, visible=visible, forward_only=True)
        assert formula == pytest.approx(fc.get_total_flops(), rel=0.005)
    # forward + backward: 3x the forward, except the stem's backward (no image gradient)
    full, fwd = recipes.fcmae_flops_per_image(m), recipes.fcmae_flops_per_image(m, forward_only=True)
    assert 2.9 * fwd < full < 3.0 * fwd


def test_sparse_conv_benchmark_smoke_on_cpu(tmp_path):
    import sparse_conv

    out = tmp_path / "sc.jsonl"
    args = ["--model", "convnextv2_atto", "--batch-size", "1", "--img-size", "64", "--ratios", "0,0.5", "--reps",
            "1", "--warmup", "0", "--device", "cpu", "--amp", "none", "--out", str(out)]  # fmt: skip
    assert sparse_conv.main(args) == 0
    rows = read_rows(out)
    backends = sparse_conv.default_backends()  # dense_masked, fastmim, and spconv where it is installed
    assert backends[:2] == ["dense_masked", "fastmim"]
    assert [(r["backend"], r["mask_ratio"]) for r in rows] == [("dense", 0.0)] + [(b, ratio) for ratio in (0.0, 0.5)
                                                                                  for b in backends]  # fmt: skip
    assert [r["visible"] for r in rows] == [1.0] * (1 + len(backends)) + [0.5] * len(backends)  # 2 of 4 patches
    assert all(r["ms_median"] > 0 and r["device"] == "cpu" and r["commit"] for r in rows)
    assert all(r["speedup_vs_dense_masked"] > 0 for r in rows if r["backend"] not in ("dense", "dense_masked"))
    table = report.sparse_conv_table(rows)
    assert table.count("| cpu | convnextv2_atto |") == 2


def test_sparse_conv_benchmark_bad_arguments(capsys):
    import sparse_conv

    for args, message in ((["--ratios", "1.0"], "--ratios must lie in [0, 1)"), (["--backends", "mink"], "--backends"),
                          (["--img-size", "100"], "multiple of 32")):  # fmt: skip
        with pytest.raises(SystemExit):
            sparse_conv.main(["--model", "convnextv2_atto", "--device", "cpu", *args])
        assert message in capsys.readouterr().err


def test_sparse_conv_benchmark_runs_spconv_only_where_installed(monkeypatch, capsys):
    import sparse_conv

    monkeypatch.setattr(sparse_conv, "spconv_missing", lambda: "needs spconv: pip install spconv-cu120")
    assert sparse_conv.default_backends() == ["dense_masked", "fastmim"]
    with pytest.raises(SystemExit):
        sparse_conv.main(["--model", "convnextv2_atto", "--device", "cpu", "--backends", "fastmim,spconv"])
    assert "pip install spconv-cu120" in capsys.readouterr().err
    monkeypatch.setattr(sparse_conv, "spconv_missing", lambda: None)
    assert sparse_conv.default_backends() == ["dense_masked", "fastmim", "spconv"]


# --- mask generation ---


def test_masks_benchmark_smoke_on_cpu(tmp_path, capsys):
    import masks

    from fastmim.masking.strategies import STRATEGIES

    out = tmp_path / "masks.jsonl"
    # (--reps 2 without --min-reps: refused against the default 3 for a while; now the default is capped)
    args = ["--devices", "cpu", "--batch", "32", "--ref-batch", "4", "--reps", "2", "--warmup", "0", "--budget-s",
            "0.05", "--grid", "8", "--out", str(out)]  # fmt: skip
    assert masks.main(args) == 0
    err = capsys.readouterr().err
    rows = read_rows(out)
    assert rows[0]["impl"] == "beit_loop" and rows[0]["speedup_vs_beit_loop"] == 1.0 and rows[0]["batch"] == 4
    assert {r["strategy"] for r in rows if r["impl"] == "torch"} == set(STRATEGIES)
    assert {r["strategy"] for r in rows if r["impl"] == "ref"} == set(STRATEGIES)
    assert not [r for r in rows if r["impl"] == "triton"]  # CUDA only: on CPU it would time Triton's interpreter
    for r in rows:
        assert r["benchmark"] == "masks" and r["grid"] == "8x8" and r["device"] == "cpu" and r["commit"] and r["torch"]
        assert r["masks_per_s"] > 0 and r["ms_per_batch"] > 0 and r["reps"] >= 1
        assert r["batch"] == (4 if r["impl"] in ("ref", "beit_loop") else 32)
        assert r["masks_per_s"] == pytest.approx(r["batch"] / r["ms_per_batch"] * 1e3, rel=1e-3)
        if r["strategy"] == "block":  # the loop is BEiT's block algorithm: another strategy's ratio would compare two
            # algorithms (it did: random's "speedup" over the block loop)
            assert r["speedup_vs_beit_loop"] == pytest.approx(r["masks_per_s"] / rows[0]["masks_per_s"], rel=0.01,
                                                              abs=0.01)  # fmt: skip
        else:
            assert "speedup_vs_beit_loop" not in r
    # C++ rows (block, uniform, multiblock) on one core (a child process) and on all cores, or the reason they are
    # missing (the extension is not built)
    for name in (n for n, cls in STRATEGIES.items() if cls.has_cpp):
        cpp = [r for r in rows if r["strategy"] == name and r["impl"] == "cpp"]
        if _ext_has_masks():  # (this process at one thread, OMP_NUM_THREADS=1 as make test runs it: all cores is the
            # one-core row again, left out; two rows of 1 thread put the wrong one in the one-core column)
            assert sorted(r["threads"] for r in cpp)[0] == 1 and len(cpp) == (1 if torch.get_num_threads() == 1 else 2)
        else:
            assert f"SKIPPED {name} impl=cpp" in err
    assert "targets (printed, never asserted)" in err and "50x" in err


def _ext_has_masks() -> bool:
    from fastmim import _ext

    return _ext.available() and hasattr(_ext.require(), "block_mask_keys")


def test_beit_loop_baseline_masks_blocks_up_to_the_count():
    import masks

    gen = masks.beit_generator((14, 14))
    assert gen.num_masking_patches == 79 and gen.min_num_patches == 4  # the block strategy's ratio 0.4
    batch = masks.beit_loop(gen, 64)
    counts = batch.reshape(64, -1).sum(1)
    assert batch.shape == (64, 14, 14) and (counts <= 79).all() and (counts == 79).mean() > 0.8


def test_masks_benchmark_bad_arguments(capsys):
    import masks

    for args, message in ((["--strategies", "block,blob"], "--strategies must come from"),
                          (["--impls", "cuda"], "--impls must come from"), (["--batch", "0"], "--batch must be"),
                          (["--cpp-threads", "4"], "--cpp-threads"), (["--devices", "tpu"], "--devices"),
                          (["--reps", "2", "--min-reps", "5"], "--min-reps 5 is more than --reps 2")):  # fmt: skip
        with pytest.raises(SystemExit):
            masks.main(args)
        assert message in capsys.readouterr().err


def test_masks_table_puts_each_implementation_in_its_column():
    base = {"benchmark": "masks", "grid": "14x14", "device": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}
    rows = [
        {**base, "strategy": "block", "impl": "beit_loop", "threads": 1, "masks_per_s": 9000.0, "date": "2026-12-01"},
        {**base, "strategy": "block", "impl": "cpp", "threads": 1, "masks_per_s": 900000.0, "date": "2026-12-01"},
        {**base, "strategy": "block", "impl": "torch", "threads": 16, "masks_per_s": 1.5e6, "date": "2026-12-01"},
        {**base, "strategy": "block", "impl": "torch", "threads": 16, "masks_per_s": 1.0e6, "date": "2026-11-30"},
    ]
    lines = report.masks_table(rows).splitlines()
    assert lines[0].split(" | ")[4:7] == ["beit_loop masks/s", "cpp (1 thr) masks/s", "torch masks/s"]
    assert "| 2026-12-01 | H100 | 14x14 | block | 9,000 | 900,000 | 1,500,000 | abc1234 |" in lines
    assert any(line.startswith("| 2026-11-30 | H100 | 14x14 | block |") for line in lines)  # another day, own row
    # GPU rows: one column per batch size and implementation
    cuda = {**base, "strategy": "block", "on": "cuda", "threads": None, "date": "2026-12-02"}
    runs = (("torch", 256, 1e5), ("torch", 16384, 2e6), ("triton", 256, 3e6))
    gpu = [{**cuda, "impl": i, "batch": b, "masks_per_s": v} for i, b, v in runs]
    lines = report.masks_table(gpu).splitlines()
    assert lines[0].split(" | ")[4:7] == ["torch (batch 16384) masks/s", "torch (batch 256) masks/s",
                                          "triton (batch 256) masks/s"]  # fmt: skip
    assert "| 2026-12-02 | H100 | 14x14 | block | 2,000,000 | 100,000 | 3,000,000 | abc1234 |" in lines
    # CPU rows of two hosts stay on separate lines
    cpu = {**base, "device": "cpu", "strategy": "block", "impl": "cpp", "threads": 1, "date": "2026-12-02"}
    two_hosts = [{**cpu, "cpu_count": 2, "masks_per_s": 1e6}, {**cpu, "cpu_count": 16, "masks_per_s": 2e6}]
    lines = report.masks_table(two_hosts).splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["cpu (16 cores)", "cpu (2 cores)"]


# --- data loading ---


def test_dataload_benchmark_smoke_on_cpu(tmp_path, capsys):
    import dataload

    from fastmim.data.dali import dali_problem

    out, data = tmp_path / "dataload.jsonl", tmp_path / "jpegs"
    args = ["--images", "24", "--batch", "8", "--workers", "1", "--threads", "1", "--seconds", "0", "--warmup", "1",
            "--data", str(data), "--out", str(out)]  # fmt: skip
    assert dataload.main(args) == 0
    err = capsys.readouterr().err
    rows = read_rows(out)
    expected = ["torchvision"] + (["dali-cpu"] if dali_problem() is None else [])
    expected += ["dali-mixed"] if dali_problem() is None and torch.cuda.is_available() else []
    expected += ["torch-gpu"]  # decoding on the CPU without a GPU: a dry run of its code
    assert [r["loader"] for r in rows] == expected
    for name in {"dali-cpu", "dali-mixed"} - set(expected):
        assert f"not measured: {name}: " in err
    for r in rows:
        assert r["benchmark"] == "dataload" and r["batch"] == 8 and r["img_size"] == 224 and r["warmup_batches"] == 1
        assert (r["workers"] if r["loader"] in ("torchvision", "torch-gpu") else r["threads"]) == 1
        # --seconds 0: one epoch's worth of batches (24 images, batch 8), timed across the epoch boundary
        assert r["batches"] == 3 and r["images"] == 24 and r["passes"] == 1.0 and r["s"] > 0 and r["warmup_s"] > 0
        # (img_per_s is rounded to 0.1 and s to 1e-4: at a busy machine's 12 img/s, 12.0 for 12.049)
        assert r["img_per_s"] == pytest.approx(r["images"] / r["s"], rel=2e-3, abs=0.051)
        gpu = r["loader"] == "dali-mixed" or (r["loader"] == "torch-gpu" and torch.cuda.is_available())
        on = "cuda" if gpu else "cpu"
        assert r["output"] == [f"[3, 224, 224] {on}"]
        if r["loader"] == "torch-gpu":
            assert r["decode"] == on and set(r["ms_per_batch"]) == {"read", "decode", "augment", "wait"}
            assert r["ms_per_batch"]["decode"] > 0 and r["cpu_fallbacks"] == 0
        assert r["data"]["images"] == 24 and r["data"]["size"] == "500x375 q90" and 20 < r["data"]["mean_kb"] < 200
        assert r["commit"] and r["torch"] and r["date"] and r["cpu_count"] >= 1
        assert r["device"] == "cpu" or r["loader"] in ("dali-mixed", "torch-gpu")
        if Path("/proc/stat").exists():
            assert r["cpu_cores_ours"] > 0 and r["cpu_cores_others"] >= 0
    assert "targets (printed, never asserted)" in err and "1.5x torchvision" in err and "6,000 img/s" in err
    if not torch.cuda.is_available():
        assert "torch-gpu >= 6,000 img/s (H100/H200) with <= 8 workers: not measured (no CUDA device" in err
    if "dali-cpu" not in expected:
        assert "1.5x torchvision at equal threads = workers (2-core CPU): not measured (" in err
    # the generated set: class folders of 500x375 / 375x500 JPEGs, reused while its marker matches
    files, marker = dataload.list_images(data), json.loads((data / dataload.MARKER).read_text())
    assert len(files) == 24 and marker == dataload.data_params(24, 0)
    from PIL import Image

    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size in ((500, 375), (375, 500))
    stamp = (data / dataload.MARKER).stat().st_mtime_ns
    assert dataload.prepare_data(str(data), 24, 0)[1] == files and (data / dataload.MARKER).stat().st_mtime_ns == stamp
    assert "reused" in capsys.readouterr().err


def test_dataload_images_are_a_function_of_seed_and_index():
    import dataload
    import numpy as np

    (a_cls, a), (b_cls, b) = dataload.make_image(5, 0), dataload.make_image(5, 0)
    assert a_cls == b_cls and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(dataload.make_image(5, 1)[1].resize(a.size)))


def test_dataload_reads_a_folder_of_ones_own_as_found(tmp_path, capsys):
    import dataload

    own = make_image_folder(tmp_path / "own", n=12)
    before = sorted(p.name for p in own.rglob("*"))
    root, files, data = dataload.prepare_data(str(own), 8, seed=0)
    assert root == own and len(files) == 8 and len(set(files)) == 8 and set(files) <= set(dataload.list_images(own))
    assert data["images"] == 8 and data["size"] == "as found" and data["path"] == str(own) and data["mean_kb"] > 0
    assert sorted(p.name for p in own.rglob("*")) == before  # nothing written
    assert "a folder of your own" in capsys.readouterr().err


def test_dataload_names_a_bad_file_and_fails_when_nothing_was_measured(tmp_path, capsys):
    """A folder of one's own with an undecodable file and a broken link: no traceback, the row's line names the
    file and says to scan, and with no row measured the exit status is 1."""
    import dataload

    own = make_image_folder(tmp_path / "own", n=8)
    bad = sorted(own.rglob("*.jpg"))[0]
    bad.write_bytes(b"not an image")
    (own / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    args = ["--loaders", "torchvision", "--images", "8", "--batch", "4", "--workers", "0", "--seconds", "0",
            "--warmup", "0", "--data", str(own)]  # fmt: skip
    assert dataload.main(args) == 1
    err = capsys.readouterr().err
    assert "1 of the files cannot be read (broken links?)" in err and "Traceback" not in err
    assert "not measured: torchvision (0 workers): cannot read image" in err and "fastmim.data.scan" in err


def test_dataload_targets_printed_against_the_rows(capsys):
    import dataload

    tv = {"loader": "torchvision", "workers": 2, "img_per_s": 100.0}
    mixed = {"loader": "dali-mixed", "threads": 16, "img_per_s": 5000.0, "device": "NVIDIA H100", "batch": 256}
    rows = [tv, {"loader": "dali-cpu", "threads": 2, "img_per_s": 180.0}, mixed]
    dataload.report_targets(rows, {})
    err = capsys.readouterr().err
    assert "1.80x at 2 (180 vs 100 img/s): met" in err and "5,000 img/s on NVIDIA H100" in err and "NOT met" in err
    dataload.report_targets([tv], {"dali-cpu": "no DALI", "dali-mixed": "no CUDA device here"})
    err = capsys.readouterr().err
    assert "(2-core CPU): not measured (no DALI)" in err and "(H100): not measured (no CUDA device here)" in err
    dataload.report_targets([tv, {"loader": "dali-cpu", "threads": 1, "img_per_s": 90.0}], {}, ["torchvision"])
    assert "not measured (dali-cpu not in --loaders)" in capsys.readouterr().err


def test_dataload_benchmark_bad_arguments(capsys):
    import dataload

    for args, message in ((["--loaders", "ffcv"], "--loaders must come from"), (["--workers", "-1"], "--workers"),
                          (["--threads", "0"], "--threads"), (["--images", "8", "--batch", "16"], "at least one"),
                          (["--seconds", "-1"], "--seconds")):  # fmt: skip
        with pytest.raises(SystemExit):
            dataload.main(args)
        assert message in capsys.readouterr().err


def test_dataload_table_one_row_per_loader_and_count(tmp_path):
    base = {"benchmark": "dataload", "batch": 64, "img_size": 224, "device": "cpu", "cpu_count": 2, "commit": "abc1234"}
    rows = [
        {**base, "loader": "dali-cpu", "threads": 2, "img_per_s": 300.0, "date": "2026-12-01T10:00:00+00:00",
         "interp": "linear"},
        {**base, "loader": "dali-cpu", "threads": 2, "img_per_s": 250.0, "date": "2026-12-01T10:00:00+00:00",
         "interp": "cubic"},
        {**base, "loader": "torchvision", "workers": 2, "img_per_s": 150.0, "date": "2026-12-01T10:00:00+00:00"},
        {**base, "loader": "torchvision", "workers": 2, "img_per_s": 160.0, "date": "2026-12-01T11:00:00+00:00"},
        {**base, "loader": "torchvision", "workers": 1, "img_per_s": 90.0, "date": "2026-12-01T11:00:00+00:00"},
        {**base, "loader": "dali-mixed", "threads": 16, "batch": 256, "img_per_s": 7000.0, "cpu_count": 16,
         "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-02T09:00:00+00:00"},
        {"benchmark": "masks", "masks_per_s": 1.0},
    ]  # fmt: skip
    lines = report.dataload_table(rows).splitlines()
    assert lines[0] == "| date | device | loader | workers/threads | batch | shrink filter | img/s | commit |"
    assert lines[2:] == [
        "| 2026-12-01 | cpu (2 cores) | torchvision | 1 workers | 64 | cubic | 90 | abc1234 |",
        "| 2026-12-01 | cpu (2 cores) | torchvision | 2 workers | 64 | cubic | 160 | abc1234 |",  # the later row
        "| 2026-12-01 | cpu (2 cores) | dali-cpu | 2 threads | 64 | cubic | 250 | abc1234 |",  # a row per filter
        "| 2026-12-01 | cpu (2 cores) | dali-cpu | 2 threads | 64 | linear | 300 | abc1234 |",
        "| 2026-12-02 | H100 | dali-mixed | 16 threads | 256 | cubic | 7,000 | abc1234 |",
    ]
    assert "### Data loading (img/s at 224 px, MAE augmentation)" in report.render(tmp_path)


def test_auto_cuda_backends_are_the_fastest_in_the_results_they_name():
    """fastmim.ops' auto choice on CUDA is a table per GPU model read off a committed run on that GPU: each listed
    op's backend must be the fused backend with the lowest fwd+bwd median in that file (so an edit of either shows up
    here), and the file must come from that GPU model."""
    from fastmim.ops._dispatch import AUTO_CUDA, AUTO_CUDA_ARCH, AUTO_CUDA_SOURCE

    assert AUTO_CUDA and set(AUTO_CUDA) == set(AUTO_CUDA_SOURCE) == set(AUTO_CUDA_ARCH)
    for gpu, table in AUTO_CUDA.items():
        path = BENCH.parent / AUTO_CUDA_SOURCE[gpu].split(" ")[0]
        assert path.is_file(), f"AUTO_CUDA_SOURCE[{gpu!r}] names {path}, which is not committed"
        rows = [
            r for r in read_rows(path) if r.get("pass") == "fwd+bwd" and str(r.get("impl", "")).startswith("fastmim")
        ]
        assert rows and all(gpu.lower() in r["device"].lower() for r in rows), f"{path} is not a {gpu} run"
        best: dict[str, tuple[float, str]] = {}
        for r in rows:
            backend = r["impl"].removeprefix("fastmim[").rstrip("]")
            if r["op"] not in best or r["ms_median"] < best[r["op"]][0]:
                best[r["op"]] = (r["ms_median"], backend)
        for op, backend in table.items():
            measured = "patchify" if op == "unpatchify" else op  # unpatchify is patchify's backward
            assert measured in best, f"{op}: no fwd+bwd row in {path}"
            assert best[measured][1] == backend, (
                f"{gpu} {op}: AUTO_CUDA says {backend}, {path} measured {best[measured]}"
            )


def test_step_floor_counts_parameter_traffic_and_flops():
    """ViT-B-sized numbers: 111M parameters x 44 bytes at 4.2 TB/s, 256 x 58.46 GFLOP at 790 TFLOP/s."""
    f = throughput.step_floor(256 * 58.46e9, 111_000_000, 790.0, 4200.0)
    assert f["floor_matmul_ms"] == pytest.approx(18.94, abs=0.01)
    assert f["floor_bytes_gb"] == pytest.approx(4.884, abs=1e-3)
    assert f["floor_bytes_ms"] == pytest.approx(1.163, abs=1e-3)
    assert f["floor_ms"] == pytest.approx(20.11, abs=0.01)


@pytest.mark.slow
def test_data2vec2_in_the_throughput_benchmark(tmp_path, monkeypatch):
    """The reference runs M separate teacher + student passes per image and computes the same loss as the amortised
    model on the same masks (noise off); both modes run in the harness; the FLOP formula agrees with
    torch.utils.flop_counter's count of the forward."""
    from fastmim.methods import data2vec2

    monkeypatch.setattr(data2vec2, "DATA2VEC2_NOISE_STD", 0.0)
    torch.manual_seed(0)
    fast = recipes.RECIPES["data2vec2"].build("data2vec2_vit_tiny_patch16", "fastmim", img_size=64, depth=2,
                                              num_masks=3)  # fmt: skip
    ref = recipes.SeparatePasses(fast)
    assert recipes.core_model(ref) is fast
    imgs = torch.randn(2, 3, 64, 64)
    info = fast.make_mask(2, torch.device("cpu"))
    torch.testing.assert_close(ref(imgs, mask=info)[0], fast(imgs, mask=info)[0], rtol=1e-5, atol=1e-6)
    calls = []
    real = data2vec2.teacher_targets
    monkeypatch.setattr(data2vec2, "teacher_targets", lambda t, x, k: calls.append(x.shape[0]) or real(t, x, k))
    ref(imgs)
    fast(imgs)
    assert calls == [6, 2]  # the teacher sees every masked copy in the reference, each image once in fastmim
    out = tmp_path / "rows.jsonl"
    args = ["--recipe", "data2vec2", "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2",
            "--model-arg", "depth=2", "--model-arg", "num_masks=4", "--device", "cpu", "--amp", "none", "--steps",
            "1", "--warmup", "1", "--modes", "reference,fastmim", "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["reference", "fastmim"] and rows[0]["model_args"]["num_masks"] == 4
    check = rows[0]["flop_check"]
    assert check["pass"] == "fwd" and check["formula_gflop"] == pytest.approx(check["counted_gflop"], rel=0.005)


@pytest.mark.slow
def test_ijepa_in_the_throughput_benchmark(tmp_path):
    """I-JEPA runs in both eager modes; its FLOP formula, on the counts of the masks the counted step drew, equals
    torch.utils.flop_counter's count of forward and backward; without a forward it uses the masks' mean counts."""
    out = tmp_path / "rows.jsonl"
    args = ["--recipe", "ijepa", "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "4",
            "--model-arg", "depth=2", "--model-arg", "pred_depth=2", "--device", "cpu", "--amp", "none", "--steps",
            "1", "--warmup", "1", "--modes", "reference,fastmim", "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["reference", "fastmim"] and rows[0]["gflop_per_img"] > 0
    check = rows[0]["flop_check"]
    assert check["pass"] == "fwd+bwd" and check["formula_gflop"] == pytest.approx(check["counted_gflop"], rel=0.005)
    differ = abs(check["formula_gflop"] - rows[0]["gflop_per_img"]) > 1e-3 * check["formula_gflop"]
    assert ("expected counts" in check.get("note", "")) == differ  # the row says why the two differ, when they do
    fresh = fastmim.create_model("ijepa_vit_base_patch16", pred_depth=2)
    nc, k, t = recipes.ijepa_counts(fresh)
    assert 40 < nc < 75 and k == 4 and 28 < t < 40  # I-JEPA's 14x14 masks: contexts truncated, blocks of ~33


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["simmim", "pixmim", "maskfeat", "a2mim"])
def test_new_recipes_in_the_throughput_benchmark(recipe, tmp_path):
    """SimMIM and PixMIM run in both eager modes, train the same model to the same loss, and their FLOP formulas
    agree with torch.utils.flop_counter's count of a real step."""
    out = tmp_path / "rows.jsonl"
    args = ["--recipe", recipe, "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2",
            "--model-arg", "depth=2", "--device", "cpu", "--amp", "none", "--steps", "1", "--warmup", "1",
            "--modes", "reference,fastmim", "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    rows = read_rows(out)
    assert [r["mode"] for r in rows] == ["reference", "fastmim"] and all(r["recipe"] == recipe for r in rows)
    check = rows[0]["flop_check"]
    assert check["formula_gflop"] == pytest.approx(check["counted_gflop"], rel=0.005)
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-3)


def test_ema_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/ema.py times the teacher's update, the per-parameter loop and a copy of the parameters; the update
    moved the teacher (it ran), and the row says by how much it exceeds the copy."""
    import ema

    out = tmp_path / "ema.jsonl"
    assert ema.main(["--model", "vit_tiny_patch16", "--img-size", "32", "--device", "cpu", "--reps", "2",
                     "--out", str(out)]) == 0  # fmt: skip
    (row,) = read_rows(out)
    assert row["benchmark"] == "ema" and row["params_m"] == pytest.approx(5.5, abs=0.2)
    assert row["update_ms"] > 0 and row["copy_ms"] > 0 and row["update_vs_copy"] > 0 and row["commit"]
    with pytest.raises(SystemExit):
        ema.main(["--model", "resnet50"])


def test_throughput_grad_ckpt_flag(tmp_path):
    """--grad-ckpt turns activation checkpointing on in the timed model and says so in the row."""
    out = tmp_path / "rows.jsonl"
    args = ["--model", "vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--model-arg", "depth=1",
            "--device", "cpu", "--amp", "none", "--steps", "1", "--warmup", "0", "--modes", "fastmim",
            "--no-flop-count", "--grad-ckpt", "--out", str(out)]  # fmt: skip
    assert throughput.main(args) == 0
    (row,) = read_rows(out)
    assert row["grad_ckpt"] is True and row["img_per_s"] > 0


def test_hf_vit_mae_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/hf_vit_mae.py runs both models on the same batch and writes one row naming both times."""
    pytest.importorskip("transformers", reason="the Hugging Face benchmark needs transformers (fastmim[hf])")
    import hf_vit_mae

    out = tmp_path / "rows.jsonl"
    assert hf_vit_mae.main(["--size", "tiny", "--batch-size", "2", "--reps", "1", "--device", "cpu", "--out",
                            str(out)]) == 0  # fmt: skip
    (row,) = [json.loads(s) for s in out.read_text().splitlines()]
    assert row["benchmark"] == "hf_vit_mae" and row["model"] == "ViTMAE-tiny" and not row["compiled"]
    assert row["hf_ms"] > 0 and row["fastmim_ms"] > 0 and row["speedup"] == pytest.approx(
        row["hf_ms"] / row["fastmim_ms"], rel=1e-2)  # fmt: skip
    with pytest.raises(SystemExit):
        hf_vit_mae.main(["--size", "tiny", "--batch-size", "0"])


def test_triton_tile_sweep_configs_compute_what_the_defaults_compute():
    """Every tile choice benchmarks/tune_triton_ops.py times on the GPU is first checked here (interpreter, small
    batch): a faster config that computed something else would be worthless."""
    import tune_triton_ops as tune

    for _, sweep in tune._sweeps(2, torch.device("cpu"), list(tune.KERNELS)):
        for kernel, _dtype, _shape, names, default, configs, nbytes, launch in sweep():
            assert len(default) == len(names) and nbytes > 0
            want = launch(default)
            for cfg in [c for c in configs if c != default][:2]:
                got = launch(cfg)
                want_t = want if isinstance(want, tuple) else (want,)
                got_t = got if isinstance(got, tuple) else (got,)
                for w, g in zip(want_t, got_t, strict=True):
                    if w is None:
                        assert g is None
                    elif kernel.startswith("loss") or kernel == "scatter_bwd":  # sums in another order
                        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{kernel} {cfg}")
                    else:
                        assert torch.equal(g.nan_to_num(), w.nan_to_num()), f"{kernel} {cfg}"


def test_triton_tile_sweep_rejects_an_unknown_kernel(capsys):
    import tune_triton_ops as tune

    with pytest.raises(SystemExit):
        tune.main(["--kernels", "gather,nope"])
    assert "nope" in capsys.readouterr().err


def test_ops_table_shows_target_ops_by_their_forward():
    """hog_target and low_pass_target have no gradient (forward rows only): listed by the forward, marked; an op with
    forward+backward rows is listed by those alone."""
    import report

    def row(op, pas, ms):
        return {"benchmark": "ops", "op": op, "pass": pas, "impl": "fastmim[torch]", "shape": "s", "ms_median": ms,
                "speedup_vs_eager": 2.0, "device": "cpu", "date": "2026-12-05T10:00", "commit": "abc"}  # fmt: skip

    table = report.ops_table([row("hog_target", "fwd", 1.5), row("grn", "fwd", 0.5), row("grn", "fwd+bwd", 0.9)])
    lines = [x for x in table.splitlines() if "| cpu |" in x]
    assert len(lines) == 2
    assert any("hog_target (fwd)" in x and "1.500" in x for x in lines)
    assert any("| grn |" in x and "0.900" in x for x in lines)


def test_report_refuses_a_results_path_without_rows_and_out_is_checked_before_measuring(tmp_path, capsys):
    """A mistyped --results rendered empty tables and --write put them in the README (exit 0); a bad --out was found
    at the first row, after that mode's measurement, and the modes after it never ran."""
    from benchmarks.common import out_file

    readme = tmp_path / "README.md"
    readme.write_text(report.README.read_text())
    (tmp_path / "empty").mkdir()
    for results in (tmp_path / "typo", tmp_path / "empty"):
        with pytest.raises(SystemExit) as stop:
            report.main(["--results", str(results), "--readme", str(readme), "--write"])
        assert stop.value.code == 2 and "--results" in capsys.readouterr().err
    assert readme.read_text() == report.README.read_text()  # untouched
    for bad in (tmp_path, tmp_path / "file" / "x.jsonl"):
        (tmp_path / "file").write_text("a file, not a folder")
        with pytest.raises(argparse.ArgumentTypeError):
            out_file(str(bad))
    # checked, not made: a run refused after the check (a bad model, no GPU) left an empty file and its folders
    assert out_file(str(tmp_path / "new" / "sub" / "rows.jsonl")) and not (tmp_path / "new").exists()
    (tmp_path / "kept.jsonl").write_text('{"a": 1}\n')
    assert out_file(str(tmp_path / "kept.jsonl")) and (tmp_path / "kept.jsonl").read_text() == '{"a": 1}\n'
    with pytest.raises(SystemExit):
        throughput.main([*SMALL, "--model", "vit_bogus", "--out", str(tmp_path / "t" / "rows.jsonl")])
    assert not (tmp_path / "t").exists()


def test_the_masks_gpu_target_is_judged_on_its_own_grid_only(capsys):
    """The GPU target (1M masks/s) is stated for 14x14: a --grid 7 run's rows said "met" against it, without the
    grid; now each line names its grid, and another grid's rows are not judged."""
    import masks

    row = {"strategy": "block", "impl": "torch", "on": "cuda", "batch": 16384, "masks_per_s": 2e6}
    masks.report_targets([row], [], (7, 7))
    err = capsys.readouterr().err
    assert "on 7x7: not judged (the target is for 14x14, this is 7x7)" in err and ": met" not in err
    masks.report_targets([row], [], (14, 14))
    assert "at batch  16384 on 14x14: met" in capsys.readouterr().err


def test_the_measured_peak_takes_the_models_own_matmul_call_too(monkeypatch):
    """On a CPU without bf16 units a bf16 `a @ b` runs ~20x slower than a bf16 linear (oneDNN), which the model calls:
    a peak from `a @ b` alone put a CPU bf16 run "above 100% MFU". The peak is the faster of the two."""
    import torch.nn.functional as F

    calls, own = [], F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or own(*a, **k))
    peak = throughput.measure_peak_tflops(torch.device("cpu"), torch.bfloat16, 64)
    assert peak > 0 and len(calls) == 13  # 3 warm-up and 10 timed calls


def test_checked_device_makes_the_gpu_current_with_or_without_an_index(monkeypatch):
    """--device cuda (the benchmarks' default) has no index: torch.cuda.set_device refuses such a device, so every
    GPU benchmark would have stopped at its start. The current device is taken for it; cuda:N is checked first."""
    from benchmarks.common import checked_device

    made_current = []

    def set_device(d):
        d = torch.device(d) if not isinstance(d, torch.device) else d
        if d.type == "cuda" and d.index is None:  # (torch's own refusal)
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{d}")
        made_current.append(d)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    ap = argparse.ArgumentParser()
    assert checked_device(ap, "cuda") == torch.device("cuda", 0) and checked_device(ap, "cuda:1").index == 1
    assert made_current == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(SystemExit):
        checked_device(ap, "cuda:2")
    assert checked_device(ap, "cpu") == torch.device("cpu") and len(made_current) == 2


def test_a_rows_commit_is_the_checkouts_before_an_exported_fastmim_commit(tmp_path, monkeypatch):
    """FASTMIM_COMMIT names the commit of a copy without .git (the GPU machine's); exported in a checkout, it named
    other code in every row, and hid "+dirty". The checkout's own hash comes first now."""
    from fastmim import provenance

    monkeypatch.setenv("FASTMIM_COMMIT", "deadbee")
    monkeypatch.setattr(provenance, "_COMMIT", [])
    if not (provenance.ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (an installed copy): the checkout's hash cannot be read")
    commit = provenance.git_commit()
    assert commit and commit != "deadbee" and provenance.git_commit() == commit
    copy = tmp_path / "copy"  # a copy without .git: the variable names it
    monkeypatch.setattr(provenance, "ROOT", copy)
    monkeypatch.setattr(provenance, "_COMMIT", [])
    assert provenance.git_commit() == "deadbee"
    monkeypatch.delenv("FASTMIM_COMMIT")
    assert provenance.git_commit() is None


def test_ctrl_c_in_a_throughput_run_keeps_the_finished_rows_and_says_so(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback from inside autograd; the rows written stay whole, and the run
    now says where they are and exits 130. The signal comes while the first mode times its 100000 steps."""
    import signal
    import subprocess

    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(BENCH / "throughput.py"), *SMALL, "--modes", "reference,fastmim",
                             "--steps", "100000", "--warmup", "1", "--no-flop-count", "--out", str(out)], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            # (an xdist worker ignores SIGINT, and a child inherits that: Ctrl-C's default back)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        seen = []
        for line in proc.stderr:  # the line said once the modes begin (after the peak's measurement)
            seen.append(line)
            if "GFLOP per image" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = "".join(seen) + err
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert f"interrupted: the modes that finished are written to {out}; the one running was not" in err
    assert not out.exists() or out.read_text() == ""  # (no half-written row)


def test_report_puts_a_cpu_mask_row_of_another_batch_in_its_own_column(tmp_path):
    """masks.py --batch 256 on CPU: its C++ row shared the 4096-batch rows' column (the latest replacing them)."""
    base = {"benchmark": "masks", "strategy": "block", "on": "cpu", "device": "cpu", "date": "2026-12-01T10:00:00",
            "grid": 14, "commit": "abc1234"}  # fmt: skip
    rows = [{**base, "impl": "cpp", "threads": 1, "batch": 4096, "masks_per_s": 500000.0},
            {**base, "impl": "cpp", "threads": 1, "batch": 256, "masks_per_s": 300000.0, "date": "2026-12-01T11:00"},
            {**base, "impl": "ref", "threads": 1, "batch": 256, "masks_per_s": 9000.0}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = report.masks_table(report.load_rows(tmp_path))
    assert "cpp (1 thr) masks/s" in table and "cpp (1 thr) (batch 256) masks/s" in table and "ref masks/s" in table
    assert "500,000" in table and "300,000" in table


def test_host_overhead_rows_say_their_calls_and_host(tmp_path):
    """host_overhead.py's rows held neither the calls per round nor the host, which decide a host time."""
    import host_overhead

    out = tmp_path / "ho.jsonl"
    assert host_overhead.main(["--device", "cpu", "--calls", "2", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert rows and all(r["calls"] == 2 and r["cpu_count"] >= 1 and r["us_per_call"] > 0 and r["run"] for r in rows)
