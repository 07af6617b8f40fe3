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
