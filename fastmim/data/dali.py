"""An NVIDIA DALI loader for pretraining: JPEG decoding on the GPU (nvJPEG, ``device="mixed"``) or on CPU threads.

Reader (``fn.readers.file`` over a file list, or ``fn.readers.webdataset`` over tar shards) -> decode with MAE's
random-resized crop (``fn.decoders.image_random_crop``: area 0.2-1.0 of the image, aspect 3/4-4/3) -> resize to
``img_size`` (antialiased; bicubic, or linear when shrinking on CPU threads: ``interp``; or bilinear:
``crop_interp``) -> random horizontal flip -> ImageNet normalisation -> CHW float32, each batch with the samples'
dataset indices (masks are drawn from (seed, epoch, index)). Or PixMIM's simple crop (``crop="simple"``,
``_simple_crop``): decode, resize the short side, reflect-pad, a random square window.

``DaliLoader`` stands in for the trainer's (DataLoader, sampler) pair: ``len()`` batches per epoch and rank, an
iterator of ``(images, indices)`` per epoch, ``set_epoch``, and ``state_dict`` / ``load_state_dict`` carrying DALI's
pipeline checkpoint (reader position and every random generator), so a resumed run continues mid-epoch with exactly
the batches it would have seen.

Sharding: the file list (shuffled once with the run's seed, cut to a multiple of ``world_size``) is split by DALI's
reader into ``world_size`` disjoint shards of equal length (DALI shuffles the list with its own fixed seed first);
every rank keeps its shard (``stick_to_shard``) and each epoch the reader shuffles it through a buffer. A DALI
pipeline cannot skip an undecodable file (it stops), so pretraining reads scanned file lists
(``python -m fastmim.data.scan``); a decode error met anyway is raised as ``DaliDecodeError`` with the path DALI
names.
"""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Iterator, Sequence

import torch

from fastmim.data.folder import TAR_IMAGE_EXTS, is_utf8_name, split_sample_id, usable_cpus
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SIMPLE_CROP_PAD
from fastmim.data.transforms import crop_interp as resolve_crop_interp

DEVICES = ("cpu", "mixed")
INTERPS = ("auto", "cubic", "linear")
READER = "reader"


