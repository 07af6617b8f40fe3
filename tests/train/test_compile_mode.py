"""--compile's mode: chosen per torch version and device by measurement (auto), or asked for; combinations that
cannot run are refused before anything is written; the CLI trains compiled on CPU with the chosen mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastmim import pretrain
from fastmim.train import compile_mode as cm
from tests.conftest import TINY_ARGS

ROOT = Path(__file__).resolve().parents[2]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_auto_takes_the_measured_mode_of_this_torch_version_only(monkeypatch):
    monkeypatch.setattr(cm, "BEST_COMPILE_MODE", {("2.11", "cuda"): "max-autotune-no-cudagraphs",
                                                  ("2.12", "cuda"): "reduce-overhead"})  # fmt: skip
    assert cm.resolve_compile_mode("auto", CUDA, version="2.11.0+cu130")[0] == "max-autotune-no-cudagraphs"
    assert cm.resolve_compile_mode("auto", CUDA, version="2.12.1")[0] == "reduce-overhead"
    # a version (or a device) nobody measured: inductor's default, and the reason says it was not measured
    mode, why = cm.resolve_compile_mode("auto", CUDA, version="2.13.0")
    assert mode == "default" and "no measurement" in why and "2.13" in why
    assert cm.resolve_compile_mode("auto", CPU, version="2.11.0")[0] == "default"
    # inductor's own CUDA graphs cannot run inside --cuda-graph's capture: auto falls back, an explicit ask fails
    mode, why = cm.resolve_compile_mode("auto", CUDA, cuda_graph=True, version="2.12.0")
    assert mode == "default" and "reduce-overhead" in why
    with pytest.raises(ValueError, match="cannot be captured"):
        cm.resolve_compile_mode("max-autotune", CUDA, cuda_graph=True)
    assert cm.resolve_compile_mode("max-autotune-no-cudagraphs", CUDA, cuda_graph=True)[0] == (
        "max-autotune-no-cudagraphs")  # fmt: skip
    with pytest.raises(ValueError, match="expected auto or one of"):
        cm.resolve_compile_mode("fastest", CUDA)
    assert cm.torch_minor("2.14.1+cu130") == "2.14" and cm.torch_minor("2.11.0a0") == "2.11"


def test_best_compile_modes_are_the_fastest_in_the_results_they_name():
    """Each entry of the table must be the mode with the highest img/s among the fastmim+compile rows of its torch
    version and device in the committed file it names (so an edit of either shows up here)."""
    if not cm.BEST_COMPILE_MODE:
        assert cm.BEST_COMPILE_MODE_SOURCE is None  # no table without a source
        return
    path = ROOT / cm.BEST_COMPILE_MODE_SOURCE.split(" ")[0]
    assert path.is_file(), f"BEST_COMPILE_MODE_SOURCE names {path}, which is not committed"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for (version, device), mode in cm.BEST_COMPILE_MODE.items():
        timed = {r["compile_mode"]: r["img_per_s"] for r in rows if r.get("mode") == "fastmim+compile"
                 and "img_per_s" in r and cm.torch_minor(r["torch"]) == version
                 and (r["device"] == "cpu") == (device == "cpu")}  # fmt: skip
        assert len(timed) >= 2, f"{(version, device)}: fewer than two modes timed in {path}"
        assert max(timed, key=timed.get) == mode, f"{(version, device)}: table says {mode}, {path} measured {timed}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compile", "--compile-mode", "max-autotune", "--cuda-graph"], "cannot be captured"),
        (["--compile", "--compile-mode", "fastest"], "compile_mode must be one of auto, default, reduce-overhead"),
    ],
)
def test_compile_mode_misuse_is_refused_before_anything_is_written(
    image_folder, tmp_path, capsys, monkeypatch, args, message
):
    monkeypatch.setenv("FASTMIM_CUDA_GRAPH_ON_CPU", "1")  # --cuda-graph's code path on CPU: the mode check decides
    out = tmp_path / "run"
    code = pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_compiled_cli_run_trains_in_the_chosen_mode(image_folder, tmp_path, capsys, monkeypatch):
    """--compile on CPU (inductor's C++ code): the step trains to finite losses, equal to the eager run's within
    compiled-code rounding; auto picked the default mode (nothing measured on CPU) and the startup line says why."""
    seen = []
    real = pretrain.compile_model
    monkeypatch.setattr(pretrain, "compile_model", lambda m, mode: seen.append(mode) or real(m, mode))

    def losses(out, *extra):
        assert pretrain.main([*TINY_ARGS, "--data-path", str(image_folder), "--output-dir", str(out), "--epochs",
                              "1", "--max-steps", "3", "--log-interval", "1", "--vis-interval", "100",
                              *extra]) == 0  # fmt: skip
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    torch._dynamo.reset()
    compiled = losses(tmp_path / "compiled", "--compile")
    assert seen == ["default"]
    assert "torch.compile mode default (auto: no measurement of the modes for torch" in capsys.readouterr().out
    eager = losses(tmp_path / "eager")
    assert len(compiled) == len(eager) == 3 and all(map(torch.isfinite, torch.tensor(compiled)))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
