"""Data: image folders, the built-in sample photos, MAE's augmentation, resumable sampling."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading

import torch

from fastmim.data.folder import BadImageError, ImageFolderDataset, list_images, usable_cpus
from fastmim.data.sampler import ResumableDistributedSampler
from fastmim.data.samples import default_dataset_path
from fastmim.data.transforms import denormalize, eval_transform, pretrain_transform

__all__ = [
    "ImageFolderDataset",
    "ResumableDistributedSampler",
    "build_pretrain_loader",
    "default_dataset_path",
    "denormalize",
    "eval_transform",
    "list_images",
    "pretrain_transform",
    "usable_cpus",
]


def default_num_workers(local_world_size: int = 1) -> int:
    return max(1, min(8, usable_cpus() // max(1, local_world_size) - 1))


SKIP_TRIES = 64  # replacements tried for one unreadable sample before giving up


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of ``x``."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def replacement_index(index: int, k: int, n: int, seed: int = 0) -> int:
    """The k-th (k >= 1) stand-in for sample ``index`` of ``n``: a fixed function of (seed, index, k) spread over the
    whole data set whatever ``n`` (a hash, not a stride: a stride sharing a factor with ``n`` had reached one sample
    in 69), never the sample itself."""
    j = _mix64(_mix64(_mix64(seed & ((1 << 64) - 1)) ^ index) ^ k) % n
    return j if j != index else (j + 1) % n


def decode_indices(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A batch's indices from ``WithIndex`` -> (the dataset indices of the samples in it, how many stand in for an
    unreadable one): a stand-in for sample i is sent as -1 - j, j its own index."""
    stand_ins = idx < 0
    n = int(stand_ins.sum())
    return (torch.where(stand_ins, -1 - idx, idx) if n else idx), n


class WithIndex(torch.utils.data.Dataset):
    """``dataset[i]`` as ``(dataset[i], i)``: the loader's batches carry their dataset indices, from which the
    trainer draws each sample's mask (a pure function of seed, epoch and index).

    ``skip_bad``: an unreadable sample (``BadImageError``) is replaced by ``replacement_index(i, 1, ...)`` (then 2,
    ...: a fixed choice, the same in every run) and sent as ``(dataset[j], -1 - j)``; ``decode_indices`` turns that
    back into j and counts it."""

    def __init__(self, dataset: torch.utils.data.Dataset, skip_bad: bool = False, seed: int = 0):
        self.dataset, self.skip_bad, self.seed = dataset, skip_bad, seed
        self.named = NamedOnce(len(dataset)) if skip_bad else None  # (each unreadable file named once, not per epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return load_or_stand_in(self.dataset, index, self.skip_bad, self.seed, self.named)


class NamedOnce:
    """Which of ``n`` samples were already named as unreadable, shared by the process and its loader workers (one
    shared-memory byte each, made before the workers start): each file is named once per run and process, not again
    in every epoch that reads it (1.28M samples: 1.3 MB)."""

    def __init__(self, n: int):
        self.flags = torch.zeros(n, dtype=torch.uint8).share_memory_()

    def first(self, index: int) -> bool:
        """Whether ``index`` is named now for the first time (two workers meeting it at once may both say so)."""
        if self.flags[index]:
            return False
        self.flags[index] = 1
        return True


