"""The README's copy-paste snippets run as written."""

import os
import re

import torch

from tests.conftest import ROOT


def _python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_common_tasks_op_snippet_runs_and_matches_the_references():
    """The fused-op snippet of "Common tasks": it runs on CPU tensors as pasted, and its results equal the plain
    PyTorch references' (so the shapes and meanings its comments give are the ops')."""
    from fastmim.ops import gather_visible_ref, scatter_masked_ref

    (snippet,) = [b for b in _python_blocks("Common tasks") if "fastmim.ops" in b]
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)
    B, N, D, K = ns["B"], ns["N"], ns["D"], ns["K"]
    assert ns["x_vis"].shape == (B, K, D) and ns["dec_in"].shape == (B, N, D)
    torch.testing.assert_close(ns["x_vis"], gather_visible_ref(ns["x"], ns["ids_keep"]))
    torch.testing.assert_close(ns["dec_in"], scatter_masked_ref(ns["x_vis"], ns["ids_restore"], torch.zeros(D)))
    assert int(ns["mask"].sum()) == B * (N - K) and ns["pred"].grad is not None
    assert torch.isfinite(ns["loss"]) and ns["loss"].ndim == 0  # (its equality to masked_mse_loss_ref: tests/ops)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_names_one_of_its_headings():
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)  # (a shell comment is no heading)
    anchors = {_slug(h) for h in re.findall(r"^#{1,4} (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 10 and "fused-ops-fastmimops" in anchors
    assert [a for a in links if a not in anchors] == []


def test_the_own_method_snippet_runs_and_trains_through_the_cli(tmp_path):
    """The "Your own method" snippet as pasted: its model hides a checkerboard (8 of 16 tokens, either phase) and
    learns the edges; saved as the README says (without its last three lines, with its ending) it trains as a
    script, with a loader worker, and its encoder is evaluated by name."""
    import json
    import subprocess
    import sys

    from fastmim.models import registry
    from tests.conftest import TINY_ARGS, make_image_folder

    blocks = _python_blocks("Models and the library")
    (snippet,) = [b for b in blocks if "Checkerboard" in b]
    (ending,) = [b for b in blocks if "pretrain.main()" in b]
    ns: dict = {}
    try:
        exec(compile(snippet, "README.md", "exec"), ns)
    finally:
        for name in [n for n in registry._REGISTRY if n.startswith("mae_sobel_")]:
            del registry._REGISTRY[name]
    mask = ns["mask"].bool().view(2, 4, 4)
    board = (torch.arange(4)[:, None] + torch.arange(4)) % 2 == 0
    assert all(torch.equal(m, board) or torch.equal(m, ~board) for m in mask)
    assert ns["model"].decoder_pred.weight.grad is not None and torch.isfinite(ns["loss"])
    ref = ns["Checkerboard"](4, seed=0, impl="ref")(indices=torch.arange(6))
    assert all(torch.equal(m, board) or torch.equal(m, ~board) for m in ref.mask)
    script = tmp_path / "train_sobel.py"
    script.write_text("\n".join(snippet.rstrip("\n").split("\n")[:-3]) + "\n\n" + ending)
    data = make_image_folder(tmp_path / "d", n=8, classes=2)
    labelled = tmp_path / "labelled"
    make_image_folder(labelled / "train", n=4)
    make_image_folder(labelled / "val", n=2, seed=1)
    out = tmp_path / "run"
    args = [a if a != "0" or TINY_ARGS[i - 1] != "--num-workers" else "1" for i, a in enumerate(TINY_ARGS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), *args, "--model", "mae_sobel_vit_tiny_patch16", "--data-path",
                        str(data), "--output-dir", str(out), "--max-steps", "2", "--loader", "torch"],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no reconstruction pictures" not in r.stdout  # the edges are drawn as an image
    from fastmim.eval.__main__ import main as eval_main

    assert eval_main(["knn", "--encoder", str(out), "--data-path", str(labelled), "--k", "2", "--device",
                      "cpu"]) == 0  # fmt: skip
    row = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert row["encoder"] == "vit_tiny_patch16" and row["model"] == "mae_sobel_vit_tiny_patch16"


def test_the_masks_snippet_runs_and_its_comments_hold():
    """The Masks snippet as pasted (it used names it never defined and a GPU): every count and shape its comments
    give."""
    (snippet,) = [b for b in _python_blocks("Models and the library") if 'build_mask("block"' in b]
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)
    assert ns["masks"].mask.shape == (8, 14, 14) and ns["masks"].mask.dtype == torch.bool
    assert ns["masks"].mask.flatten(1).sum(1).tolist() == [79] * 8
    assert ns["info"].ids_keep.shape == (8, 196 - 79)
    assert ns["jepa"].targets.shape == (64, 4, 14, 14)
    assert ns["d2v"].mask.shape == (8 * 16, 14, 14) and ns["d2v"].mask.flatten(1).logical_not().sum(1).eq(39).all()
    assert ns["hard"].mask.flatten(1).sum(1).eq(147).all()  # 75% of 196
    assert torch.equal(ns["mask"].bool(), ns["masks"].mask.flatten(1)) and torch.isfinite(ns["loss"])
