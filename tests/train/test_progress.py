"""Progress bars: redrawn in place on a terminal, plain lines at most every FASTMIM_PROGRESS_S seconds in a log."""

import io

import pytest

from fastmim.train.progress import line_break, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_state_and_no_carriage_returns(monkeypatch):
    """Into a file or a pipe: each drawn state is a line of its own (tqdm's bar joined them with carriage returns
    into one line, redrawn every second); the redraw at close with only its times changed is not a second line."""
    monkeypatch.setenv("FASTMIM_PROGRESS_S", "0")
    log = io.StringIO()
    bar = progress_bar(stream=log, total=4, desc="epoch 1/2")
    for i in range(4):
        bar.update()
        if i == 3:  # (the trainer sets its figures without a redraw)
            bar.set_postfix(loss="0.5000", refresh=False)
    bar.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == "", repr(log.getvalue())
    counts = [line.split(" [")[0] for line in lines[:-1]]
    assert counts == ["epoch 1/2: 0/4", "epoch 1/2: 1/4", "epoch 1/2: 2/4", "epoch 1/2: 3/4", "epoch 1/2: 4/4",
                      "epoch 1/2: 4/4"], lines  # fmt: skip
    assert lines[-2].endswith(", loss=0.5000]") and "loss" not in lines[-3]  # the final figures: the one repeat
    assert "<" in lines[2] and "it/s" in lines[2]  # elapsed<remaining, rate


def test_a_log_gets_a_line_at_most_every_interval(monkeypatch):
    """FASTMIM_PROGRESS_S=3600: 500 quick steps give the first state and the last, not 500 lines."""
    monkeypatch.setenv("FASTMIM_PROGRESS_S", "3600")
    log = io.StringIO()
    with progress_bar(stream=log, total=500, desc="scan", unit="img") as bar:
        for _ in range(500):
            bar.update()
    assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == ["scan: 0/500", "scan: 500/500"]
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("FASTMIM_PROGRESS_S", bad)
        with pytest.raises(ValueError, match=f"FASTMIM_PROGRESS_S='{bad}'"):
            progress_bar(stream=io.StringIO(), total=3)


def test_a_terminal_keeps_the_bar_and_a_disabled_bar_writes_nothing(monkeypatch):
    monkeypatch.setenv("FASTMIM_PROGRESS_S", "soon")  # (not read for a terminal or a disabled bar)
    term = Terminal()
    with progress_bar(stream=term, total=3, desc="epoch 1/1", mininterval=0) as bar:
        for _ in range(3):
            bar.update()
    assert term.getvalue().count("\r") >= 3 and "|" in term.getvalue()  # redrawn in place, with its bar
    quiet = io.StringIO()
    with progress_bar(stream=quiet, total=3, disable=True) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_a_bad_interval_is_refused_by_each_command_before_any_work(tmp_path, capsys, monkeypatch):
    """FASTMIM_PROGRESS_S=soon was found by the first progress bar: after the model's build and the kNN baseline, with
    config.yaml written (the next start then set the folder aside as unfinished), on rank 0 only; on a terminal,
    never. Each command refuses it at its start, exit 2, having written nothing."""
    from fastmim import pretrain
    from fastmim.data import scan
    from fastmim.eval.__main__ import main as eval_main

    monkeypatch.setenv("FASTMIM_PROGRESS_S", "soon")
    out = tmp_path / "run"
    assert pretrain.main(["--output-dir", str(out), "--max-steps", "1"]) == 2
    assert "error: FASTMIM_PROGRESS_S='soon': expected seconds" in capsys.readouterr().err and not out.exists()
    assert scan.main([str(tmp_path)]) == 2 and "FASTMIM_PROGRESS_S='soon'" in capsys.readouterr().err
    assert eval_main(["knn", "--random", "vit_tiny_patch16", "--data-path", str(tmp_path / "none")]) == 2
    assert "FASTMIM_PROGRESS_S='soon'" in capsys.readouterr().err


def test_a_notebook_keeps_the_bar(monkeypatch):
    """A Jupyter kernel's stream is no terminal, yet it redraws in place: the bar, not a line a minute."""
    monkeypatch.setenv("FASTMIM_PROGRESS_S", "3600")
    OutStream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})
    cell = OutStream()
    with progress_bar(stream=cell, total=3, mininterval=0) as bar:
        bar.update(3)
    assert cell.getvalue().count("\r") >= 2 and "|" in cell.getvalue()


def test_a_message_beside_a_bar_breaks_the_line_only_where_the_bar_is_redrawn_in_place():
    """A loader worker's "skipped: ..." starts on a new line on a terminal (the bar's line has no newline yet); in a
    log, whose progress lines end in one, it printed a blank line before every message."""
    assert line_break(Terminal()) == "\n"
    assert line_break(io.StringIO()) == ""