def load_or_stand_in(dataset, index: int, skip_bad: bool, seed: int = 0, named: NamedOnce | None = None):
    """``(dataset[index], index)``; when that raises ``BadImageError`` and ``skip_bad``, ``(dataset[j], -1 - j)`` for
    the first readable stand-in ``j = replacement_index(index, k, ...)``, k = 1, 2, ... (a fixed choice). The file is
    named on stderr, only the first time when ``named`` is given."""
    try:
        return dataset[index], index
    except BadImageError as first:
        if not skip_bad:
            raise
        n = len(dataset)
        tried = set()
        for k in range(1, SKIP_TRIES + 1):
            j = replacement_index(index, k, n, seed)
            if j in tried or j == index:  # (a data set of one image has nothing to stand in)
                continue
            tried.add(j)
            try:
                item = dataset[j], -1 - j
            except BadImageError:
                continue
            # named where it happens (a loader worker): the run's count in metrics.jsonl does not say which files
            # (on a line of its own: the training process's progress bar holds the current one, without a newline)
            if named is None or named.first(index):
                from fastmim.train.progress import line_break

                print(f"{line_break()}skipped: {first.summary()}; sample {j} stands in for it (--skip-bad-files" + (
                    "; named once" if named is not None else "") + ")", file=sys.stderr, flush=True)  # fmt: skip
            return item
        raise BadImageError(f"{first.summary()} (and the {len(tried)} other samples tried in its place cannot be read "
                            "either)") from first  # fmt: skip


class MaskCollate:
    """Collates ``(image, index)`` pairs into ``(images, indices, masks)`` (plus the target blocks of a multi-block
    strategy; no masks when ``strategy`` is None), the images put together by ``images`` (stacked by default), the
    masks drawn in the loader worker by a CPU mask strategy (the C++ generators: a batch of 256 BEiT block masks takes
    about 0.3 ms on one core, instead of tens of kernel launches per round on the GPU). ``set_epoch`` before each
    epoch's iterator, as for the dataset."""

    def __init__(self, strategy, images=torch.utils.data.default_collate):
        self.strategy, self.images = strategy, images
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch: list):
        imgs = self.images([img for img, _ in batch])
        idx = torch.tensor([i for _, i in batch], dtype=torch.int64)
        if self.strategy is None:
            return imgs, idx
        masks = self.strategy(indices=decode_indices(idx)[0], epoch=self.epoch, device="cpu")
        return (imgs, idx, masks.mask) if masks.targets is None else (imgs, idx, masks.mask, masks.targets)


# (SIGINT and SIGHUP too: Ctrl-C, or a closed terminal, reaches the whole foreground process group, workers included,
# while the trainer stops at its step boundary with a checkpoint, fastmim.train.preempt)
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                 getattr(signal, "SIGINT", None), getattr(signal, "SIGHUP", None))
                     if s is not None)  # fmt: skip


def _all_threads_block(signals) -> bool:
    """Whether every thread of this process, native ones included, has ``signals`` blocked (Linux: /proc); where that
    cannot be read, whether this is the only (Python) thread."""
    bits = sum(1 << (int(s) - 1) for s in signals)
    try:
        tasks = os.listdir("/proc/self/task")
        masks = []
        for t in tasks:
            with open(f"/proc/self/task/{t}/status") as f:
                masks += [int(line.split()[1], 16) for line in f if line.startswith("SigBlk:")]
    except (OSError, ValueError, IndexError):
        return threading.active_count() == 1
    return len(masks) == len(tasks) and all(m & bits == bits for m in masks)


