"""Preemption: SIGTERM or SIGUSR1 (what Slurm and other schedulers send before they stop a job) ends the run at the
next step boundary, with a checkpoint of that step, and the process exits with ``REQUEUE_EXIT`` (75, sysexits'
EX_TEMPFAIL: "try again"), which a job script can map to a requeue. Ctrl-C (SIGINT, where Python's own handler is in
place) does the same during training, exiting with 130; a second Ctrl-C stops at once (the last checkpoint stays).
So does a closed terminal (SIGHUP, where not ignored as nohup does: an ssh session that dropped), exiting with 129.

The handler only records the signal: the step in flight finishes, the trainer saves (atomically, as every save), and
a second signal while it saves changes nothing. Under DDP every rank must stop at the same step even if the signal
reaches them at different times: at each step boundary the ranks take the maximum of their flags over a gloo group
(CPU, so the check never waits for the GPU's queue).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import sys
import threading

import torch
import torch.distributed as dist

from fastmim.train.distributed import DistInfo

REQUEUE_EXIT = 75  # EX_TEMPFAIL
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


INTERRUPT_EXIT = 130  # Ctrl-C's, as a shell reports it (128 + SIGINT): not a requeue
TERMINAL_EXIT = {"SIGINT": INTERRUPT_EXIT, "SIGHUP": 129}  # a terminal's signals (128 + N): not a requeue


class Preempted(Exception):
    """The run stopped on a signal after checkpointing ``step``."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"{signame}: checkpointed at step {step}; resume with --resume to continue")
        self.step, self.signame = step, signame

    @property
    def exit_status(self) -> int:
        return exit_status(self.signame)


def exit_status(signame: str | None) -> int:
    """The status of a process stopped on ``signame``: 130 for a Ctrl-C, 129 for a closed terminal, else a requeue's
    75."""
    return TERMINAL_EXIT.get(signame, REQUEUE_EXIT)


class StopRequested(BaseException):
    """SIGTERM or SIGUSR1 outside the training loop (while the run starts: listing files, loading a checkpoint; or
    after its last save): there is no step to checkpoint, the last checkpoint is intact. A BaseException, so that
    the ``except Exception`` of the code it interrupts (a checkpoint's reading, an optional import) does not take it
    for that code's own failure."""


_pending: list[str] = []  # a stop signal taken outside training, in case an ``except BaseException`` swallowed it
_finished: list[bool] = []  # set by training_finished(): a stop signal then changes nothing


def training_finished() -> None:
    """The run trained to its end (and saved), or stopped on a signal after its save: a stop signal from now on is
    ignored, so that the process exits 0 and a job script does not requeue finished work, or exits with the first
    stop's status and message."""
    _finished.append(True)


@contextlib.contextmanager
def stop_outside_training():
    """SIGTERM / SIGUSR1 raise ``StopRequested`` while this is active, so that the CLI exits with ``REQUEUE_EXIT``
    whenever a stop signal comes (the default action would end the process with 143 or 138, which a job script's
    requeue rule does not recognise). The trainer's ``PreemptionWatch`` replaces these handlers while it trains."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if _finished:
            return
        name = signal.Signals(signum).name
        _pending.append(name)  # read by PreemptionWatch.install: the training loop then stops at its first step
        raise StopRequested(name)

    _pending.clear()
    _finished.clear()
    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    try:
        yield
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # no signal between the restores
        try:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            _pending.clear()  # (a later run in this process, outside the CLI, starts without it)
            _finished.clear()


def exit_on_stop_signals(status: int) -> int:
    """Returns ``status``, the one a CLI that stopped on a signal exits with; until the process ends, a stop signal
    ends it at once with that status. Under torchrun, the agent sends SIGTERM to every rank as soon as one exits: a
    rank still tearing down (its process group, loader workers) died of it with -15 instead of the requeue status."""
    if threading.current_thread() is not threading.main_thread():
        return status

    def leave(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    for sig in SIGNALS:
        signal.signal(sig, leave)
    return status


def stopped_status(status: int, argv: list[str] | None) -> int:
    """The status a CLI's ``main(argv)`` returns when a signal stopped it; when it runs as the command (``argv``
    None: not a caller's in-process run), a stop signal while the process tears down also ends it with that status
    (``exit_on_stop_signals``)."""
    return exit_on_stop_signals(status) if argv is None else status


def _gone_with_terminal(fd: int) -> bool:
    """Whether writes to ``fd`` fail once the terminal closes: the terminal itself (EIO), or a pipe (`| tee log`: its
    reader gets the hang-up too, EPIPE). A file keeps taking them."""
    try:
        return os.isatty(fd) or stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _say(text: str) -> None:
    """To stderr from a signal handler: a raw write (no print to re-enter), and nothing if stderr is gone (a pipe whose
    reader the same Ctrl-C ended: `| tee log`)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _to_devnull(fds: list[int]) -> None:
    """Points each of ``fds`` at /dev/null (output whose terminal or pipe reader is gone)."""
    if fds:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in fds:
            os.dup2(null, fd)
        os.close(null)


