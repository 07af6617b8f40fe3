"""Dataset scan: decode every image under a folder once, name the bad files, write a list of the good ones.

A DALI pipeline cannot skip a sample it fails to decode: it stops, without naming the file. Scanning the folder once
before pretraining finds the corrupt, truncated and non-image files by path, and writes a clean file list that both
loaders take as ``--data-path``::

    python -m fastmim.data.scan /data/imagenet/train [--out FILE] [--workers N] [--report FILE.json] [--quiet]

The list is UTF-8 text: a header line, then one path per line relative to the scanned root, sorted::

    # fastmim-scan v2 root=/data/imagenet/train images=1281166 bad=1 files=1281167 mtime=1715000000.123 digest=...
    n01440764/n01440764_10026.JPEG

``digest`` (format v2) is a hash of every file's path, size and modification time: a file replaced by another one,
whatever time it was given, makes the scan out of date, while a copy that keeps sizes and times (rsync -a to the
same path) does not. A v1 list (written before the digest) is still read, and checked by its count and newest time
alone: scan again to get the digest's check.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageFile, UnidentifiedImageError

from fastmim.data.folder import (
    IMG_EXTENSIONS,
    _tar_hint,
    check_pixel_limit,
    is_image_file,
    is_shard_pattern,
    is_utf8_name,
    iter_files,
    list_tar_samples,
    list_tar_shards,
    note_shard_families,
    open_regular,
    shard_base,
    split_sample_id,
    usable_cpus,
)
from fastmim.data.samples import cache_root, cached_record, write_record

FORMAT = "v2"  # written; v1 (no digest) is read too
_READ_FORMATS = ("v1", "v2")
# what PIL may identify and DALI's decoders (nvImageCodec) read as well; the others (GIF, TGA, ICO, ...) stop DALI
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "JPEG2000"})
# TIFFs whose pixels DALI 2.4's decoders refuse (bilevel "1": no BitsPerSample for its parser; 32-bit integer "I") or
# decode to other colours than PIL (CIELAB: up to 84 levels apart); checked with fn.decoders.image on CPU
DALI_TIFF_MODES_NOT = {"1": "1-bit", "I": "32-bit integer", "LAB": "CIELAB"}
MAGIC = "# fastmim-scan"
NON_IMAGE = "not an image file (extension)"
_HEADER = re.compile(
    r"# fastmim-scan v[12] root=(?P<root>.+) images=(?P<images>\d+) bad=(?P<bad>\d+) files=(?P<files>\d+)"
    r" mtime=(?P<mtime>\S+)(?: digest=(?P<digest>[0-9a-f]+))?"
)
_MAX_PRINTED_NON_IMAGES = 20
_LEFT_OUT = {  # iter_files's counts, as the summary says them
    "hidden images": "hidden image(s) (names starting with '.')",
    "hidden folders": "hidden folder(s)",
    "walked twice": "linked folder(s) leading to a folder already read (a link loop or a second link: read once)",
    "excluded": "folder(s) excluded",
}


@dataclass
class ScanResult:
    """What a scan found. Paths are absolute, below ``root`` (the resolved folder); each list is sorted.

    Attributes:
        good: images that decode fully (the clean list, in its order).
        bad: ``(path, reason)`` for each image-named file that does not decode.
        non_images: files without an image extension (never listed; not errors).
        list_path: where the clean list was written.
        files: files seen (good + bad + non_images); mtime: the newest modification time among them.
        left_out: what the folder walk did not read, counted as ``iter_files`` counts it ("hidden images", "hidden
            folders", "walked twice": linked folders leading to a folder already read).
    """

    root: str
    good: list[str]
    bad: list[tuple[str, str]]
    non_images: list[str]
    list_path: Path
    files: int = 0
    mtime: float = 0.0
    left_out: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Bad files per reason (``corrupt: <message>`` counted as ``corrupt``), most common first."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.bad).most_common())

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "list": str(self.list_path),
            "files": self.files,
            "images": len(self.good),
            "bad": [{"path": p, "reason": r} for p, r in self.bad],
            "counts": self.counts(),
            "non_images": self.non_images,
            "mtime": self.mtime,
            "left_out": self.left_out,
        }


class _Header(NamedTuple):
    root: str
    images: int
    bad: int
    files: int
    mtime: float
    digest: str | None  # None in a list written before it was added


def _resolve(root: str | Path) -> str:
    return os.path.realpath(os.fspath(root))


def default_list_path(root: str | Path) -> Path:
    """Where ``scan(root)`` writes its list unless told otherwise: ``<cache>/scans/<sha1 of the resolved root>.v2.txt``
    (a name of its own per format: a fastmim that reads v1 only keeps its own list beside it in a shared cache)."""
    return _list_path(root, ".v2.txt")


def _list_path(root: str | Path, suffix: str) -> Path:
    digest = hashlib.sha1(_resolve(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_root() / "scans" / f"{digest}{suffix}"


def _walk(root: str, skipped: dict[str, int] | None = None) -> tuple[list[str], list[str], float, str]:
    """(image files, other files, newest mtime, ``_digest`` of them all) below root. Image files are exactly those
    ``list_images`` reads (``iter_files``: hidden files such as ``.DS_Store`` are not walked; ``skipped`` counts what
    the walk left out)."""
    images, others = [], []
    paths = list(iter_files(root, skipped))
    for path in paths:
        (images if is_image_file(path) else others).append(path)
    stats, newest = [], 0.0
    for path, st in zip(paths, _stat_all(paths), strict=True):
        if st is None:  # a broken link: counted, and reported as unreadable if it names an image
            stats.append((path, -1, -1))
            continue
        newest = max(newest, st.st_mtime)
        stats.append((path, st.st_size, st.st_mtime_ns))
    return sorted(images), sorted(others), newest, _digest(stats)


def _stat_all(paths: list[str], threads: int = 16, chunk: int = 512) -> list[os.stat_result | None]:
    """os.stat of every path (None where it fails), in order, by ``threads`` threads: a shared file system answers
    each stat in 0.1-1 ms, so a single thread's check of ImageNet's 1.28M files took minutes there (rank 0 does it
    while the other ranks wait: see pretrain's choose_loader)."""

    def stat_chunk(start: int) -> list[os.stat_result | None]:
        out = []
        for p in paths[start : start + chunk]:
            try:
                out.append(os.stat(p))
            except OSError:
                out.append(None)
        return out

    if len(paths) <= chunk:
        return stat_chunk(0)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [st for part in pool.map(stat_chunk, range(0, len(paths), chunk)) for st in part]


def _digest(stats: list[tuple[str, int, int]]) -> str:
    """A hash of (path, size, mtime in ns) of every file: any file written, replaced, renamed or given another time
    changes it."""
    h = hashlib.sha1()
    for path, size, mtime in sorted(stats):
        h.update(f"{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:20]


def _shard_stats(shards: list[str]) -> tuple[float, str]:
    """(newest mtime, ``_digest``) of tar shards."""
    stats = [(s, st.st_size, st.st_mtime_ns) for s, st in ((s, os.stat(s)) for s in shards)]
    return max(os.stat(s).st_mtime for s in shards), _digest(stats)


def _ends_with_eoi(data: bytes) -> bool:
    """An end-of-image marker after the last start-of-scan: the last scan is complete. Entropy-coded data stuffs
    every 0xFF byte, so FFD9 there is the marker; bytes after it (camera trailers) are allowed."""
    return data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) != -1


def check_image(path: str) -> str | None:
    """None when PIL decodes the whole file, else the reason it does not: ``empty``, ``truncated``, ``not an image``,
    ``too large: ...``, ``unreadable: <message>`` or ``corrupt: <message>``."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return check_bytes(data)


def check_member(sample: tuple[str, int, int]) -> str | None:
    """``check_image`` of a tar member: (shard, data offset, size)."""
    shard, offset, size = sample
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return check_bytes(data) if len(data) == size else "truncated"  # (a member of size 0: check_bytes says empty)


def check_bytes(data: bytes) -> str | None:
    """``check_image`` of an encoded image's bytes."""
    if not data:
        return "empty"
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, as it does in DALI
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and size warnings: the image decodes, so it is good
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode = img.format, img.mode
                img.load()
            if fmt == "PNG":  # chunk checksums and the end chunk, which load() does not check and DALI does
                with Image.open(io.BytesIO(data)) as img:
                    img.verify()
    except Image.DecompressionBombError:
        return "too large: over Pillow's pixel limit (FASTMIM_MAX_IMAGE_PIXELS=N raises it, 0 removes it)"
    except UnidentifiedImageError:
        return "not an image"
    except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, ValueError, struct.error ...
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, EOFError) or "truncat" in message.lower():
            return "truncated"
        return f"corrupt: {message}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    if fmt not in DALI_FORMATS:  # PIL opens by content: a GIF named .jpg decodes here, and stops a DALI pipeline
        return f"not a format DALI decodes ({fmt})"
    if fmt == "TIFF" and mode in DALI_TIFF_MODES_NOT:  # (the torch loaders read it: convert it, or train with them)
        return f"a TIFF DALI does not decode as PIL does ({DALI_TIFF_MODES_NOT[mode]} pixels, mode {mode})"
    # libjpeg stops at the last complete scan; DALI's decoders reject a JPEG cut before its end-of-image marker
    if fmt in ("JPEG", "MPO") and not _ends_with_eoi(data):
        return "truncated"
    return None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which then cancels the work


def default_workers() -> int:
    return usable_cpus()


def _check_all(paths: list, workers: int, progress: bool, check=check_image) -> list[str | None]:
    from fastmim.train.progress import progress_bar

    if workers <= 1 or len(paths) <= 1:
        with progress_bar(total=len(paths), desc="scan", unit="img", disable=not progress) as bar:
            reasons = []
            for p in paths:
                reasons.append(check(p))
                bar.update()
            return reasons
    import multiprocessing

    # fork: workers start at once without re-importing torch; the check itself uses only PIL
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    chunksize = max(1, min(256, len(paths) // (workers * 16)))
    ex = ProcessPoolExecutor(min(workers, len(paths)), mp_context=ctx, initializer=_ignore_sigint)
    try:
        results = ex.map(check, paths, chunksize=chunksize)  # submits everything: the workers start here
        with progress_bar(total=len(paths), desc="scan", unit="img", disable=not progress) as bar:
            reasons = []
            for r in results:
                reasons.append(r)
                bar.update()
    except BrokenProcessPool as e:
        raise RuntimeError(
            "a scan worker died (a decoder crash, or out of memory) and the scan cannot say on which file; no list "
            "was written"
        ) from e
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    return reasons


def _write_atomic(path: Path, text: str) -> None:
    """Writes text to path through a temporary file in the same folder, so readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the list is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scan(
    root: str | Path, workers: int | None = None, out: str | Path | None = None, progress: bool = True
) -> ScanResult:
    """Decodes every image file below root and writes the list of those that decode.

    Args:
        root: folder of images or of class folders (recursive, symlinks followed, hidden folders skipped).
        workers: decoding processes; None: the usable CPU count; 0 or 1: in this process.
        out: where to write the list; None: ``default_list_path(root)``.
        progress: a progress bar on stderr.

    Raises:
        FileNotFoundError, NotADirectoryError: root is missing or not a folder.
        ValueError: root holds no file, or no image file.
    """
    check_pixel_limit()
    if not is_shard_pattern(root) and not os.path.exists(root):
        raise FileNotFoundError(f"data path {str(root)!r} does not exist")
    shards = list_tar_shards(root)
    if shards is not None:
        if os.path.isdir(root):
            note_shard_families(root, shards)
        resolved = _resolve(root)  # (the shards as the list names them: below the resolved root)
        return _scan_tars(resolved, list_tar_shards(resolved) or shards, workers, out, progress)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data path {str(root)!r} is not a directory")
    resolved = _resolve(root)
    if "\n" in resolved or "\r" in resolved:
        raise ValueError(f"data path {str(root)!r} holds a line break; a file list cannot name it")
    skipped: dict[str, int] = {}
    images, others, mtime, digest = _walk(resolved, skipped)
    if not images and not others:
        raise ValueError(f"data path {str(root)!r} is empty (or holds only hidden files and folders, names starting "
                         "with '.', which are not read)")  # fmt: skip
    if not images:
        raise ValueError(
            f"data path {str(root)!r} holds no images (looked for {', '.join(IMG_EXTENSIONS)}); "
            f"it holds {len(others)} other file(s), such as {os.path.relpath(others[0], resolved)!r}"
            f"{_tar_hint(others)}"
        )
    prefix = os.path.join(resolved, "")
    listable = [p for p in images if "\n" not in p and "\r" not in p and is_utf8_name(p)]
    n_workers = default_workers() if workers is None else workers
    reasons = dict(zip(listable, _check_all(listable, n_workers, progress), strict=True))
    good, bad = [], []
    for p in images:
        reason = reasons.get(p, "name holds a line break (a file list cannot name it)" if is_utf8_name(p) else
                             "name is not valid UTF-8 (DALI cannot open it; rename the file)")  # fmt: skip
        if reason is None:
            good.append(p)
        else:
            bad.append((p, reason))
    list_path = Path(out) if out is not None else default_list_path(resolved)
    header = (
        f"{MAGIC} {FORMAT} root={resolved} images={len(good)} bad={len(bad)} files={len(images) + len(others)} "
        f"mtime={mtime!r} digest={digest}"
    )
    _write_atomic(list_path, "".join([header, "\n", *(p[len(prefix) :] + "\n" for p in good)]))
    left_out = {k: n for k, n in skipped.items() if n}
    return ScanResult(resolved, good, bad, others, list_path, len(images) + len(others), mtime, left_out)


def _scan_tars(resolved: str, shards: list[str], workers, out, progress) -> ScanResult:
    """The scan of webdataset tar shards (a .tar or a folder of them): every image member decoded; the list names the
    good samples by id (``shard:offset:member``, the shard relative to the root). DALI reads every sample of a shard,
    so only a scan that found no bad image clears the shards for it, each on its own (``scanned_bad``)."""
    ids, sizes = list_tar_samples(shards)
    keys = {shard: _shard_scan_path(shard) for shard in shards}  # (as listed: a shard written during the scan differs)
    samples = [(s, o, n) for (s, o, _), n in zip(map(split_sample_id, ids), sizes, strict=True)]
    n_workers = default_workers() if workers is None else workers
    reasons = _check_all(samples, n_workers, progress, check=check_member)
    good = [i for i, r in zip(ids, reasons, strict=True) if r is None]
    bad = [(i, r) for i, r in zip(ids, reasons, strict=True) if r is not None]
    base = shard_base(resolved)
    mtime, digest = _shard_stats(shards)
    list_path = Path(out) if out is not None else default_list_path(resolved)
    header = (
        f"{MAGIC} {FORMAT} root={resolved} images={len(good)} bad={len(bad)} files={len(shards)} mtime={mtime!r} "
        f"digest={digest}"
    )
    _write_atomic(list_path, "".join([header, "\n", *(os.path.relpath(i, base) + "\n" for i in good)]))
    per_shard = Counter(split_sample_id(i)[0] for i, _ in bad)
    for shard in shards:
        _record_shard_scan(keys[shard], per_shard.get(shard, 0))
    return ScanResult(resolved, good, bad, [], list_path, len(shards), mtime)


def _shard_scan_path(shard: str) -> tuple[Path, str, dict | None]:
    """Where a shard's scan result is kept (``tar-scans/``), its key and the result kept there (None: none): the key
    is the shard's name, size and modification time and a digest of its members' names, places and sizes (its cached
    listing), which a move, a ``cp -p`` or ``rsync -a`` copy keep (the same bytes: still cleared) and a rewrite
    changes."""
    from fastmim.data.folder import _shard_listing

    st = os.stat(shard)
    listing = _shard_listing(shard)
    members = hashlib.sha1(json.dumps([listing["samples"], listing["cut"]]).encode("ascii")).hexdigest()[:16]
    key = f"{os.path.basename(shard)}|{st.st_size}|{st.st_mtime_ns}|{members}|{FORMAT}"
    path, record = cached_record("tar-scans", key)
    return path, key, record


def _record_shard_scan(where: tuple[Path, str, dict | None], bad: int) -> None:
    write_record(where[0], {"key": where[1], "bad": bad})


def scanned_bad(shards: list[str]) -> int | None:
    """The bad images the scans found in these tar shards, each scanned on its own or in any set (a folder, a pattern,
    another pattern over the same files): None when one of them has no scan of its current bytes. DALI reads every
    sample of a shard, so only 0 clears the shards for it."""
    total = 0
    for shard in shards:
        try:
            record = _shard_scan_path(shard)[2]
        except (OSError, ValueError):  # (a shard gone since it was named)
            return None
        if record is None or not isinstance(record.get("bad"), int):  # (none: the shards' up-to-date scan list, as
            return _from_scan_list(shards)  # an earlier fastmim kept it)
        total += record["bad"]
    return total


def _from_scan_list(shards: list[str]) -> int | None:
    """The bad images of an up-to-date scan list of exactly these shards (a folder's or a pattern's, scanned before
    the per-shard records): recorded per shard when it found none, so that any set of them is cleared from now on."""
    roots = {os.path.dirname(shards[0])} if len(shards) > 1 else {shards[0], os.path.dirname(shards[0])}
    for root in roots:
        try:
            found = find_scan(root) if os.path.isdir(root) or root.lower().endswith(".tar") else None
        except (OSError, ValueError):
            found = None
        if found is None:
            continue
        header, _ = _read_header(found, body=False)
        try:
            listed = list_tar_shards(header.root)
        except (OSError, ValueError):
            continue
        if listed is None or sorted(map(os.path.realpath, listed)) != sorted(map(os.path.realpath, shards)):
            continue
        if header.bad == 0:
            for shard in shards:
                _record_shard_scan(_shard_scan_path(shard), 0)
        return header.bad
    return None


def scan_format(path: str | Path) -> str:
    """The format of a scan list ("v1": written before the digest, checked by file count and newest time only)."""
    return "v1" if _read_header(Path(path), body=False)[0].digest is None else FORMAT


def scan_header(path: str | Path) -> tuple[str, int, int]:
    """(root, good images, bad images) from a scan list's header (its first line alone is read)."""
    header, _ = _read_header(Path(path), body=False)
    return header.root, header.images, header.bad


def _read_header(path: Path, body: bool = True) -> tuple[_Header, bytes]:
    """The parsed header and the rest of the file (b"" unless ``body``); ValueError naming what is wrong when it is
    not a scan list."""
    with open(path, "rb") as f:
        first = f.readline(65536)
        what = f"data path {str(path)!r} is a file but not a fastmim scan list"
        if not first.startswith(MAGIC.encode() + b" "):
            if is_image_file(str(path)):
                raise ValueError(f"data path {str(path)!r} is an image file; pass the folder that holds the images")
            raise ValueError(
                f"{what} (its first line is not a {MAGIC!r} header); pass a folder of images, or write a list of "
                "one with: python -m fastmim.data.scan FOLDER"
            )
        line = first.decode("utf-8", "surrogateescape").rstrip("\r\n")
        version = line[len(MAGIC) :].split()[:1]
        if not version or version[0] not in _READ_FORMATS:
            raise ValueError(
                f"scan list {str(path)!r} has format {' '.join(version) or '(none)'!r}; this fastmim reads "
                f"{' and '.join(_READ_FORMATS)}: scan the folder again"
            )
        m = _HEADER.fullmatch(line)
        if m is None:
            raise ValueError(f"scan list {str(path)!r} has a damaged header {line!r}: scan the folder again")
        try:
            mtime = float(m["mtime"])
        except ValueError:
            raise ValueError(f"scan list {str(path)!r} has a damaged header {line!r}: scan the folder again") from None
        header = _Header(m["root"], int(m["images"]), int(m["bad"]), int(m["files"]), mtime, m["digest"])
        return header, f.read() if body else b""


def _read(path: str | Path) -> tuple[_Header, list[str]]:
    path = Path(path)
    header, body = _read_header(path)
    text = body.decode("utf-8", "surrogateescape")
    rel = [line.removesuffix("\r") for line in text.split("\n")]
    rel = [r for r in rel if r]
    if len(rel) != header.images:
        raise ValueError(
            f"scan list {str(path)!r} names {len(rel)} images but its header says images={header.images} "
            "(cut short or edited): scan the folder again"
        )
    if not (header.root.lower().endswith(".tar") or is_shard_pattern(header.root)):  # a folder (of shards)
        prefix = os.path.join(header.root, "")  # (os.path.join per name: 2.5 s of ImageNet's list)
        return header, [r if r.startswith("/") else prefix + r for r in rel]
    base = shard_base(header.root)  # one tar shard or a pattern of them: its folder
    return header, [os.path.normpath(os.path.join(base, r)) for r in rel]


def read_file_list(path: str | Path) -> tuple[str, list[str]]:
    """The image root and the absolute paths of the images named by a scan list, in its order.

    Raises:
        ValueError: the file is not a scan list (what is wrong is in the message).
        FileNotFoundError: the list or the folder it was made for does not exist.
    """
    header, files = _read(path)
    try:
        shards = list_tar_shards(header.root)
    except (OSError, ValueError):  # a pattern that names a shard no longer there: a list of shards all the same
        shards = []
    if shards is not None:
        raise ValueError(
            f"scan list {str(path)!r} is of the tar shards {header.root!r}: pass the shards themselves as the data "
            "path (their scan clears them for DALI)"
        )
    if not os.path.isdir(header.root):
        raise FileNotFoundError(
            f"scan list {str(path)!r} was made for {header.root!r}, which is not a folder now (moved?): scan it again"
        )
    return header.root, files


def find_scan(root: str | Path) -> Path | None:
    """The default scan list of root when it exists and is up to date, else None. Up to date: root holds the same
    files, of the same sizes and times, as when it was scanned (a list without a digest: as many files, none newer
    than the newest then), and every listed image is still there."""
    resolved = _resolve(root)
    path = default_list_path(resolved)
    if not path.is_file():
        path = _list_path(resolved, ".txt")  # an earlier fastmim's (v1)
        if not path.is_file():
            return None
    try:
        header, files = _read(path)
    except (OSError, ValueError):
        return None
    if header.root != resolved:
        return None
    try:
        shards = list_tar_shards(resolved)
    except (OSError, ValueError):  # a pattern that names a shard no longer there
        return None
    if shards is not None and header.digest is None:  # v1: its fastmim did not list .jpe / .jfif members: scan again
        return None
    if shards is not None:  # tar shards: the same shards, none changed since
        newest, digest = _shard_stats(shards)
        if len(shards) != header.files or newest != header.mtime or header.digest not in (None, digest):
            return None
        known = set(shards)
        return path if all(split_sample_id(f)[0] in known for f in files) else None
    images, others, mtime, digest = _walk(resolved)
    if len(images) + len(others) != header.files or mtime != header.mtime or header.digest not in (None, digest):
        return None
    if header.digest is None and len(images) != header.images + header.bad:  # v1: images it did not read (.jfif)
        return None
    present = set(images)
    if not all(f in present for f in files):  # a rename keeps the count and mtime
        return None
    return path


def _printable(path: str) -> str:
    """A path as it prints on one line: quoted with escapes (repr) when it holds a line break, a control character
    or bytes that are not UTF-8 (which the file system gives as surrogates)."""
    if path.isprintable() and is_utf8_name(path):
        return path
    return repr(os.fsencode(path)) if not is_utf8_name(path) else repr(path)  # (the bytes of a non-UTF-8 name)


def format_summary(result: ScanResult) -> str:
    """The scan's findings for people: counts, each bad file as ``path: reason``, the list and how to use it."""
    lines = [
        f"scanned {result.files} files under {result.root}: {len(result.good)} good images, {len(result.bad)} bad, "
        f"{len(result.non_images)} non-image files"
    ]
    if result.bad:
        lines.append("bad files (left out of the list): " + ", ".join(f"{n} {r}" for r, n in result.counts().items()))
        lines += [f"  {_printable(p)}: {r}" for p, r in result.bad]
    if result.non_images:
        lines.append(f"{NON_IMAGE}, left out:")
        lines += [f"  {_printable(p)}" for p in result.non_images[:_MAX_PRINTED_NON_IMAGES]]
        if len(result.non_images) > _MAX_PRINTED_NON_IMAGES:
            lines.append(f"  ... and {len(result.non_images) - _MAX_PRINTED_NON_IMAGES} more (all in --report)")
    left_out = [f"{result.left_out[k]} {what}" for k, what in _LEFT_OUT.items() if result.left_out.get(k)]
    if left_out:
        lines.append("not read (the loaders do not read them either): " + ", ".join(left_out))
    lines.append(f"clean list of {len(result.good)} images: {result.list_path}")
    if result.good and list_tar_shards(result.root) is not None:  # tar shards are passed themselves, not the list
        data = shlex.quote(result.root)  # (a pattern of shards is passed in quotes)
        if result.bad:
            lines.append(f"DALI reads every sample of a shard, so it will not read these: rewrite the shards without "
                         f"the bad images, or train on them with python -m fastmim.pretrain --data-path {data} "
                         "--loader torch --skip-bad-files ...")  # fmt: skip
        else:
            lines.append(f"use them: python -m fastmim.pretrain --data-path {data} ... (DALI reads the shards: this "
                         "scan cleared them)")  # fmt: skip
    elif result.good:
        lines.append(f"use it: python -m fastmim.pretrain --data-path {shlex.quote(str(result.list_path))} ...")
    else:
        lines.append("no image decoded: the list is empty")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fastmim._args import ArgumentParser, expand_home

    parser = ArgumentParser(
        prog="python -m fastmim.data.scan",
        description="Decode every image below PATH; list the corrupt, truncated and non-image files; write a list of "
        "the good images, to pass as --data-path.",
    )
    parser.add_argument(
        "path",
        metavar="PATH",
        help="folder of images or of class folders; or webdataset tar "
        "shards: a .tar file, a folder of them, or a pattern in quotes ('DIR/train-{0000..0146}.tar')",
    )
    parser.add_argument("--out", help="where to write the list (default: the cache, where find_scan looks)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: the usable CPUs; 0 or 1: none)")
    parser.add_argument("--report", help="also write the findings as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    expand_home(vars(args), ("path", "out", "report"))
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 or more")
    try:
        from fastmim.train.progress import check_progress_setting

        check_progress_setting()
        result = scan(args.path, workers=args.workers, out=args.out, progress=not args.quiet)
        if args.report:
            _write_atomic(Path(args.report), json.dumps(result.to_json(), indent=1) + "\n")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (the list is written only when the scan finishes)", file=sys.stderr)
        return 130
    print(format_summary(result))
    if args.report:
        print(f"report: {args.report}")
    return 0 if result.good else 2  # no image decodes: nothing to train on, as unusable as no images at all


if __name__ == "__main__":
    for stream in (sys.stdout, sys.stderr):  # file names need not be valid UTF-8
        stream.reconfigure(errors="backslashreplace")
    sys.exit(main())
