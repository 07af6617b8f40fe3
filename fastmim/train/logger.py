"""Metrics to JSONL (and TensorBoard when installed) on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, row: dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), "step": step, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("time", "step", "epoch") and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