class _OutputGuard:
    """sys.stdout / sys.stderr over a terminal or a pipe, where SIGHUP is ignored (``&`` then ``disown``, nohup with
    ``| tee``): the run outlives the terminal, but its next print failed (EIO on the gone terminal, EPIPE on a pipe
    whose reader went with it) and ended it before its next save. The first such failure sends the descriptor to
    /dev/null, and the run goes on."""

    def __init__(self, stream, fd: int):
        self._stream, self._fd = stream, fd

    def _gone(self, e: OSError) -> bool:
        if e.errno not in (errno.EIO, errno.EPIPE):
            return False
        _to_devnull([self._fd])
        with contextlib.suppress(OSError, ValueError):  # (what was buffered goes to /dev/null)
            self._stream.flush()
        return True

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            if not self._gone(e):
                raise
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            if not self._gone(e):
                raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_output() -> None:
    """A command's sys.stdout and sys.stderr, where they are a terminal or a pipe, in an ``_OutputGuard`` for the rest
    of the process (the CLIs call it first)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        with contextlib.suppress(AttributeError, OSError, ValueError):  # (a stream without a descriptor: as it is)
            if not isinstance(stream, _OutputGuard) and stream.fileno() == fd and _gone_with_terminal(fd):
                setattr(sys, name, _OutputGuard(stream, fd))


class PreemptionWatch:
    """Records SIGTERM / SIGUSR1 (and SIGINT, SIGHUP) from ``install()`` to ``close()`` (which restores the previous
    handlers)."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.signame: str | None = None
        self.saving = False  # set while a checkpoint is written: a second Ctrl-C then waits for it (``saving_now``)
        self._ttys: list[int] = []  # stdout / stderr when they are a terminal (``_hangup``)
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> PreemptionWatch:
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set from there
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not where ignored: a script's & job)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        hup = getattr(signal, "SIGHUP", None)
        if hup is not None and signal.getsignal(hup) == signal.SIG_DFL:  # (not where ignored: nohup)
            self._ttys = [fd for fd in (1, 2) if _gone_with_terminal(fd)]  # (asked now: a hung-up one no longer
            # answers)
            self._previous[hup] = signal.signal(hup, self._hangup)
        if _pending and self.signame is None:  # a stop that came while the run started and was not acted on
            self.signame = _pending[0]
        if self.info.enabled:
            gloo = dist.get_backend() == "gloo"
            self._group = None if gloo else dist.new_group(backend="gloo")  # a CPU group for the flag
        return self

    def _record(self, signum, frame) -> None:
        if self.signame is None:
            self.signame = signal.Signals(signum).name

    def _interrupt(self, signum, frame) -> None:
        """Ctrl-C: the first one stops the run at the next step boundary with a checkpoint (said at once: os.write,
        which cannot re-enter a print the signal interrupted); another one stops it at once, unless a checkpoint is
        being written (a checkpoint and its encoder file are written as a pair): then right after it."""
        if self.signame is not None and not self.saving:
            raise KeyboardInterrupt
        first = self.signame is None
        self.signame = self.signame or "SIGINT"
        if first:
            _say("\nCtrl-C: stopping after the step in flight, with a checkpoint of it (Ctrl-C again: stop now, from "
                 "the last checkpoint)\n")  # fmt: skip
        else:
            _say("\nCtrl-C: a checkpoint is being written; the run stops right after it\n")

    def _hangup(self, signum, frame) -> None:
        """The terminal closed (an ssh session dropped): stop at the next step boundary with a checkpoint, as a first
        Ctrl-C does. What is printed from now on would fail on the gone terminal (EIO), or on a pipe whose reader
        went with it (EPIPE), and end the run before its save, so stdout and stderr that were either go to
        /dev/null."""
        _to_devnull(self._ttys)
        self._ttys = []
        self.signame = self.signame or "SIGHUP"

    @contextlib.contextmanager
    def saving_now(self):
        """While a checkpoint is written, a second Ctrl-C does not interrupt it."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def requested(self) -> bool:
        """Whether any rank got a signal (a collective under DDP: every rank calls it at the same step). Once one did,
        the ranks agree on which: a scheduler's SIGTERM / SIGUSR1 over a Ctrl-C, so that every rank exits with the same
        status (75, a requeue, or 130)."""
        flag = self.any_rank(self.signame is not None)
        if flag and self.info.enabled:
            names = [n for n in self.gather(self.signame) if n is not None]
            scheduler = [n for n in names if n not in TERMINAL_EXIT]
            agreed = (scheduler or names or [None])[0]
            self.signame = agreed if agreed is not None else "a signal on another rank"  # (the same on every rank)
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
