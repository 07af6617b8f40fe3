"""JPEG decoding on the GPU without DALI (``--loader torch-gpu``): torchvision's nvJPEG decoder and fastmim's batched
resized crop, fed by ordinary DataLoader workers.

The workers read each file's bytes and its header (PIL, lazily: the size, not the pixels) and draw the sample's crop
box and flip exactly as ``pretrain_transform`` would for (seed, epoch, index) (``crop_and_flip``), then pack a
batch's JPEGs end to end into one uint8 tensor (one shared-memory transfer per batch, not one per image). The
training process decodes the batch with ``torchvision.io.decode_jpeg(device="cuda")`` (batched nvJPEG) and runs
``fastmim.ops.resized_crop`` (crop, antialiased bicubic or bilinear resize, flip, normalisation: two Triton
launches for the batch), in a background thread on its own CUDA stream, a batch or two ahead of the training step.

The same samples, crops and order as ``--loader torch`` for the same seed (the sampler and the crop draws are
shared); the pixels differ by decoder and resize rounding only. A file that is not a JPEG nvJPEG takes (PNG, CMYK)
goes through the CPU pipeline in its worker; a JPEG nvJPEG rejects is decoded on the CPU (PIL) in the training
process; one nothing can decode raises ``BadImageError`` naming it, or, with ``skip_bad``, is replaced by the
stand-in ``--loader torch`` would use (``replacement_index``), sent as ``-1 - j``.

On a CPU device the same code decodes with torchvision's CPU decoder (libjpeg-turbo): how the tests run it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import queue
import threading
import time
import warnings
from typing import NamedTuple

import torch

from fastmim.data.folder import BadImageError, decode_problem
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SIMPLE_CROP_PAD, crop_and_flip, crop_steps

STATS = ("batches", "cpu_fallbacks", "read_s", "decode_s", "augment_s", "wait_s")
# decoded images cropped per resized_crop call (it packs its inputs into one buffer: a bounded copy, not a batch of
# 4000x3000 photos twice over)
CROP_CHUNK_BYTES = 256 << 20
CLOSE_TIMEOUT_S = 10.0

# JPEGs in these PIL modes go to nvJPEG (grey ones come out as RGB, as PIL's convert("RGB") gives); CMYK / YCCK
# JPEGs and every other format are decoded by PIL in the loader worker
GPU_JPEG_MODES = ("RGB", "L")


@functools.cache
def _decode_jpeg():
    """torchvision's decode_jpeg and RGB mode. torchvision 0.29 deprecates its image decoders (for TorchCodec) and
    warns on every call: that warning is filtered out once, process-wide (``warnings.catch_warnings`` per call is not
    thread-safe, and the decoding runs in a background thread)."""
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")
    with warnings.catch_warnings():  # first call only, from whichever thread
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg, ImageReadMode.RGB


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decodes encoded JPEGs (1-D uint8 CPU tensors) to RGB uint8 [3, H, W] on ``device`` (nvJPEG on CUDA, batched).

    On CUDA the current stream is synchronised first: torchvision allocates the outputs on the current stream but
    nvJPEG writes them from its own stream without waiting for it, so memory freed by kernels still queued there
    could be overwritten under them."""
    decode, rgb = _decode_jpeg()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
        return decode(datas, mode=rgb, device=device)
    return [decode(d, mode=rgb) for d in datas]


@functools.cache
def _gpu_decode_problem(index: int) -> str | None:
    try:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 10, 30)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpegs([data], torch.device("cuda", index))
        if out[0].shape != (3, 8, 16) or out[0].device.type != "cuda":
            return f"torchvision's GPU decoder returned {tuple(out[0].shape)} on {out[0].device} for a 16x8 JPEG"
    except Exception as e:  # an old torchvision, one built without nvJPEG, a driver problem
        return f"torchvision cannot decode JPEGs on the GPU here ({type(e).__name__}: {str(e).strip()[:200]})"
    return None


