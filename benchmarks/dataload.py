"""Data loading: images per second of the pretraining loaders at 224 px (MAE's augmentation), over realistic JPEGs.

    python benchmarks/dataload.py                                   # every loader that can run here, defaults
    python benchmarks/dataload.py --loaders torchvision,dali-cpu --workers 1,2 --threads 1,2 --seconds 20
    python benchmarks/dataload.py --data /data/bench-jpegs --images 4096 --out benchmarks/results/dataload.jsonl

Loaders (one row per loader and worker / thread count):

- ``torchvision``: ``fastmim.data.ImageFolderDataset`` with ``pretrain_transform(224)`` (PIL decode, random-resized
  crop, flip, normalisation) in ``build_pretrain_loader``'s DataLoader, ``--workers`` processes (0: in this process).
- ``dali-cpu``: ``fastmim.data.dali.DaliLoader(device="cpu")``: the same augmentation in a DALI pipeline on
  ``--threads`` CPU threads (libjpeg-turbo decoding only the crop's region), CPU tensors.
- ``dali-mixed``: ``DaliLoader(device="mixed")``: nvJPEG decoding on the GPU (``--threads`` CPU threads read and
  parse), CUDA tensors. Needs a GPU and DALI.
- ``torch-gpu``: ``--loader torch-gpu`` (``fastmim.data.gpu_decode``): ``--workers`` processes read the files and draw
  the crops, the training process decodes each batch with torchvision's nvJPEG and crops, resizes, flips and
  normalises it with ``fastmim.ops.resized_crop``, a batch or two ahead in a background thread. Its row says where
  the time went: ``read_s`` (waiting for the workers), ``decode_s``, ``augment_s`` (host seconds of each; with
  ``--sync-timing`` the GPU's too) and ``wait_s`` (the consumer waiting for a finished batch). Without a GPU it runs
  with torchvision's CPU decoder (``decode: cpu``): a dry run of the code, not a measurement of the loader.

The data set: ``--images`` JPEGs written once into ``$FASTMIM_CACHE/bench-jpegs-<n>`` (or ``--data DIR``) and reused
while the marker file ``.params.json`` matches: crops and rescales of scikit-image's bundled photographs (grey ones
tinted) at 500x375 (a quarter at 375x500), with random flips, colour jitter, a film-grain texture and sensor noise,
saved as RGB JPEG quality 90 (4:2:0) in a class folder per source photo; deterministic from ``--data-seed``. The mean
file size is printed and recorded (ImageNet's averages ~110 KB). A ``--data`` folder holding images but no marker is
read as found (a seeded random subset of ``--images`` of them), never written to.

Timing: the loader is built (``setup_s``), ``--warmup`` batches are timed on their own (``warmup_s``: worker start,
the pipeline filling), then batches are timed over as many epochs as it takes (``set_epoch`` between them, as the
trainer does) until at least one epoch's worth of batches has arrived and ``--seconds`` have passed; CUDA outputs are
synchronized before the clock stops. ``img_per_s`` is ``images / s`` of that span. ``cpu_cores_ours`` and
``cpu_cores_others``: the CPU cores this run (threads and worker processes) and everything else on the machine used
meanwhile (from ``/proc/stat``; a row other work disturbed is flagged when printed). Each row is written as soon as it
is measured. Never asserts anything: a loader that cannot run here gives no row but a ``not measured: <loader>:
<why>`` line, and the targets (DALI-cpu >= 1.5x torchvision at equal threads = workers on a 2-core CPU machine;
DALI-mixed and torch-gpu >= 6,000 img/s on an H100/H200, torch-gpu with at most 8 workers) are printed against this
run's rows at the end, or "not measured (<why>)".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, host, out_file, parse_counts, usable_cpus, write_row  # noqa: E402
from fastmim.data import ImageFolderDataset, build_pretrain_loader, list_images, pretrain_transform  # noqa: E402
from fastmim.data.samples import _skimage_data_dir, cache_root  # noqa: E402

LOADERS = ("torchvision", "dali-cpu", "dali-mixed", "torch-gpu")
TARGET_DALI_CPU_SPEEDUP = 1.5  # dali-cpu / torchvision at equal threads = workers, on a 2-core CPU machine
TARGET_DALI_MIXED_IMG_PER_S = 6000.0  # on an H100
TARGET_GPU_DECODE_IMG_PER_S = 6000.0  # torch-gpu on an H100/H200 ...
TARGET_GPU_DECODE_WORKERS = 8  # ... with at most this many loader workers

# the generated data set
DATA_VERSION = "v1"  # bump when the images change, so old caches are regenerated
WIDTH, HEIGHT, QUALITY = 500, 375, 90
PORTRAIT = 0.25  # the fraction of 375x500 images
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                 "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")  # fmt: skip
GREY_PHOTOS = ("brick.png", "camera.png", "cell.png", "coins.png", "grass.png", "gravel.png", "moon.png",
               "clock_motion.png")  # fmt: skip
TEXTURES = ("grass.png", "gravel.png", "brick.png")  # the film-grain overlay: real fine detail, not white noise
MARKER = ".params.json"


# --- the data set ---


def data_params(images: int, seed: int) -> dict:
    """What the generated folder is a function of (the marker file's content)."""
    return {"version": DATA_VERSION, "images": images, "seed": seed, "size": f"{WIDTH}x{HEIGHT}", "quality": QUALITY,
            "portrait": PORTRAIT}  # fmt: skip


_SOURCES: list[tuple[str, object, bool]] = []  # (stem, PIL image, grey), loaded once per process
_TEXTURES: list[np.ndarray] = []


def _load_sources() -> None:
    from PIL import Image

    if _SOURCES:
        return
    src = _skimage_data_dir()
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        if (src / name).is_file():
            _SOURCES.append((Path(name).stem, Image.open(src / name).convert("RGB"), name in GREY_PHOTOS))
    for name in TEXTURES:
        if (src / name).is_file():
            t = np.asarray(Image.open(src / name).convert("L"), dtype=np.float32)
            _TEXTURES.append((t - t.mean()) / max(float(t.std()), 1e-6))
    if not _SOURCES:
        raise RuntimeError(f"found none of scikit-image's sample photos in {src}: pass --data to an image folder")


def make_image(index: int, seed: int):
    """(class name, PIL image) of image ``index``: a deterministic function of (seed, index)."""
    from PIL import Image

    _load_sources()
    rng = np.random.default_rng([seed, index])
    stem, src, grey = _SOURCES[int(rng.integers(len(_SOURCES)))]
    w, h = (HEIGHT, WIDTH) if rng.random() < PORTRAIT else (WIDTH, HEIGHT)
    # a crop at 0.8-1.25 output pixels per source pixel (capped by the photo: small ones are upscaled more)
    scale = rng.uniform(0.8, 1.25)
    cw, ch = min(src.width, round(w / scale)), min(src.height, round(h / scale))
    x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
    img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(img, dtype=np.float32)
    gains = rng.uniform(0.75, 1.25, 3) if grey else rng.uniform(0.9, 1.1, 3)  # tint / white balance
    a = a * (gains * rng.uniform(0.8, 1.2)).astype(np.float32)  # and brightness
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.8, 1.25) + mean  # contrast
    if _TEXTURES:
        tex = np.tile(_TEXTURES[int(rng.integers(len(_TEXTURES)))], (2, 2))
        ty, tx = int(rng.integers(0, tex.shape[0] // 2)), int(rng.integers(0, tex.shape[1] // 2))
        a *= 1 + rng.uniform(0.08, 0.22) * tex[ty : ty + h, tx : tx + w, None]
    a += rng.normal(0, rng.uniform(4, 10), a.shape).astype(np.float32)  # sensor noise
    return stem, Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def _write_image(job: tuple[int, int, str]) -> None:
    index, seed, root = job
    stem, img = make_image(index, seed)
    img.save(Path(root) / stem / f"{index:06d}.jpg", quality=QUALITY)


def generate(root: Path, images: int, seed: int, procs: int) -> None:
    """Writes the data set into ``root`` (a fresh folder: written beside it, then renamed into place)."""
    _load_sources()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp-", dir=root.parent))
    try:
        for stem, _, _ in _SOURCES:
            (tmp / stem).mkdir()
        jobs = [(i, seed, str(tmp)) for i in range(images)]
        if procs > 1 and images >= 64:
            import multiprocessing as mp

            with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(procs) as pool:
                pool.map(_write_image, jobs, chunksize=16)
        else:
            for job in jobs:
                _write_image(job)
        for d in tmp.iterdir():  # photos no image was drawn from
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        (tmp / MARKER).write_text(json.dumps(data_params(images, seed)) + "\n")
        if root.exists():  # an older generated set (its marker was checked by the caller)
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:  # another run finished first
            if not _matches(root, data_params(images, seed)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _matches(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def prepare_data(data: str | None, images: int, seed: int) -> tuple[Path, list[str], dict]:
    """(folder, image files, the row's ``data`` field): the generated set, made or reused, or a folder of one's own."""
    root = Path(data) if data else cache_root() / f"bench-jpegs-{images}"
    params = data_params(images, seed)
    own = root.exists() and not (root / MARKER).exists() and (root.is_file() or any(root.iterdir()))
    if own:  # not ours: read as found, never written to
        files = list_images(root)
        if len(files) > images:
            files = sorted(random.Random(seed).sample(files, images))
        info = {"images": len(files), "size": "as found", "path": str(root)}
        print(f"data: {len(files)} images of {root} (a folder of your own, read as found)", file=sys.stderr)
    else:
        if _matches(root, params):
            print(f"data: {root} (reused: {MARKER} matches)", file=sys.stderr)
        else:
            t0 = time.perf_counter()
            generate(root, images, seed, usable_cpus())
            print(f"data: wrote {images} JPEGs to {root} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        files = list_images(root)
        info = {"images": len(files), "size": f"{WIDTH}x{HEIGHT} q{QUALITY}"}
    sizes = []
    for f in files:
        try:
            sizes.append(os.path.getsize(f))
        except OSError:  # a broken link, a file gone since the listing: the loaders will name it
            pass
    if len(sizes) < len(files):
        print(f"note: {len(files) - len(sizes)} of the files cannot be read (broken links?); a loader stops at the "
              "first bad file: scan the folder (python -m fastmim.data.scan) and pass its list as --data",
              file=sys.stderr)  # fmt: skip
    mean_kb = sum(sizes) / max(len(sizes), 1) / 1024
    info["mean_kb"] = round(mean_kb, 1)
    print(f"data: {len(files)} images, mean file size {mean_kb:.1f} KB (ImageNet's averages ~110 KB)", file=sys.stderr)
    return root, files, info


# --- the loaders ---


class TorchvisionEpochs:
    """``fastmim.data``'s pretraining loader: ``epoch(e)`` is that epoch's batch iterator."""

    def __init__(self, files: list[str], root: Path, batch: int, workers: int, img_size: int, seed: int,
                 crop: str = "random-resized"):  # fmt: skip
        self.dataset = ImageFolderDataset(root, transform=pretrain_transform(img_size, crop=crop), seed=seed)
        if len(self.dataset.files) != len(files):  # a subset of a folder of one's own
            self.dataset.files = list(files)
        self.loader, self.sampler = build_pretrain_loader(self.dataset, batch, workers, seed=seed)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, e: int):
        self.sampler.set_epoch(e)
        self.dataset.set_epoch(e)
        return iter(self.loader)

    def close(self) -> None:
        pass


class TorchGpuEpochs(TorchvisionEpochs):
    """``--loader torch-gpu``: ``fastmim.data.gpu_decode``'s loader over the same sampler and crops."""

    def __init__(self, files: list[str], root: Path, batch: int, workers: int, img_size: int, seed: int,
                 device: torch.device, sync_timing: bool = False, crop: str = "random-resized"):  # fmt: skip
        from fastmim.data.gpu_decode import EncodedImages, GpuDecodeLoader, collate_encoded

        super().__init__(files, root, batch, 0, img_size, seed, crop)  # the dataset (its plain loader is not iterated)
        encoded, self.sampler = build_pretrain_loader(EncodedImages(self.dataset), batch, workers, seed=seed,
                                                      collate_images=collate_encoded)  # fmt: skip
        self.loader = GpuDecodeLoader(encoded, self.dataset, device, img_size, seed=seed, sync_timing=sync_timing)


class DaliEpochs:
    def __init__(self, files: list[str], batch: int, threads: int, img_size: int, seed: int, device: str,
                 interp: str = "auto", crop: str = "random-resized"):  # fmt: skip
        from fastmim.data.dali import DaliLoader

        self.loader = DaliLoader(files, batch, img_size, device=device, seed=seed, num_threads=threads,
                                 device_id=0 if device == "mixed" else None, interp=interp, crop=crop)  # fmt: skip

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, e: int):
        if e:
            self.loader.set_epoch(e)
        return iter(self.loader)

    def close(self) -> None:
        del self.loader  # its pipeline's threads end with it
        gc.collect()


def resolve_interp(interp: str, loader: str) -> str:
    """The filter DaliLoader shrinks with for ``interp`` on ``loader``'s device."""
    return interp if interp != "auto" else "cubic" if loader == "dali-mixed" else "linear"


def not_runnable(loader: str) -> str | None:
    """Why ``loader`` cannot run here, or None."""
    if loader.startswith("dali"):
        from fastmim.data.dali import dali_problem

        why = dali_problem()
        if why:
            return why
    if loader == "dali-mixed" and not torch.cuda.is_available():
        return "no CUDA device here (DALI's mixed decoder runs on a GPU)"
    if loader == "torch-gpu" and torch.cuda.is_available():
        from fastmim.data.gpu_decode import gpu_decode_problem

        return gpu_decode_problem(torch.device("cuda", 0))
    return None


def output_device(loader: str) -> torch.device:
    gpu = loader == "dali-mixed" or (loader == "torch-gpu" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def time_loader(epochs, warmup: int, seconds: float, cuda: bool) -> dict:
    """Times ``warmup`` batches, then batches until at least one epoch's worth has arrived and ``seconds`` have
    passed (across epochs, ``set_epoch`` between them); CUDA outputs synchronized before each clock read."""

    def batches():
        e = 0
        while True:
            yield from epochs.epoch(e)
            e += 1

    def sync():
        if cuda:
            torch.cuda.synchronize()

    it = batches()
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    sync()
    t1 = time.perf_counter()
    images = count = 0
    shapes = set()
    while True:
        imgs, _ = next(it)
        images += imgs.shape[0]
        count += 1
        shapes.add((tuple(imgs.shape[1:]), imgs.device.type))
        if count >= len(epochs) and time.perf_counter() - t1 >= seconds:
            break
    sync()
    t2 = time.perf_counter()
    return {"images": images, "batches": count, "s": round(t2 - t1, 4), "img_per_s": round(images / (t2 - t1), 1),
            "warmup_batches": warmup, "warmup_s": round(t1 - t0, 4), "passes": round(count / len(epochs), 2),
            "output": sorted(f"{list(s)} {d}" for s, d in shapes)}  # fmt: skip


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the machine has been busy, summed over its CPUs; CPU seconds of this process, its threads and
    its reaped children), or None where /proc/stat cannot be read."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait (steal too)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(loader: str, count: int, files: list[str], root: Path, args) -> dict:
    """A row's timing, and the CPU cores this run and everything else on the machine used meanwhile (from setup
    to the loader's end: its worker processes are joined by then)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    if loader == "torchvision":
        epochs = TorchvisionEpochs(files, root, args.batch, count, args.img_size, args.seed, args.crop)
    elif loader == "torch-gpu":
        epochs = TorchGpuEpochs(files, root, args.batch, count, args.img_size, args.seed, output_device(loader),
                                args.sync_timing, args.crop)  # fmt: skip
    else:
        epochs = DaliEpochs(files, args.batch, count, args.img_size, args.seed, loader.removeprefix("dali-"),
                            args.dali_interp, args.crop)  # fmt: skip
    try:
        setup_s = time.perf_counter() - t0
        timing = time_loader(epochs, args.warmup, args.seconds, cuda=output_device(loader).type == "cuda")
        if loader == "torch-gpu":  # where the time went (warm-up included), per batch
            stats = epochs.loader.stats
            per = max(stats["batches"], 1)
            timing["decode"] = output_device(loader).type
            timing["sync_timing"] = bool(args.sync_timing)
            timing["ms_per_batch"] = {k[:-2]: round(1000 * stats[k] / per, 2) for k in stats if k.endswith("_s")}
            timing["cpu_fallbacks"] = stats["cpu_fallbacks"]
    finally:
        epochs.close()
    c1, wall = cpu_seconds(), time.perf_counter() - t0
    cores = {}
    if c0 and c1:
        ours = (c1[1] - c0[1]) / wall
        others = max(0.0, (c1[0] - c0[0]) / wall - ours)
        cores = {"cpu_cores_ours": round(ours, 2), "cpu_cores_others": round(others, 2)}
    return {**timing, "setup_s": round(setup_s, 4), **cores}


# --- the report ---


def report_targets(rows: list[dict], missing: dict[str, str], loaders=LOADERS) -> None:
    """Each target against this run's rows: the measured value and met / NOT met, or not measured (why)."""
    print("\ntargets (printed, never asserted):", file=sys.stderr)
    cores = usable_cpus()
    tv = {r["workers"]: r for r in rows if r["loader"] == "torchvision"}
    dc = {r["threads"]: r for r in rows if r["loader"] == "dali-cpu"}
    pairs = sorted(set(tv) & set(dc))
    target = f"DALI-cpu >= {TARGET_DALI_CPU_SPEEDUP}x torchvision at equal threads = workers (2-core CPU)"
    for n in pairs:
        x = dc[n]["img_per_s"] / tv[n]["img_per_s"]
        verdict = "met" if x >= TARGET_DALI_CPU_SPEEDUP else "NOT met"
        where = "" if cores == 2 else f" [this machine has {cores} usable cores, not 2]"
        print(f"  {target}: {x:.2f}x at {n} ({dc[n]['img_per_s']:,.0f} vs {tv[n]['img_per_s']:,.0f} img/s): "
              f"{verdict}{where}", file=sys.stderr)  # fmt: skip
    if not pairs:
        absent = [name for name in ("torchvision", "dali-cpu") if name not in loaders]
        why = missing.get("dali-cpu") or missing.get("torchvision")
        if absent:
            why = f"{' and '.join(absent)} not in --loaders"
        elif not why:
            why = f"no equal counts: torchvision workers {sorted(tv)}, dali-cpu threads {sorted(dc)}"
        print(f"  {target}: not measured ({why})", file=sys.stderr)
    target = f"DALI-mixed >= {TARGET_DALI_MIXED_IMG_PER_S:,.0f} img/s (H100)"
    mixed = [r for r in rows if r["loader"] == "dali-mixed"]
    for r in mixed:
        verdict = "met" if r["img_per_s"] >= TARGET_DALI_MIXED_IMG_PER_S else "NOT met"
        print(f"  {target}: {r['img_per_s']:,.0f} img/s on {r['device']} at {r['threads']} threads, batch "
              f"{r['batch']}: {verdict}", file=sys.stderr)  # fmt: skip
    if not mixed:
        why = missing.get("dali-mixed", "no row" if "dali-mixed" in loaders else "dali-mixed not in --loaders")
        print(f"  {target}: not measured ({why})", file=sys.stderr)
    target = (f"torch-gpu >= {TARGET_GPU_DECODE_IMG_PER_S:,.0f} img/s (H100/H200) with <= {TARGET_GPU_DECODE_WORKERS} "
              "workers")  # fmt: skip
    gpu_rows = [r for r in rows if r["loader"] == "torch-gpu" and r.get("decode") == "cuda"]
    for r in gpu_rows:
        ok = r["img_per_s"] >= TARGET_GPU_DECODE_IMG_PER_S and r["workers"] <= TARGET_GPU_DECODE_WORKERS
        where = ", ".join(f"{k} {v} ms" for k, v in r["ms_per_batch"].items())
        print(f"  {target}: {r['img_per_s']:,.0f} img/s on {r['device']} with {r['workers']} workers, batch "
              f"{r['batch']}: {'met' if ok else 'NOT met'} (per batch: {where})", file=sys.stderr)  # fmt: skip
    if not gpu_rows:
        if "torch-gpu" not in loaders:
            why = "torch-gpu not in --loaders"
        else:
            why = missing.get("torch-gpu", "no CUDA device: its rows decoded on the CPU, a dry run")
        print(f"  {target}: not measured ({why})", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    cpus = usable_cpus()
    ap.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated, from {', '.join(LOADERS)} "
                    "(default: all; one that cannot run here is reported as not measured)")  # fmt: skip
    ap.add_argument("--workers", type=lambda s: parse_counts(s, 0), default=[cpus], help="torchvision and torch-gpu "
                    f"processes, comma-separated to sweep (default: the usable CPUs, {cpus})")  # fmt: skip
    ap.add_argument("--threads", type=lambda s: parse_counts(s, 1), default=[cpus], help="DALI CPU threads, "
                    f"comma-separated to sweep (default: the usable CPUs, {cpus})")  # fmt: skip
    ap.add_argument("--batch", "--batch-size", type=int, default=256 if cuda else 64,
                    help="per batch (default 64; 256 with CUDA)")  # fmt: skip
    ap.add_argument("--images", type=int, default=4096 if cuda else 512, help="data set size (default 512; 4096 "
                    "with CUDA)")  # fmt: skip
    ap.add_argument("--data", default=None, help="the data set's folder (default $FASTMIM_CACHE/bench-jpegs-<n>); "
                    "a folder of images of your own is read as found")  # fmt: skip
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the generated images (default 0)")
    ap.add_argument("--seconds", type=float, default=10.0 if cuda else 20.0, help="time each row at least this long, "
                    "and at least one epoch's worth of batches (default 20; 10 with CUDA)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=3, help="batches timed apart first (default 3)")
    ap.add_argument("--img-size", type=int, default=224, help="output side (default 224)")
    ap.add_argument("--seed", type=int, default=0, help="the loaders' seed (default 0)")
    ap.add_argument("--dali-interp", default="auto", choices=("auto", "cubic", "linear"), help="DALI's filter when "
                    "shrinking a crop (DaliLoader's interp; default auto: linear on CPU threads, cubic on the GPU; "
                    "torchvision is bicubic)")  # fmt: skip
    ap.add_argument("--sync-timing", action="store_true", help="torch-gpu: synchronise after decoding and after "
                    "augmenting, so its per-batch times include the GPU's (removes some overlap)")  # fmt: skip
    ap.add_argument(
        "--crop",
        default="random-resized",
        choices=("random-resized", "simple"),
        help="the pretraining "
        "crop (default random-resized, MAE's; simple: PixMIM's, which torch-gpu cuts image by image)",
    )
    ap.add_argument("--prepare-only", action="store_true", help="make (or check) the data set, then stop (a "
                    "command of its own on a GPU: a time limit on the measuring cannot cut its writing)")  # fmt: skip
    ap.add_argument("--out", default=None, type=out_file, help="append the JSON rows to this file")
    args = ap.parse_args(argv)
    loaders = [s.strip() for s in args.loaders.split(",") if s.strip()]
    if not loaders or any(s not in LOADERS for s in loaders):
        ap.error(f"--loaders must come from {', '.join(LOADERS)}, got {args.loaders!r}")
    for flag in ("batch", "images", "img_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.seconds < 0:
        ap.error("--warmup and --seconds must be >= 0")
    if args.images < args.batch:
        ap.error(f"--images ({args.images}) must hold at least one --batch ({args.batch})")

    missing: dict[str, str] = {}
    for loader in loaders:
        why = not_runnable(loader)
        if why:
            missing[loader] = why
            print(f"not measured: {loader}: {why}", file=sys.stderr)
    root, files, data = prepare_data(args.data, args.images, args.data_seed)
    if args.prepare_only:
        print(f"data: {len(files)} images in {root}", file=sys.stderr)
        return 0
    host_info = host()
    rows: list[dict] = []
    # torchvision first: its workers fork before any DALI thread exists in this process
    for loader in [s for s in LOADERS if s in loaders and s not in missing]:
        by_workers = loader in ("torchvision", "torch-gpu")
        counts = args.workers if by_workers else args.threads
        for count in counts:
            label = f"{count} {'workers' if by_workers else 'threads'}"
            try:
                timing = measure(loader, count, files, root, args)
            except Exception as e:  # noqa: BLE001 - report and go on: a benchmark never stops on one row
                why = _why(e)
                missing.setdefault(loader, why)
                print(f"not measured: {loader} ({label}): {why}", file=sys.stderr)
                continue
            key = "workers" if by_workers else "threads"
            interp = "cubic" if by_workers else resolve_interp(args.dali_interp, loader)
            row = {"benchmark": "dataload", "loader": loader, key: count, "batch": args.batch, "interp": interp,
                   "crop": args.crop,
                   "img_size": args.img_size, **timing, "data": data, **host_info,
                   **environment(output_device(loader))}  # fmt: skip
            rows.append(row)
            write_row(row, args.out)
            if row.get("cpu_cores_others", 0) > 0.1 * cpus:
                print(f"note: {loader} ({label}): other processes used {row['cpu_cores_others']:.2f} of the {cpus} "
                      "CPUs meanwhile: this row measures what they left", file=sys.stderr)  # fmt: skip

    print(f"\n  {'loader':<13}{'workers/threads':>16}{'batch':>7}{'images':>8}{'s':>8}{'img/s':>10}{'warm-up s':>11}"
          f"{'cores ours':>12}{'others':>8}", file=sys.stderr)  # fmt: skip
    for r in rows:
        count = f"{r['workers']} workers" if "workers" in r else f"{r['threads']} threads"
        ours, others = r.get("cpu_cores_ours", ""), r.get("cpu_cores_others", "")
        print(f"  {r['loader']:<13}{count:>16}{r['batch']:>7}{r['images']:>8}{r['s']:>8.2f}{r['img_per_s']:>10,.0f}"
              f"{r['warmup_s']:>11.2f}{ours:>12}{others:>8}", file=sys.stderr)  # fmt: skip
    report_targets(rows, missing, loaders)
    if not rows:
        print("no loader could be measured (see the 'not measured' lines above)", file=sys.stderr)
        return 1
    return 0


def _why(e: Exception) -> str:
    """One line for a row that failed: a bad file named (the torch loaders' errors carry a worker's traceback)."""
    from fastmim.data.dali import DaliDecodeError
    from fastmim.data.folder import BadImageError

    if isinstance(e, BadImageError):
        return f"{e.summary()} (scan the folder: python -m fastmim.data.scan, and pass its list as --data)"
    if isinstance(e, DaliDecodeError):
        return f"{e.problem} (scan the folder: python -m fastmim.data.scan, and pass its list as --data)"
    return f"{type(e).__name__}: {e}".strip().splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
