"""``training.png`` in a run directory: the training loss and, with ``--eval-data``, the kNN top-1 over the steps,
read from ``metrics.jsonl`` (drawn with Pillow: no plotting library needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 520, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 40


def read_series(metrics: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every finite ``key`` in a metrics.jsonl, by step. A resumed run logs again from its checkpoint:
    a row whose step is below the one before it starts over from there, so the earlier rows from that step on are
    dropped (the steps a stopped run logged after its checkpoint, or, after a resume on another number of processes,
    whose steps are counted in other units, the old run's later steps); within a run a later row of a step wins.
    Unreadable lines (a line cut by a crash) are skipped."""
    by_step: dict[int, float] = {}
    try:
        lines = Path(metrics).read_text().splitlines()
    except FileNotFoundError:
        return []
    last = None
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if last is not None and step < last:  # a resume: its rows replace the earlier run's from this step on
            by_step = {s: v for s, v in by_step.items() if s < step}
        last = step
        try:
            value = float(row[key])
        except (ValueError, KeyError, TypeError):
            continue
        if math.isfinite(value):
            by_step[step] = value
    return sorted(by_step.items())


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _label(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def _panel(title: str, series: list[tuple[int, float]], colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = LEFT, TOP, PANEL_W - RIGHT, PANEL_H - BOTTOM
    d.text((LEFT, 10), title, fill="black", font=font)
    d.rectangle((x0, y0, x1, y1), outline=(90, 90, 90))
    steps, values = [s for s, _ in series], [v for _, v in series]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = min(values), max(values)
    pad = (v_hi - v_lo) * 0.05 or abs(v_hi) * 0.05 or 1.0
    v_lo, v_hi = v_lo - pad, v_hi + pad
    s_span = (s_hi - s_lo) or 1

    def xy(s: float, v: float) -> tuple[float, float]:
        return x0 + (s - s_lo) / s_span * (x1 - x0), y1 - (v - v_lo) / (v_hi - v_lo) * (y1 - y0)

    for v in _ticks(v_lo, v_hi):
        y = xy(s_lo, v)[1]
        d.line((x0, y, x1, y), fill=(225, 225, 225))
        d.text((4, y - 6), _label(v), fill="black", font=font)
    for s in _ticks(s_lo, s_hi) if s_hi > s_lo else [s_lo]:
        x = xy(s, v_lo)[0]
        d.line((x, y1, x, y1 + 4), fill="black")
        d.text((x - 12, y1 + 8), _label(round(s)), fill="black", font=font)
    d.text(((x0 + x1) // 2 - 12, PANEL_H - 16), "step", fill="black", font=font)
    points = [xy(s, v) for s, v in series]
    if len(points) > 1:
        d.line(points, fill=colour, width=2)
    if len(points) <= 60:  # evaluations: each one marked
        for x, y in points:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    last_s, last_v = series[-1]
    d.text((x1 - 150, 10), f"last: {_label(last_v)} @ {last_s}", fill=colour, font=font)
    return img


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    """Draws loss (and kNN top-1 when logged) against the step into ``out`` (PNG, written atomically); None when the
    metrics hold neither."""
    from fastmim.train.checkpoint import atomic_write

    panels = [(title, series, colour) for title, series, colour in (
        ("training loss", read_series(metrics, "loss"), (31, 119, 180)),
        ("kNN top-1 (%)", read_series(metrics, "knn_top1"), (214, 39, 40)),
    ) if series]  # fmt: skip
    if not panels:
        return None
    canvas = Image.new("RGB", (PANEL_W * len(panels), PANEL_H), "white")
    for i, (title, series, colour) in enumerate(panels):
        canvas.paste(_panel(title, series, colour), (PANEL_W * i, 0))
    out = Path(out)
    atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out
