"""One process at a time in a run folder: an exclusive ``flock`` on ``FOLDER/.fastmim.lock``, held while a run (rank
0 of it) writes there. Two runs started in one folder, or a requeued job started while the old one still drains,
would otherwise both write its checkpoint, config and metrics: the second is refused, naming the first.

The kernel drops the lock when its process ends, however it ends (``kill -9`` included), so a lock is never stale
(forked loader workers close their copy of it at once: they can outlive a killed trainer by seconds).
The file holds who took it (pid, host, time), read for the refusal's message; it is removed on release. On a file
system without locks (some network mounts) the run goes on unlocked, with a note.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # (Windows: no flock; runs go unlocked)
    fcntl = None

LOCK_NAME = ".fastmim.lock"
_HELD: list[RunLock] = []  # this process's locks: a forked child (a loader worker) closes its copies of them


def _close_in_child() -> None:
    # a flock belongs to the open file, which a fork shares: workers that outlive a killed trainer (kill -9) would
    # keep the folder locked until they end; closing a copy leaves the parent's lock held
    for lock in _HELD:
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """``lock = RunLock(folder); problem = lock.acquire()`` (None, or why not: another process holds it);
    ``lock.release()`` when the run is done with the folder; ``held``: whether it holds it (not on a file system
    without locks)."""

    def __init__(self, folder: str | Path, what: str = "a fastmim run"):
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> str | None:
        if fcntl is None or self.fd is not None:
            return None
        for _ in range(3):  # (the file was replaced between our open and our lock: lock the new one)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:  # (said on every rank, not raised on rank 0 alone)
                return f"cannot write in {self.path.parent}: {e.strerror}"
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                return (f"{self.path.parent} is in use: {holder} is writing in it (two processes would overwrite each "
                        f"other's checkpoint and metrics); wait for it to end, or choose another folder")  # fmt: skip
            except OSError as e:  # no locks on this file system: unlocked
                os.close(fd)
                print(f"note: cannot lock {self.path.parent} ({e.strerror}); a second run started in it would not be "
                      "refused", flush=True)  # fmt: skip
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                _HELD.append(self)
                os.ftruncate(fd, 0)
                stamp = f"{self.what} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})"
                os.pwrite(fd, stamp.encode(), 0)
                return None
            os.close(fd)  # its holder removed it on release: try the file now there
        return f"{self.path} keeps being replaced by another process: is another run starting in this folder?"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # (while still held: a process that opens it next makes a new one)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self in _HELD:
            _HELD.remove(self)

    @property
    def held(self) -> bool:
        return self.fd is not None
