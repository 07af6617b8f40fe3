"""Preemption: SIGTERM or SIGUSR1 (what Slurm and other schedulers send before they stop a job) ends the run at the
next step boundary, with a checkpoint of that step, and the process exits with ``REQUEUE_EXIT`` (75, sysexits'
EX_TEMPFAIL: "try again"), which a job script can map to a requeue.

The handler only records the signal: the step in flight finishes, the trainer saves (atomically, as every save), and
a second signal while it saves changes nothing. Under DDP every rank must stop at the same step even if the signal
reaches them at different times: at each step boundary the ranks take the maximum of their flags over a gloo group
(CPU, so the check never waits for the GPU's queue).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from fastmim.train.distributed import DistInfo

REQUEUE_EXIT = 75  # EX_TEMPFAIL
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing ``step``."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"{signame}: checkpointed at step {step}; resume with --resume to continue")
        self.step, self.signame = step, signame


class PreemptionWatch:
    """Records SIGTERM / SIGUSR1 from ``install()`` to ``close()`` (which restores the previous handlers)."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.signame: str | None = None
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> PreemptionWatch:
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set from there
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        if self.info.enabled:
            gloo = dist.get_backend() == "gloo"
            self._group = None if gloo else dist.new_group(backend="gloo")  # a CPU group for the flag
        return self

    def _record(self, signum, frame) -> None:
        if self.signame is None:
            self.signame = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any rank got a signal (a collective under DDP: every rank calls it at the same step)."""
        flag = self.any_rank(self.signame is not None)
        if flag and self.signame is None:
            self.signame = "a signal on another rank"
        return flag

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: a collective over the CPU (gloo) group under DDP, so it never waits
        for the GPU's queue; ``flag`` itself in one process."""
        if not self.info.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return bool(int(t))

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (pickled; a collective over the CPU group under DDP)."""
        if not self.info.enabled:
            return [obj]
        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
