"""The built-in default dataset: scikit-image's sample photographs, written once as a JPEG image folder.

No network: the photos ship inside the scikit-image wheel. Each photo becomes a class folder holding the full photo
and its four quadrants, so a short CPU run sees ~100 distinct images per epoch. The folder is then read through the
same loader as a user's ImageFolder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

# Real photographs (and micrographs) among scikit-image's bundled files; synthetic test patterns are left out.
SAMPLE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png", "clock_motion.png",
)  # fmt: skip
VERSION = "v1"  # bump when the layout changes, so old caches are not reused


def cache_root() -> Path:
    """$FASTMIM_CACHE, else $XDG_CACHE_HOME/fastmim, else ~/.cache/fastmim."""
    if os.environ.get("FASTMIM_CACHE"):
        return Path(os.environ["FASTMIM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastmim"


def cached_record(kind: str, key: str) -> tuple[Path, dict | None]:
    """A JSON record kept in the cache under ``kind/`` for ``key`` (its file named by the key's hash): its path, and
    the record when the file holds one of that key (else None: none yet, damaged, or a hash collision)."""
    import hashlib
    import json

    name = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    path = cache_root() / kind / f"{name}.json"
    try:
        record = json.loads(path.read_text("ascii"))
    except (OSError, ValueError):
        return path, None
    return path, record if isinstance(record, dict) and record.get("key") == key else None


def write_record(path: Path, record: dict) -> None:
    """Writes a ``cached_record`` atomically (ranks writing the same one race harmlessly) as ASCII JSON (a name with
    bytes that are not UTF-8 round-trips as its escaped surrogates); a cache that cannot be written is left as it is
    (the record is made again next time)."""
    import json

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, separators=(",", ":")), "ascii")
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):  # (none left, or a cache path that cannot hold one)
            tmp.unlink(missing_ok=True)


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no --data-path was given and the built-in sample photos come from scikit-image, which is not installed: "
            "pip install 'fastmim[samples]' (or scikit-image), or pass --data-path to an image folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _write_photo(src: Path, dst_dir: Path) -> int:
    img = Image.open(src).convert("RGB")
    dst_dir.mkdir(parents=True)
    img.save(dst_dir / "full.jpg", quality=95)
    w, h = img.size
    for i, (x, y) in enumerate(((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2))):
        img.crop((x, y, x + w // 2, y + h // 2)).save(dst_dir / f"quadrant{i}.jpg", quality=95)
    return 5


def default_dataset_path() -> Path:
    """Path of the built-in image folder, writing it on first use (safe when several processes race)."""
    final = cache_root() / f"samples-{VERSION}"
    if (final / ".complete").is_file():
        return final
    src_dir = _skimage_data_dir()
    photos = [src_dir / name for name in SAMPLE_PHOTOS if (src_dir / name).is_file()]
    if not photos:
        raise RuntimeError(f"found none of scikit-image's sample photos in {src_dir}; pass --data-path instead")

    def fill(tmp: Path) -> None:
        for src in photos:
            _write_photo(src, tmp / src.stem)

    return write_once(final, fill, "scikit-image sample photos")


def write_once(final: Path, fill, what: str) -> Path:
    """``final``, filled by ``fill(tmp_dir)`` in a temporary folder renamed into place with a ``.complete`` marker
    (safe when several processes race: one folder wins, the others are removed)."""
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-tmp-", dir=final.parent))
    try:
        fill(tmp)
        (tmp / ".complete").write_text(what + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first, or a stale incomplete folder is in the way
            if not (final / ".complete").is_file():
                shutil.rmtree(final, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                except OSError:  # a racing process replaced the stale folder first
                    if not (final / ".complete").is_file():
                        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


DIGITS_VERSION = "v1"
DIGITS_SIDE = 64  # scikit-learn's 8x8 digits, upsampled (bicubic) so a ViT with 16-px patches sees a 4x4 grid


def builtin_digits() -> tuple[Path, Path]:
    """The built-in labelled data: scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes, bundled in
    the wheel: no network), written once as ``train/<digit>/`` and ``val/<digit>/`` PNG class folders (every fifth
    image of each class to val). Returns (train, val)."""
    final = cache_root() / f"digits-{DIGITS_VERSION}"
    if not (final / ".complete").is_file():
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise RuntimeError(
                "the built-in labelled data are scikit-learn's digits, and scikit-learn is not installed: pip install "
                "'fastmim[eval]' (or scikit-learn), or pass --data-path and --val-path"
            ) from e
        digits = load_digits()

        def fill(tmp: Path) -> None:
            seen: dict[int, int] = {}
            for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
                n = seen[int(label)] = seen.get(int(label), -1) + 1
                d = tmp / ("val" if n % 5 == 4 else "train") / str(int(label))
                d.mkdir(parents=True, exist_ok=True)
                gray = Image.fromarray((img * (255.0 / 16.0)).round().astype("uint8"), mode="L")
                gray.resize((DIGITS_SIDE, DIGITS_SIDE), Image.BICUBIC).convert("RGB").save(d / f"{i:04d}.png")

        write_once(final, fill, "scikit-learn digits")
    return final / "train", final / "val"


BUILTIN = {"digits": lambda: builtin_digits()[0], "digits-val": lambda: builtin_digits()[1]}


def resolve_data_path(path: str | None) -> str | None:
    """``builtin:digits`` (and ``builtin:digits-val``) -> the built-in labelled folder's path; others as given."""
    if path is None or not str(path).startswith("builtin:"):
        return path
    name = str(path).removeprefix("builtin:")
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data {path!r}: builtin:{', builtin:'.join(BUILTIN)}")
    return str(BUILTIN[name]())