def gpu_decode_problem(device: torch.device) -> str | None:
    """None when torchvision decodes JPEGs on ``device`` (a CUDA device), else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device (torchvision's nvJPEG decoder runs on a GPU)"
    return _gpu_decode_problem(device.index if device.index is not None else torch.cuda.current_device())


def _chunks(items: list, sizes: list[int], limit: int):
    """Consecutive runs of ``items`` whose ``sizes`` sum to at most ``limit`` (an item larger than it alone)."""
    run, total = [], 0
    for item, size in zip(items, sizes, strict=True):
        if run and total + size > limit:
            yield run
            run, total = [], 0
        run.append(item)
        total += size
    if run:
        yield run


def simple_crops(
    images: list[torch.Tensor],
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interp: str = "bilinear",
) -> torch.Tensor:
    """PixMIM's simple crop of decoded images ([3, H, W] uint8, on one device) where they are, image by image with
    torch ops (no fused kernel: a few launches per image): each resized to ``boxes[n]``'s (height, width) with PIL's
    antialiased filter (``interp``; the width first, each pass clamped to [0, 255] as PIL's 8-bit passes are),
    reflect-padded by ``SIMPLE_CROP_PAD``, its ``size`` x ``size`` window at (top, left) taken, mirrored where
    ``flips[n]``, normalised. The boxes are ``crop_and_flip``'s for the simple crop. Returns [N, 3, S, S] fp32."""
    import torch.nn.functional as F

    from fastmim.ops.reference import normalize_255

    out = torch.empty(len(images), 3, size, size, dtype=torch.float32, device=images[0].device if images else "cpu")
    for n, img in enumerate(images):
        top, left, h, w = (int(v) for v in boxes[n])
        x = img.to(torch.float32)[None]
        for shape in ((x.shape[2], w), (h, w)):  # PIL skips the pass of a side that keeps its length
            if tuple(x.shape[2:]) != shape:
                x = F.interpolate(x, size=shape, mode=interp, antialias=True, align_corners=False).clamp_(0, 255)
        x = F.pad(x, (SIMPLE_CROP_PAD,) * 4, mode="reflect")[0, :, top : top + size, left : left + size]
        out[n] = x.flip(-1) if bool(flips[n]) else x
    return normalize_255(out, mean, std)


SIMPLE_MAX_ASPECT = 32  # long / short side over which a simple-crop image is augmented in the worker (PIL)


class EncodedSample(NamedTuple):
    """A JPEG as the worker sends it: its bytes, the crop box (``crop_and_flip``'s: for the random-resized crop
    (top, left, height, width) in the image) and the flip."""

    data: torch.Tensor  # [nbytes] uint8
    box: tuple[int, int, int, int]
    flip: bool


class EncodedImages(torch.utils.data.Dataset):
    """Item i of an ``ImageFolderDataset`` (or ``TarShardDataset``) ``base`` with ``pretrain_transform``, still
    encoded: an ``EncodedSample`` for a JPEG nvJPEG takes, else ``base[i]`` (the CPU pipeline's tensor, the same crop).
    ``BadImageError`` naming the file when its header cannot be read. ``set_epoch`` goes to ``base``."""

    def __init__(self, base):
        if base.transform is None or base.seed is None:
            raise ValueError("EncodedImages needs a dataset with pretrain_transform and a seed")
        self.crop = crop_steps(base.transform)[0]  # raises for another transform
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int):
        from PIL import Image

        data = self.base.read_bytes(index)
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                fmt, mode = img.format, img.mode
                if fmt == "JPEG" and mode in GPU_JPEG_MODES and not self._too_long(img.size):
                    # its own generator, not the global one: with workers=0 this runs in the loader's thread,
                    # beside the training thread's draws (masks, drop path)
                    box, flip = crop_and_flip(self.base.transform, img, self.base.generator(index))
                    return EncodedSample(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip)
        except Exception as e:  # PIL raises several types for non-image data
            name = self.base.files[index]
            raise BadImageError(f"cannot read image {name!r}: {decode_problem(e, data)}", name) from e
        return self.base[index]  # not for nvJPEG: decoded and augmented here

    def _too_long(self, size: tuple[int, int]) -> bool:
        """The simple crop resizes the whole image before cutting its window: an image of an extreme aspect ratio
        (over SIMPLE_MAX_ASPECT) would hold gigabytes of fp32 on the GPU (224 x 672,000 for a 1 x 3,000 strip), so
        it is augmented here, by PIL, as the CPU pipeline does."""
        return self.crop == "simple" and max(size) > SIMPLE_MAX_ASPECT * max(min(size), 1)


class EncodedBatch(NamedTuple):
    """A batch from the workers: its JPEGs end to end and where each goes, and the samples already decoded."""

    data: torch.Tensor  # [total bytes] uint8: the JPEGs, end to end
    offsets: torch.Tensor  # [J + 1] int64: JPEG j is data[offsets[j]:offsets[j + 1]]
    positions: torch.Tensor  # [J] int64: JPEG j's place in the batch
    boxes: torch.Tensor  # [J, 4] int32: crop_and_flip's boxes (random-resized: (top, left, height, width) in the image)
    flips: torch.Tensor  # [J] bool
    done_positions: torch.Tensor  # [K] int64: the places of the samples decoded in the worker
    done: torch.Tensor  # [K, 3, S, S] fp32: those samples, augmented and normalised

    @property
    def size(self) -> int:
        """The batch's size (samples of either kind)."""
        return len(self.positions) + len(self.done_positions)