@functools.cache
def dali_problem() -> str | None:
    """None when NVIDIA DALI can be imported, else why not (with the install command)."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return (
            f"NVIDIA DALI is not installed ({type(e).__name__}: {e}); install it with "
            "pip install 'fastmim[dali]' (nvidia-dali-cuda130; nvidia-dali-cuda120 for CUDA 12)"
        )
    return None


def require_dali() -> None:
    why = dali_problem()
    if why:
        raise RuntimeError(why)
    _collect_before_fork()


@functools.cache
def _collect_before_fork() -> None:
    """A DALI pipeline left for the garbage collector (a loader dropped in a reference cycle) must be destroyed in
    this process: collected in a forked child (a DataLoader worker, the scan's pool) its destructor waits for
    threads the child does not have, forever. So every fork is preceded by a collection, once DALI is in use."""
    import gc

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=gc.collect)


def _dali_reason(e: Exception) -> str:
    """The line of a DALI error that says what went wrong (the one after "encountered:")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    after = [ln for i, ln in enumerate(lines) if i and lines[i - 1] == "encountered:"]
    return (after or lines[-1:] or [type(e).__name__])[0]


class DaliDecodeError(RuntimeError):
    """DALI stopped on a file it cannot decode; ``path`` names it where it could be found. ``problem`` is what went
    wrong, ``remedy(resumable)`` what to do (resume from the run's checkpoint, or run again when there is none); the
    message is both, for a run that has a checkpoint."""

    def __init__(self, problem: str, path: str | None):
        self.problem, self.path = problem, path
        super().__init__(f"{problem}. {self.remedy(True)}")

    def remedy(self, resumable: bool, resume: str = "resume") -> str:
        """What to do: with ``resumable`` (the run has a checkpoint), replace the file and ``resume``."""
        then = resume if resumable else "run again"
        if self.path is None:
            return (f"Find it with python -m fastmim.data.scan DATA_PATH (it names every file a decoder rejects), "
                    f"replace it at the same path and {then}")  # fmt: skip
        if not resumable:
            return (f"Replace the file at the same path, or remove it and scan again (python -m fastmim.data.scan), "
                    f"and {then}")  # fmt: skip
        return (f"Replace the file at the same path and {then}, or remove it, scan again (python -m fastmim.data.scan) "
                f"and {then} from an end-of-epoch checkpoint")  # fmt: skip


def _pipeline(files, indices, batch_size, img_size, device, device_id, shard_id, num_shards, seed, num_threads,
              scale, ratio, initial_fill, checkpoint, tars=None, id_bytes=0, filters=("cubic", "cubic"),
              index_paths=None, hflip=0.5, crop="random-resized"):  # fmt: skip
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(enable_checkpointing=True)
    def pipe():
        if tars:  # webdataset shards: the sample's id ("shard:offset:member") padded to id_bytes, mapped after
            jpegs = fn.readers.webdataset(
                paths=tars, ext=[";".join(TAR_IMAGE_EXTS)], missing_component_behavior="skip", random_shuffle=True,
                initial_fill=initial_fill, seed=seed, shard_id=shard_id, num_shards=num_shards, stick_to_shard=True,
                name=READER, index_paths=index_paths or [],
            )  # fmt: skip
            idx = fn.pad(fn.get_property(jpegs, key="source_info"), axes=[0], shape=[id_bytes], fill_value=0)
        else:
            jpegs, idx = fn.readers.file(
                files=files, labels=indices, random_shuffle=True, initial_fill=initial_fill, seed=seed,
                shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, name=READER,
            )  # fmt: skip
        # adjust_orientation=False: the stored pixels, EXIF orientation ignored, as PIL's open + convert (the torch
        # loaders, torchvision's ImageFolder, MAE's official loader) and nvJPEG in --loader torch-gpu read them
        orientation = {"adjust_orientation": False} if _decoder_has_orientation() else {}
        if crop == "simple":
            images, window = _simple_crop(jpegs, device, img_size, orientation, filters)
        else:
            images = fn.decoders.image_random_crop(
                jpegs, device=device, output_type=types.RGB, random_area=list(scale), random_aspect_ratio=list(ratio),
                num_attempts=10, **orientation,
            )  # fmt: skip
            images = fn.resize(images, resize_x=img_size, resize_y=img_size, **_filter_args(filters))
            window = {}
        images = fn.crop_mirror_normalize(
            images, mirror=fn.random.coin_flip(probability=hflip), dtype=types.FLOAT, output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD], **window,
        )  # fmt: skip
        return images, idx

    return pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                checkpoint=checkpoint)  # fmt: skip


def _filter_args(filters: tuple[str, str]) -> dict:
    """``fn.resize``'s antialiased filters for (shrinking, enlarging), each "cubic" or "linear"."""
    import nvidia.dali.types as types

    kind = {"cubic": types.INTERP_CUBIC, "linear": types.INTERP_LINEAR}
    return {"min_filter": kind[filters[0]], "mag_filter": kind[filters[1]], "antialias": True}


def _simple_crop(jpegs, device: str, size: int, orientation: dict, filters: tuple[str, str]):
    """PixMIM's simple resized crop in a DALI graph, as ``pretrain_transform(crop="simple")``: decode, resize the short
    side to ``size`` (the long one to ``size * long // short``, torchvision's rounding; ``filters``), pad
    ``SIMPLE_CROP_PAD`` pixels on each side by reflection (DALI pads only with a constant: mirrored edge slices,
    concatenated), and the arguments of ``crop_mirror_normalize`` that cut a uniformly placed size x size window of
    it. Returns (padded images, those arguments)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    pad = SIMPLE_CROP_PAD
    shape = fn.peek_image_shape(jpegs, dtype=types.INT64, **orientation)  # [H, W, C] as the decoder will give it
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = size * h // short, size * w // short
    images = fn.decoders.image(jpegs, device=device, output_type=types.RGB, **orientation)
    images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       **_filter_args(filters))  # fmt: skip

    def reflect(x, axis: str, extent):  # x padded by `pad` on both ends of `axis`, reflecting (edge not repeated)
        first = fn.slice(x, start=[1], shape=[pad], axis_names=axis)
        last = fn.slice(x, start=fn.cast(extent - (pad + 1), dtype=types.INT32), shape=[pad], axis_names=axis)
        # fn.flip mirrors horizontally unless told not to
        mirror = {"horizontal": 1, "vertical": 0} if axis == "W" else {"horizontal": 0, "vertical": 1}
        return fn.cat(fn.flip(first, **mirror), x, fn.flip(last, **mirror), axis_name=axis)

    images = reflect(reflect(images, "W", new_w), "H", new_h)

    def position(extent):  # crop_pos_* placing the window at a uniform integer offset in [0, extent + 2 pad - size]
        room = fn.cast(extent + (2 * pad - size), dtype=types.FLOAT)
        offset = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (room + 1.0))
        return dmath.min(offset, room) / room  # min: a draw of 1.0 by rounding stays inside

    return images, {"crop_h": size, "crop_w": size, "crop_pos_x": position(new_w), "crop_pos_y": position(new_h)}


def _decoder_has_orientation() -> bool:
    """Whether this DALI's decoders take ``adjust_orientation`` (recent ones: default True, which rotates by EXIF)."""
    import nvidia.dali.fn as fn

    return "adjust_orientation" in (fn.decoders.image_random_crop.__doc__ or "")