def ignore_stop_signals(_worker_id: int = 0, trainer: int | None = None) -> None:
    """A loader worker's init: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) from anyone but the training process (``trainer``,
    its pid; the worker's parent when None) are left to the training process, which finishes its step, checkpoints it
    and exits (``fastmim.train.preempt``). A scheduler (Slurm's preemption, scancel) signals every process of the job: a
    worker killed by the signal would end the run before its checkpoint (PyTorch's loader raises its death in the
    training process wherever that is, a checkpoint's save included). The training process's own SIGTERM (PyTorch's
    loader, or multiprocessing at exit, ending its workers) still ends the worker, as it must, or the worker would
    outlive the run; so does any signal once the worker's parent is gone.

    The signals are blocked in the worker's threads and taken by one thread with ``sigwaitinfo``, which says who sent
    each. A worker started by fork has one thread here, and so has one forked by a fork server (Python 3.14's
    default) that imported torch before (``ShieldedLoader`` starts it so); one started by spawn runs torch's native
    threads already, which have the signals blocked when it was started with them blocked (``ShieldedLoader``: a
    blocked mask survives exec). Where some thread could still take a signal (a fork server started elsewhere without
    torch, or no sigwaitinfo) the worker keeps the default behaviour."""
    if not STOP_SIGNALS or not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    trainer = parent if trainer is None else trainer
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by every thread started from now on
    if not _all_threads_block(STOP_SIGNALS):  # one of them would take the signal: the default behaviour
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)  # (PyTorch's worker handler would end the worker on a non-parent signal)

    def take() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_pid in (trainer, parent) or os.getppid() != parent:  # ended by the run (or orphaned)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [info.si_signo])
                signal.pthread_kill(threading.get_ident(), info.si_signo)  # the default action: the worker ends

    threading.Thread(target=take, name="fastmim-stop-signals", daemon=True).start()


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGTERM and SIGUSR1 blocked in this thread for the block (a signal that comes meanwhile waits, then is handled
    as usual): the processes it starts (loader workers by spawn, a fork server) begin with them blocked."""
    if not STOP_SIGNALS or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _ShieldedInit:
    """A worker_init_fn: ``ignore_stop_signals`` (for the training process ``trainer``), then the user's own."""

    def __init__(self, trainer: int, then=None):
        self.trainer, self.then = trainer, then

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id, self.trainer)
        if self.then is not None:
            self.then(worker_id)


class ShieldedLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers survive the scheduler's SIGTERM / SIGUSR1 to the whole job, whatever the
    multiprocessing start method (``ignore_stop_signals``, run before any ``worker_init_fn`` given): they start with
    the signals blocked, so that their native threads have them blocked too."""

    def __init__(self, *args, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=_ShieldedInit(os.getpid(), worker_init_fn), **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        ctx = self.multiprocessing_context or multiprocessing.get_context()
        method = ctx.get_start_method()
        if method != "fork":
            # multiprocessing's resource tracker, started with the first spawned process, unblocks SIGTERM in the
            # starting thread once it runs: it must be running before the block
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        if method == "forkserver":  # not blocked: the fork server would pass the block on to every process it forks
            _start_forkserver_with_torch()
            return super()._get_iterator()
        with stop_signals_blocked():  # spawn: the block survives exec, into the worker's native threads
            return super()._get_iterator()


def _start_forkserver_with_torch() -> None:
    """Starts multiprocessing's fork server with torch imported in it (unless it runs already): its children, loader
    workers among them, then begin with a single thread, which ``ignore_stop_signals`` needs (a worker that imports
    torch itself starts torch's native threads before its init can block the signals)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is not None:
        return  # (not this Python's fork server, or running: its children are as they are)
    preload = list(getattr(server, "_preload_modules", ["__main__"]))
    if "torch" not in preload:
        forkserver.set_forkserver_preload([*preload, "torch"])
    forkserver.ensure_running()


def build_pretrain_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
    masks=None,
    skip_bad: bool = False,
    collate_images=None,
) -> tuple[torch.utils.data.DataLoader, ResumableDistributedSampler]:
    """A drop-last loader over a resumable, sharded sampler, yielding (images, dataset indices), plus each sample's
    mask when a CPU mask strategy ``masks`` is given (``MaskCollate``); ``skip_bad``: unreadable samples replaced
    (``WithIndex``); ``collate_images``: how a batch's images are put together (default: stacked); raises if the
    data cannot fill one global batch."""
    if len(dataset) < batch_size * world_size:
        raise ValueError(
            f"the dataset has {len(dataset)} image{'' if len(dataset) == 1 else 's'}, fewer than one global batch "
            f"({batch_size} per device x {world_size} devices): lower --batch-size or add images"
        )
    sampler = ResumableDistributedSampler(len(dataset), world_size, rank, seed=seed)
    loader = ShieldedLoader(
        WithIndex(dataset, skip_bad, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        # its own generator: creating an iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        collate_fn=(
            MaskCollate(masks, collate_images or torch.utils.data.default_collate)
            if masks is not None or collate_images is not None
            else None
        ),
    )
    return loader, sampler
