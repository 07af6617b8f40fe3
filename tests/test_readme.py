"""The README's copy-paste snippets run as written."""

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