class DaliLoader:
    """Batches of ``(images [B, 3, S, S] float32, indices [B] int64)`` from DALI, one rank's shard.

    Args:
        files: image paths (a scanned list); the dataset index of ``files[i]`` is i.
        batch_size: per rank; the last partial batch of an epoch is dropped.
        img_size: output side S.
        device: "mixed" (decode on the GPU, images on ``cuda:device_id``) or "cpu" (CPU threads, CPU tensors).
        device_id: the GPU of "mixed" (the local rank's); ignored on "cpu".
        rank, world_size: this rank's shard.
        seed: the run's seed: the file order, the shuffles and the crops follow from it (and the rank).
        num_threads: DALI's CPU threads (default: the usable cores).
        scale, ratio: the random-resized crop's area fraction and aspect ranges (MAE's defaults).
        crop: "random-resized" (MAE's) or "simple" (PixMIM's: the short side resized to ``img_size``, a random
            square of it with 4 px reflect padding; ``scale`` and ``ratio`` unused), as ``pretrain_transform``.
        crop_interp: the crop's resize filter, "bicubic" or "bilinear" (antialiased), or None: the crop's own
            (random-resized: bicubic, simple: bilinear), as ``pretrain_transform``'s ``interp``.
        hflip: the probability of a horizontal flip (MAE 0.5, I-JEPA 0).
        initial_fill: the reader's shuffle buffer, in samples (capped at the shard).
        interp: for a bicubic crop, the filter when shrinking: "cubic" (torchvision's bicubic, antialiased),
            "linear" (antialiased linear: 1.1-1.5x DALI's CPU throughput), or "auto": cubic on the GPU, linear on CPU
            threads. Enlarging is bicubic with either. A bilinear crop (the simple crop's default) is linear both
            ways.
        tar_sizes: the members' sizes (``list_tar_samples``): given, DALI reads the shards through index files
            written from ours (cached), else it infers its own index from every tar header at each build.
        tars: webdataset tar shards to read instead of files; ``files`` are then their samples' ids
            (``fastmim.data.folder.list_tar_samples``), in order. The ranks read disjoint parts of the samples.
    """

    def __init__(
        self,
        files: Sequence[str],
        batch_size: int,
        img_size: int = 224,
        *,
        device: str = "cpu",
        device_id: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        initial_fill: int = 1024,
        tars: Sequence[str] | None = None,
        tar_sizes: Sequence[int] | None = None,
        interp: str = "auto",
        crop: str = "random-resized",
        crop_interp: str | None = None,
    ):
        require_dali()
        if device not in DEVICES:
            raise ValueError(f"DALI device must be one of {DEVICES}, got {device!r}")
        if interp not in INTERPS:
            raise ValueError(f"interp must be one of {INTERPS}, got {interp!r}")
        bicubic = resolve_crop_interp(crop, crop_interp) == "bicubic"  # ValueError for another crop or filter
        # the bicubic antialiased shrink is two thirds of DALI's CPU time; on the GPU it costs little
        self.interp = interp if interp != "auto" else "cubic" if device == "mixed" else "linear"
        self.filters = (self.interp, "cubic") if bicubic else ("linear", "linear")  # (shrinking, enlarging)
        if device == "mixed" and not torch.cuda.is_available():
            raise RuntimeError("DALI device 'mixed' decodes on a GPU and none is visible; use device='cpu'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.files = list(files)
        # (a TarShardDataset's sizes are a numpy array)
        tar_sizes = [int(s) for s in tar_sizes] if tar_sizes is not None and len(tar_sizes) else None
        if not tars:  # DALI takes its file names as UTF-8: a name with other bytes (Latin-1 from an old archive)
            for f in self.files:  # fails deep in the pipeline's build with "Unsupported argument type"
                if not is_utf8_name(f):
                    raise ValueError(f"DALI cannot open {f.encode('utf-8', 'surrogateescape')!r}: its name is not "
                                     "valid UTF-8. Rename it (or use --loader torch, which reads it)")  # fmt: skip
        n = len(self.files)
        self.shard_size = n // world_size  # DALI shards: floor or ceil of n / world; equal lengths for every rank
        if self.shard_size < batch_size:
            raise ValueError(
                f"{n} images over {world_size} ranks give {self.shard_size} per rank, fewer than one batch of "
                f"{batch_size}: lower --batch-size or add images"
            )
        # one shuffle of the list with the run's seed (DALI's own shuffle uses a fixed seed); the dataset index of a
        # sample stays its position in ``files``
        order = list(range(n))
        self.tars = list(tars) if tars else None
        if self.tars:  # a shard without an image sample (an empty tar: a writer stopped after a roll-over) is left
            held = {split_sample_id(f)[0] for f in self.files}  # out: DALI's reader refuses an index of 0 samples
            unknown = held - set(self.tars)
            if unknown:
                raise ValueError(f"DALI's samples name shards that tars does not list (spelled alike?): "
                                 f"{sorted(unknown)[:2]}")  # fmt: skip
            self.tars = [t for t in self.tars if t in held]
            if tar_sizes:  # a member past the shard's end (a shard cut short) makes DALI read unmapped memory
                ends = {t: os.path.getsize(t) for t in self.tars}
                for f, size in zip(self.files, tar_sizes, strict=True):
                    shard, offset, member = split_sample_id(f)
                    if offset + size > ends[shard]:
                        raise ValueError(
                            f"tar shard {shard!r} ends inside its member {member!r} (cut short: an interrupted "
                            "download or copy?), which DALI cannot read: re-write the shard, or read it with --loader "
                            "torch --skip-bad-files"
                        )
        if self.tars:  # tar shards are read in order: the shuffle buffer is all the mixing there is
            # DALI's source_info is "shard:offset:member": samples are found by (shard, offset), which DALI reports
            # exactly whatever it makes of the member's name (PAX names, bytes that are not UTF-8)
            self._index = {split_sample_id(f)[:2]: i for i, f in enumerate(self.files)}
            enc = lambda t: len(t.encode("utf-8", "surrogateescape"))  # noqa: E731
            self._id_bytes = max(enc(sh) + 24 + 4 * enc(m) for sh, _, m in map(split_sample_id, self.files))
            # DALI's index files, from ours: DALI reads exactly the indexed members, without re-reading every tar
            # header each time a pipeline is built (on every rank, and again on resume)
            self._index_paths = write_wds_indexes(self.files, tar_sizes, self.tars) if tar_sizes else None
        else:
            random.Random(seed).shuffle(order)
            self._id_bytes = 0
            self._index_paths = None
        self._order = order[: self.shard_size * world_size]  # equal shards: the remainder is left out
        self.batch_size, self.img_size, self.device = batch_size, img_size, device
        self.device_id = (
            (device_id if device_id is not None else torch.cuda.current_device()) if device == "mixed" else None
        )
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads = num_threads or usable_cpus()
        self.scale, self.ratio, self.hflip, self.crop = tuple(scale), tuple(ratio), float(hflip), crop
        self.initial_fill = max(1, min(initial_fill, self.shard_size))
        self.epoch = 0  # the epoch the reader is in
        self.batch = 0  # batches of it handed out
        self._build(None)

    # --- the pipeline ---
    def _build(self, checkpoint: str | None) -> None:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        files = [self.files[i] for i in self._order]
        pipe = _pipeline(
            files, self._order, self.batch_size, self.img_size, self.device, self.device_id, self.rank,
            self.world_size, self.seed * 1_000_003 + self.rank, self.num_threads, self.scale, self.ratio,
            self.initial_fill, checkpoint, self.tars, self._id_bytes, self.filters, self._index_paths, self.hflip,
            self.crop,
        )  # fmt: skip
        hint = ("tar members it skips (names over 100 characters in PAX headers, as Python's tarfile writes them?); "
                "rewrite the shards with GNU tar (tar --format=gnu) or use --loader torch" if self.tars else
                "files it cannot list")  # fmt: skip
        try:
            pipe.build()
        except RuntimeError as e:  # e.g. a webdataset reader that found no sample it can read
            raise ValueError(f"DALI cannot set up its reader ({_dali_reason(e)}): {hint}") from e
        seen = pipe.reader_meta(READER)["epoch_size"]
        expected = len(self.files) if self.tars else len(self._order)  # (DALI reads every sample of the shards)
        if seen != expected:
            raise ValueError(f"DALI's reader finds {seen} samples where the index has {expected}: {hint}")
        self._pipe = pipe
        self._rewound = False  # the state to save is the one from before the last batch asked for (see _next)
        self._it = DALIGenericIterator(
            [pipe],
            ["images", "indices"],
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=True,
            prepare_first_batch=False,
        )  # fmt: skip (errors surface in next())

    def __len__(self) -> int:
        return self.shard_size // self.batch_size

    # --- the trainer's sampler interface ---
    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Positions the loader at ``epoch``, ``start_index`` samples into this rank's share: where a restored
        checkpoint left it (mid-epoch), or the start of a later epoch (the rest of the current one is read and
        dropped). Anything else cannot be reached: DALI's state moves forward only."""
        if start_index % self.batch_size:
            raise ValueError(f"start_index {start_index} is not a multiple of the batch size {self.batch_size}")
        batch = start_index // self.batch_size
        if (epoch, batch) == (self.epoch, self.batch):
            return
        if batch == 0 and epoch > self.epoch:
            while epoch > self.epoch:
                self._finish_epoch()
            return
        raise ValueError(
            f"the DALI loader is at epoch {self.epoch}, batch {self.batch}; it cannot be moved to epoch {epoch}, "
            f"batch {batch} (resume from the checkpoint saved with the run: it holds DALI's state)"
        )

    def start_at(self, epoch: int) -> None:
        """Counts a fresh loader's first epoch as ``epoch``: resuming at an epoch boundary from a checkpoint without
        DALI's state (the order then follows DALI's seeded state, not a replay of the epochs before)."""
        if (self.epoch, self.batch) != (0, 0):
            raise RuntimeError(f"start_at needs a fresh loader; this one is at epoch {self.epoch}, batch {self.batch}")
        self.epoch = epoch

    def _finish_epoch(self) -> None:
        """Reads the current epoch's remaining batches (dropped) until the iterator ends it and resets (auto_reset),
        so the reader starts the next one. (A webdataset rank may hold a batch more than ``len``: equal epochs.)"""
        while True:
            try:
                self._next()
            except StopIteration:
                break
        self.epoch, self.batch = self.epoch + 1, 0

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        # DALI's state before this batch (~8 us): after a batch that fails, the iterator's own checkpoint has moved on
        # (its reader and random state past the batch it could not deliver), so the run's checkpoint takes this one
        self._state_before = self._it.checkpoints()[0]
        try:
            out = next(self._it)[0]
        except StopIteration:
            raise
        except RuntimeError as e:
            self._rewound = True
            raise self._decode_error(e) from e
        self._rewound = False
        self.batch += 1
        if self.tars:  # ids -> dataset indices
            ids = out["indices"].cpu().numpy()
            try:
                infos = [bytes(row).rstrip(b"\0").decode("utf-8", "surrogateescape") for row in ids]
                idx = [self._index[split_sample_id(info)[:2]] for info in infos]
            except (KeyError, ValueError) as e:
                raise RuntimeError(f"DALI read a tar sample the dataset's index does not hold: {e}") from None
            return out["images"], torch.tensor(idx, dtype=torch.int64)
        return out["images"], out["indices"].view(-1).long()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch's batches."""
        while self.batch < len(self):
            yield self._next()

    def unread_last_batch(self) -> None:
        """Counts the last batch delivered as not read, in position and in the state a checkpoint saves: a DDP rank
        whose batch loaded while another rank's failed gives it back, so that every rank's checkpoint resumes at the
        batch the run stopped at. (A batch that failed to load is not counted already.)"""
        if not self._rewound:
            self._rewound = True
            self.batch -= 1

    def close(self) -> None:
        """Releases the pipeline. DALI shares a file's memory mapping among the pipelines of a process while any of
        them holds it: a run that stopped on a bad file and is resumed in the same process (a notebook, a test) after
        the file was replaced would otherwise read the old bytes. The loader cannot be iterated after this."""
        pipe, self._it, self._pipe = self._pipe, None, None
        shutdown = getattr(pipe, "_shutdown", None)  # (what Pipeline.__del__ runs; an error's traceback can keep the
        if shutdown is not None:  # pipeline object itself alive until the collector runs)
            shutdown()

    # --- checkpoints ---
    def state_dict(self) -> dict:
        """DALI's checkpoint (reader position and random state) with the epoch and batch it stands at (possibly
        ``len``: the epoch's end; ``set_epoch`` moves on from there, so a bad file in the dropped tail surfaces in
        the next epoch, never while a checkpoint is written)."""
        dali = self._state_before if self._rewound else self._it.checkpoints()[0]
        return {"epoch": self.epoch, "batch": self.batch, "dali": dali, "crop": self.crop,
                "files": len(self.files), "rank": self.rank, "world_size": self.world_size}  # fmt: skip

    def state_problem(self, state: dict) -> str | None:
        """Why ``state`` cannot be loaded into this loader (None: it can): DALI's checkpoint restores only the
        pipeline it was taken from, and the crop is part of the pipeline's graph."""
        saved = state.get("crop", "random-resized")  # (checkpoints from before the simple crop)
        if saved != self.crop:
            return f"its DALI state is for --crop {saved}, a pipeline of other operators than --crop {self.crop}'s"
        return None

    def load_state_dict(self, state: dict) -> None:
        if (state.get("files"), state.get("world_size")) != (len(self.files), self.world_size):
            raise ValueError(
                f"the DALI checkpoint was saved for {state.get('files')} images over {state.get('world_size')} "
                f"ranks; this run has {len(self.files)} over {self.world_size}"
            )
        problem = self.state_problem(state)
        if problem:
            raise ValueError(f"the DALI checkpoint does not fit this loader: {problem}")
        self._build(state["dali"])
        self.epoch, self.batch = state["epoch"], state["batch"]

    # --- errors ---
    def _decode_error(self, e: Exception) -> Exception:
        """DALI's error as a ``DaliDecodeError`` naming the sample when DALI names it ("Failed to decode sample"), or
        without a path when its image decoder reports an nvImageCodec failure (the DALI installed here does); any
        other error (an older DALI's message, out of memory in a decoder) is passed on as it is."""
        text = str(e)
        found = re.search(r"Failed to decode sample #\d+ : (.+)", text)
        # the file reader memory-maps each file: an empty file fails there, before any decoder sees it
        found = found or re.search(r"File mapping failed: (.+)", text)
        codec = re.search(r"nvImageCodec failure[^\n]*", text)
        if not found and codec and "decoders.image" in text:
            # DALI on nvImageCodec reports an undecodable image without naming the file: say how to find it
            reason = codec.group(0)
            return DaliDecodeError(
                f"DALI cannot decode an image of this batch and does not say which ({reason}); the run stops", None
            )
        if not found:
            return e
        path = found.group(1).strip()
        if self.tars:  # DALI names a tar sample by our index file's name for it: the real id from (shard, offset)
            try:
                path = self.files[self._index[split_sample_id(path)[:2]]]
            except (KeyError, ValueError):
                pass
        return DaliDecodeError(f"DALI cannot decode {path!r}; the run stops: DALI cannot skip a sample", path)


def write_wds_indexes(ids: Sequence[str], sizes: Sequence[int], shards: Sequence[str]) -> list[str]:
    """DALI webdataset index files (``wds2idx``'s "v1.2" text format: a sample per line, ``ext offset size name``)
    for ``shards`` holding exactly the samples ``ids`` (``list_tar_samples``), written once into the cache (keyed by
    the shard's path, size and mtime) and reused. Names are written as ``<n>.<ext>`` (no spaces for the format to
    split); samples are found by (shard, offset) anyway."""
    import hashlib

    from fastmim.data.samples import cache_root

    per_shard: dict[str, list[str]] = {sh: [] for sh in shards}
    for n, (sample, size) in enumerate(zip(ids, sizes, strict=True)):
        shard, offset, member = split_sample_id(sample)
        ext = member.rsplit("/", 1)[-1].split(".", 1)[1]
        per_shard[shard].append(f"{ext} {offset} {size} {n}.{ext}\n")
    folder = cache_root() / "wds-index"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in shards:
        st = os.stat(shard)
        lines = per_shard[shard]
        key = hashlib.sha1(
            f"{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}|v1.2".encode(errors="surrogateescape")
        )
        key.update("".join(lines).encode())  # the members listed (a fastmim that reads more extensions lists more)
        path = folder / f"{key.hexdigest()[:20]}.idx"
        if not path.is_file():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(f"v1.2 {len(lines)}\n" + "".join(lines))
            os.replace(tmp, path)  # atomic: ranks writing the same index race harmlessly
        paths.append(str(path))
    return paths
