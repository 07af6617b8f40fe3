"""Progress bars that suit where stderr goes: tqdm's bar redrawn in place on a terminal; into a log file or a pipe
(a Slurm job's output, ``nohup``, ``| tee``), a plain line every ``FASTMIM_PROGRESS_S`` seconds (60 by default) with
the same counts, rate, time left and figures, instead of a redraw every second joined by carriage returns into one
line that grows by megabytes over a run."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 60.0  # a log file's progress line at most this often (FASTMIM_PROGRESS_S overrides)
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def check_progress_setting() -> None:
    """Raises ``ValueError`` naming a bad ``FASTMIM_PROGRESS_S``: a command calls it at its start, so that the value
    is refused before any work (the first progress bar, after the model's build, found it late, and on rank 0 only),
    whether or not stderr is a terminal."""
    _interval()


def _interval() -> float:
    raw = os.environ.get("FASTMIM_PROGRESS_S", "")
    try:
        value = float(raw) if raw.strip() else LOG_INTERVAL_S
    except ValueError:
        raise ValueError(f"FASTMIM_PROGRESS_S={raw!r}: expected seconds between progress lines in a log") from None
    if not value >= 0:  # (NaN too)
        raise ValueError(f"FASTMIM_PROGRESS_S={raw!r}: expected seconds (0 or more) between progress lines in a log")
    return value


class _Lines:
    """A stream for tqdm that writes each state it draws as a line of its own: the carriage return before it and the
    padding after it dropped; an empty one (a bar cleared) and one with the same count and figures as the last (the
    redraw at close, only its times later) left out."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        count, _, times = line.partition(" [")  # "{desc}: {n}/{total}", "{elapsed}<{remaining}, {rate}{postfix}]"
        state = (count, times.split(", ", 2)[2:])  # the figures after the times: a changed loss is shown
        if line and state != self.last:
            self.stream.write(line + "\n")
            self.last = state

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # (no isatty; a closed stream)
        return False


def _notebook(stream) -> bool:
    """A Jupyter kernel's output stream (not a terminal, yet it redraws a carriage return in place)."""
    return type(stream).__module__.split(".")[0] == "ipykernel"


def line_break(stream=None) -> str:
    """What starts a message on a line of its own beside a progress bar on ``stream`` (stderr by default): a newline
    where the bar is redrawn in place (a terminal, a notebook: the bar's line has no newline yet), none in a log,
    whose progress lines end in one (there it printed a blank line before every message)."""
    stream = sys.stderr if stream is None else stream
    return "\n" if _is_terminal(stream) or _notebook(stream) else ""


def progress_bar(*, stream=None, **kwargs) -> tqdm:
    """``tqdm(**kwargs)`` on ``stream`` (stderr by default): as asked on a terminal (or in a notebook); elsewhere in
    lines, one at most every ``FASTMIM_PROGRESS_S`` seconds (and, for a bar that stays, ``leave=True``, its last state
    at close)."""
    stream = sys.stderr if stream is None else stream
    if kwargs.get("disable") or _is_terminal(stream) or _notebook(stream):
        return tqdm(file=stream, **kwargs)
    every = _interval()
    kwargs.update(file=_Lines(stream), mininterval=every, maxinterval=max(every, 10.0), bar_format=LINE_FORMAT,
                  dynamic_ncols=False, ncols=None, ascii=True)  # fmt: skip
    return tqdm(**kwargs)