def collate_encoded(samples: list) -> EncodedBatch:
    """Packs a batch of ``EncodedImages`` items (``EncodedSample`` or finished tensors) into an ``EncodedBatch``."""
    jpegs = [(p, s) for p, s in enumerate(samples) if isinstance(s, EncodedSample)]
    done = [(p, s) for p, s in enumerate(samples) if not isinstance(s, EncodedSample)]
    sizes = torch.tensor([0] + [s.data.numel() for _, s in jpegs], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0)
    data = torch.cat([s.data for _, s in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8)
    return EncodedBatch(
        data=data,
        offsets=offsets,
        positions=torch.tensor([p for p, _ in jpegs], dtype=torch.int64),
        boxes=torch.tensor([s.box for _, s in jpegs], dtype=torch.int32).view(-1, 4),
        flips=torch.tensor([s.flip for _, s in jpegs], dtype=torch.bool),
        done_positions=torch.tensor([p for p, _ in done], dtype=torch.int64),
        done=torch.stack([s for _, s in done]) if done else torch.empty(0),
    )


class GpuDecodeLoader:
    """Decodes and augments the ``EncodedBatch``es of ``loader`` (``build_pretrain_loader`` over ``EncodedImages``)
    on ``device``: an iterable of ``(images [B, 3, S, S] fp32 on device, indices [B], *masks)`` like the torch
    loader's (indices of stand-ins as ``-1 - j``). ``len``, ``collate_fn`` and the sampler are the DataLoader's.

    Args:
        loader: the DataLoader of encoded batches.
        dataset: the ``ImageFolderDataset`` behind it (its CPU pipeline decodes what nvJPEG cannot).
        device: where to decode (CUDA: nvJPEG; CPU: libjpeg-turbo, for tests).
        img_size: output side S.
        skip_bad: replace an image nothing can decode by its stand-in (``replacement_index``) instead of raising.
        seed: the run's seed (stand-ins are a function of it).
        prefetch: batches decoded ahead in a background thread (0: decoded in the caller's thread, on demand).
        sync_timing: synchronise the device after decoding and after augmenting, so that ``stats`` attributes GPU
            time to each (for benchmarks: it removes some overlap).

    ``stats``: batches made, samples decoded by PIL after the decoder refused them, and seconds spent waiting for the
    workers (``read_s``: reading, header parsing, collation, the transfer), decoding (``decode_s``), augmenting
    (``augment_s``: the crops and the batch's assembly) and, in the consumer, waiting for a decoded batch
    (``wait_s``). Without ``sync_timing`` CUDA work is counted where the host waits for it.
    """

    def __init__(self, loader, dataset, device: torch.device, img_size: int, skip_bad: bool = False, seed: int = 0,
                 prefetch: int = 2, sync_timing: bool = False):  # fmt: skip
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the thread's set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        self.loader, self.dataset, self.device = loader, dataset, device
        self.img_size, self.skip_bad, self.seed, self.prefetch = img_size, skip_bad, seed, prefetch
        self.crop, self.interp, _ = crop_steps(dataset.transform)  # the CPU pipeline's crop and filter
        self.sync_timing = sync_timing and self.device.type == "cuda"
        self.stats = dict.fromkeys(STATS, 0)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def collate_fn(self):
        return self.loader.collate_fn

    # --- one batch ---
    def decode_batch(self, batch) -> tuple:
        """(images on the device, indices, *masks) of one ``(EncodedBatch, indices, *masks)``."""
        item, pending = self._decode_batch(batch)
        return self._finish(item, pending)

    def _decode_batch(self, batch) -> tuple[tuple, list[int]]:
        """The batch decoded and augmented on the device but for the samples no GPU decoder took: (the batch, their
        positions), finished by ``_finish`` in the consumer's thread (they need the process's random state)."""
        from fastmim.ops import resized_crop

        enc, idx, *rest = batch
        idx = idx.clone()
        s = self.img_size
        datas = [enc.data[int(a) : int(b)] for a, b in zip(enc.offsets[:-1], enc.offsets[1:], strict=True)]
        t0 = time.perf_counter()
        decoded, failed = self._decode(datas)
        self._sync()
        t1 = time.perf_counter()
        self.stats["decode_s"] += t1 - t0
        pending = [int(enc.positions[j]) for j in failed]
        keep = [j for j in range(len(datas)) if decoded[j] is not None]
        out = None  # the usual batch (every sample decoded here, one chunk) is resized_crop's own output
        if not keep or len(keep) < enc.size or sum(decoded[j].numel() for j in keep) > CROP_CHUNK_BYTES:
            out = torch.empty(enc.size, 3, s, s, dtype=torch.float32, device=self.device)
        augment = resized_crop if self.crop == "random-resized" else simple_crops
        for chunk in _chunks(keep, [decoded[j].numel() for j in keep], CROP_CHUNK_BYTES):
            sel = torch.tensor(chunk, dtype=torch.int64)
            crops = augment([decoded[j] for j in chunk], enc.boxes[sel], enc.flips[sel], s, IMAGENET_MEAN,
                            IMAGENET_STD, interp=self.interp)  # fmt: skip
            if out is None:
                out = crops
            else:
                out[enc.positions[sel].to(self.device)] = crops
            for j in chunk:  # the packed copy inside resized_crop and the decoded image: one chunk at a time
                decoded[j] = None
        if len(enc.done_positions):
            out[enc.done_positions.to(self.device)] = enc.done.to(self.device, non_blocking=True)
        self._sync()
        self.stats["augment_s"] += time.perf_counter() - t1
        return (out, idx, *rest), pending

    def _finish(self, item: tuple, pending: list[int]) -> tuple:
        """Decodes on the CPU (PIL, which reads more than the GPU decoders take) the samples at ``pending``, with the
        same crop, or puts their stand-ins there (``skip_bad``; a stand-in the worker already chose, sent as
        ``-1 - j``, is replaced by a stand-in of j, still sent as negative). Runs in the consumer's thread: the CPU
        pipeline seeds the process's CPU generator around each sample. The masks stay those drawn for the batch's
        original samples (the torch loader, deciding in the worker, draws a stand-in's for its own index)."""
        from fastmim.data import load_or_stand_in

        out, idx, *rest = item
        named = getattr(getattr(self.loader, "dataset", None), "named", None)  # (its workers' record: WithIndex)
        for pos in pending:
            sent = int(idx[pos])
            index = -1 - sent if sent < 0 else sent
            img, got = load_or_stand_in(self.dataset, index, self.skip_bad, self.seed, named)
            idx[pos] = -1 - got if sent < 0 and got >= 0 else got
            if torch.device(self.device).type == "cuda":  # (from pageable memory the copy would wait for the GPU)
                img = img.pin_memory()
            out[pos] = img.to(self.device, non_blocking=True)
            self.stats["cpu_fallbacks"] += 1
        return (out, idx, *rest)

    def _sync(self) -> None:
        if self.sync_timing:
            torch.cuda.current_stream(self.device).synchronize()

    def _batches(self):
        """The DataLoader's batches, the wait for each counted."""
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.stats["read_s"] += time.perf_counter() - t0
            yield batch

    def _decode(self, datas: list[torch.Tensor]) -> tuple[list, list[int]]:
        """(decoded images, the positions none came back for): the batch at once, else (an error in it: the batched
        call returns nothing) one at a time."""
        if not datas:
            return [], []
        try:
            return decode_jpegs(datas, self.device), []
        except RuntimeError:
            pass
        decoded, failed = [], []
        for j, d in enumerate(datas):
            try:
                decoded.append(decode_jpegs([d], self.device)[0])
            except RuntimeError:
                decoded.append(None)
                failed.append(j)
        return decoded, failed

    # --- the epoch ---
    def __iter__(self):
        if self.prefetch <= 0:
            for batch in self._batches():
                out = self.decode_batch(batch)
                self.stats["batches"] += 1
                yield out
            return
        yield from self._prefetched()

    def _prefetched(self):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        end = object()
        cuda = self.device.type == "cuda"

        def produce():
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device) if cuda else None
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for batch in self._batches():
                        out = self._decode_batch(batch)
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                        while not stop.is_set():
                            try:
                                q.put((out, event), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                q.put((end, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                q.put((e, None))

        thread = threading.Thread(target=produce, name="fastmim-gpu-decode", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item, event = q.get()
                self.stats["wait_s"] += time.perf_counter() - t0
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, pending = item
                if cuda:  # the batch was made on the decode stream: the training stream waits for it, and its
                    # memory is not reused before the training stream is done with it
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    batch[0].record_stream(current)
                self.stats["batches"] += 1
                yield self._finish(batch, pending) if pending else batch
        finally:
            stop.set()
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while thread.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
            # past the deadline (a worker stuck reading, say) the daemon thread is left behind: it stops at its next
            # batch, and the process can exit without it
