import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_throughput_smoke_on_cpu(tmp_path, capsys):
    import throughput

    out = tmp_path / "rows.jsonl"
    args = ["--model", "mae_vit_tiny_patch16", "--img-size", "64", "--batch-size", "2", "--steps", "2"]
    assert throughput.main([*args, "--warmup", "1", "--amp", "none", "--device", "cpu", "--out", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["img_per_s"] > 0 and row["device"] == "cpu" and row["torch"] and row["date"]


def test_flop_formula_matches_published_mae_base_count():
    import throughput
    import torch

    import fastmim

    with torch.device("meta"):
        m = fastmim.create_model("mae_vit_base_patch16")
    assert throughput.flops_per_image(m) / 1e9 == pytest.approx(58.7, abs=0.3)  # ~3x forward


def test_flop_formula_matches_torch_flop_counter():
    import throughput
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fastmim

    # explicit attention matmuls: the counter does not see the CPU SDPA kernel
    m = fastmim.create_model("mae_vit_tiny_patch16", img_size=64, attn_impl="math")
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = m(torch.randn(1, 3, 64, 64))
        loss.backward()
    assert throughput.flops_per_image(m) == pytest.approx(fc.get_total_flops(), rel=0.005)


def test_ops_benchmark_smoke_on_cpu(tmp_path):
    import ops

    out = tmp_path / "ops.jsonl"
    args = ["--device", "cpu", "--batch-size", "2", "--img-size", "32", "--patch-size", "8", "--encoder-dim", "16",
            "--decoder-dim", "8", "--reps", "2", "--no-compile", "--out", str(out)]  # fmt: skip
    assert ops.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["op"] == "copy" and rows[0]["gbps"] > 0
    timed = rows[1:]
    assert {r["op"] for r in timed} == {"gather_visible", "scatter_masked", "masked_mse_loss", "patchify"}
    assert {r["pass"] for r in timed} == {"fwd", "bwd", "fwd+bwd"}
    fused = [r for r in timed if r["impl"].startswith("fastmim")]
    assert len(fused) == 12 and all(r["speedup_vs_eager"] > 0 and r["ms_median"] > 0 for r in fused)
    assert all(r["commit"] and r["torch"] and r["date"] and r["device"] == "cpu" for r in rows)
