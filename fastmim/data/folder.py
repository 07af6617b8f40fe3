"""Image folders: ImageNet-style class folders or a flat folder of images, read with PIL."""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import math
import os
import re
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastmim.data.pathlist import PathList

# seeded() swaps the process's CPU generator state: threads that draw crops in one process (an in-process loader in
# the GPU loader's thread, its fallbacks in the consumer's) take turns
_SEEDED_LOCK = threading.RLock()


def _new_seeded_lock() -> None:  # a forked loader worker must not inherit the lock held by another thread
    global _SEEDED_LOCK
    _SEEDED_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_seeded_lock)


def _pixel_limit() -> str | None:
    """FASTMIM_MAX_IMAGE_PIXELS: Pillow's limit against decompression bombs (``Image.MAX_IMAGE_PIXELS``; an image
    over twice it is refused), for data sets of large images (slides, satellite, panoramas); 0: no limit. Read at
    import, so loader workers and scan processes take it too; a value that is not a count is left unused and
    returned as the problem, which ``check_pixel_limit`` raises where data is read (not at import). Pillow's warning
    for an image over the limit (but under twice it) is not shown: the data set is the user's own (a filter set
    once for the process: ``warnings.catch_warnings`` around each decode would race with loader threads)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    text = os.environ.get("FASTMIM_MAX_IMAGE_PIXELS", "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        return f"FASTMIM_MAX_IMAGE_PIXELS must be a pixel count >= 0 (0: no limit), got {text!r}"
    Image.MAX_IMAGE_PIXELS = int(text) or None
    return None


_PIXEL_LIMIT_PROBLEM = _pixel_limit()


def check_pixel_limit() -> None:
    """ValueError for a FASTMIM_MAX_IMAGE_PIXELS that is not a pixel count."""
    if _PIXEL_LIMIT_PROBLEM:
        raise ValueError(_PIXEL_LIMIT_PROBLEM)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _up_the_tree(root: str | Path) -> set[str]:
    """The real paths of ``root`` and of every folder above it, as written and as its links resolve (its real path's
    too: ``link/..`` is above the link's target, not beside it as the text says): a folder holding the root, whose
    walk would lead back into it."""
    above: set[str] = set()
    written = Path(os.path.abspath(root))
    for q in (Path(os.path.realpath(root)), written, *written.parents):
        real = Path(os.path.realpath(q))
        above.update(str(r) for r in (real, *real.parents))
    return above


def _inside(real: str, folders: set[str] | frozenset, own: str) -> bool:
    """Whether the real path ``real`` is one of ``folders`` or below one before it is below ``own`` (the walk's
    root, which may be one of them: a folder inside it is its own, unless inside another of them first)."""
    if not folders:
        return False
    p = Path(real)
    for q in (p, *p.parents):
        if str(q) == own:
            return False
        if str(q) in folders:
            return True
    return False


def iter_files(root: str | Path, skipped: dict[str, int] | None = None, exclude: set[str] | frozenset = frozenset(),
               above: set[str] | None = None) -> Iterator[str]:  # fmt: skip
    """Every file below root, following symlinks, each folder once: a symlinked folder whose target was already
    walked (a second link to the same folder) or holds root (a link back up the tree: root, its parent or any folder
    above it) is not walked again, so a loop cannot repeat the images nor reach beyond root. Hidden files and folders
    (name starting with '.', such as macOS's ``._*`` AppleDouble files) are skipped. Unordered. ``exclude``: the real
    paths of folders not to walk, nor anything below them (a labelled folder's class folders: a class's walk stays
    out of the others'). ``above``: ``_up_the_tree(root)``, when the caller has it. ``skipped``: counts the folders
    not walked, under "walked twice" (again or up the tree) and "excluded"."""
    own = os.path.realpath(root)
    seen = {own}
    above = _up_the_tree(root) if above is None else above
    skipped = {} if skipped is None else skipped
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        hidden = sum(d.startswith(".") for d in dirnames)
        if hidden:
            skipped["hidden folders"] = skipped.get("hidden folders", 0) + hidden
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen or real in above:
                skipped["walked twice"] = skipped.get("walked twice", 0) + 1
            elif _inside(real, exclude, own):
                skipped["excluded"] = skipped.get("excluded", 0) + 1
            else:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        prefix = os.path.join(dirpath, "")  # (os.path.join per file: 2.5 s of 1.28M files' walk)
        paths = [prefix + f for f in filenames if not f.startswith(".")]
        if len(paths) != len(filenames):  # hidden files here: their images (not macOS's "._*" AppleDouble files,
            # which only carry metadata) counted for the note; a second pass over the names only in such folders
            hidden = sum(f.startswith(".") and not f.startswith("._") and is_image_file(f) for f in filenames)
            if hidden:
                skipped["hidden images"] = skipped.get("hidden images", 0) + hidden
        yield from paths


_NOTED: set[str] = set()  # the roots whose skipped entries were noted in this process


def _note_skipped(root: Path, skipped: dict[str, int]) -> None:
    """Says once per folder what the walk left out, so that a data set smaller than the files on disk is explained
    (a folder reached again through a link is not read twice; a labelled folder's link into another class's folder
    is not read as this class)."""
    key = str(root)
    if key in _NOTED or not any(skipped.get(k) for k in ("walked twice", "excluded", "hidden images",
                                                           "hidden folders")):  # fmt: skip
        return
    _NOTED.add(key)
    if skipped.get("walked twice"):
        print(f"note: {key}: {skipped['walked twice']} linked folder(s) lead to a folder already read or holding it (a "
              "link loop or back up the tree, or a second link to the same folder): their images are read once",
              file=sys.stderr, flush=True)  # fmt: skip
    if skipped.get("excluded"):
        print(f"note: {key}: {skipped['excluded']} folder(s) in a class folder lead into another class's folder (a "
              "link, or class folders inside one another): not read there (an image is labelled by its own class "
              "folder alone)", file=sys.stderr,
              flush=True)  # fmt: skip
    if skipped.get("hidden images") or skipped.get("hidden folders"):
        what = [f"{skipped[k]} {k[len('hidden '):].rstrip('s')}(s)" for k in ("hidden images", "hidden folders")
                if skipped.get(k)]  # fmt: skip
        print(f"note: {key}: hidden files and folders (names starting with '.') are not read: {' and '.join(what)} "
              "left out", file=sys.stderr, flush=True)  # fmt: skip


def extension_counts(paths: list[str], most: int = 6) -> str:
    """The files' extensions with their counts, most common first: ".gif 3, .txt 1" ("(none)" for no extension)."""
    counts: dict[str, int] = {}
    for p in paths:
        ext = os.path.splitext(p)[1].lower() or "(none)"
        counts[ext] = counts.get(ext, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{e} {n}" for e, n in ranked[:most])
    return text + (f" and {len(ranked) - most} more kinds" if len(ranked) > most else "")


_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")


def _tar_hint(others: list[str]) -> str:
    """What to do about tar shards among files not read as images (compressed ones; ones beside images or in
    subfolders): "" when there are none."""
    if any(o.lower().endswith(_COMPRESSED_TARS) for o in others):
        return ("; if the compressed tars are webdataset shards, decompress them to read them (uncompressed tars, as "
                "DALI reads them)")  # fmt: skip
    if any(o.lower().endswith(".tar") for o in others):
        return ("; if the .tar files are webdataset shards, pass a .tar file, a folder holding them directly with "
                "no images below it, or a pattern of them in quotes ('DIR/train-{0000..0146}.tar', "
                "'DIR/*/*.tar')")  # fmt: skip
    return ""


def note_other_files(root: str | Path, others: list[str]) -> None:
    """Says once per folder how many files were not read as images, by extension, so that a format fastmim does not
    read (.gif, .heic, ...) is not left out unseen."""
    key = f"others:{root}"
    if not others or key in _NOTED or os.environ.get("RANK", "0") != "0":  # (once per run: rank 0 says it)
        return
    _NOTED.add(key)
    print(f"note: {str(root)}: {len(others)} file(s) without an image extension ({', '.join(IMG_EXTENSIONS)}) "
          f"not read: {extension_counts(others)}{_tar_hint(others)}", file=sys.stderr, flush=True)  # fmt: skip


class NotRegularFileError(OSError):
    """A named pipe, socket or device with an image's name: ``open_regular`` refuses it."""


def open_regular(path: str | Path):
    """``open(path, "rb")`` of a regular file; a named pipe, socket or device with an image's name raises OSError at
    once (opened plainly, a pipe blocked the scan or a loader until a writer came: for ever, through Ctrl-C)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file (a named pipe, socket or device)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def decode_problem(e: Exception, src: str | Path | bytes) -> str:
    """What is wrong with an image file (a path, or its bytes) that PIL could not open or decode, in words (PIL's own
    text names a BytesIO object by its address, or the path a second time)."""
    try:
        if isinstance(src, (bytes, bytearray)):
            empty = len(src) == 0
        else:
            st = os.stat(src)
            empty = stat.S_ISREG(st.st_mode) and st.st_size == 0  # (a named pipe's size is 0 too)
    except OSError:
        empty = False
    if isinstance(e, NotRegularFileError):
        return e.strerror
    if empty:
        return "empty file (0 bytes)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (PIL cannot identify its format)"
    text = " ".join(str(e).split()).rstrip(".") or type(e).__name__
    if isinstance(e, Image.DecompressionBombError):
        text += " (Pillow's guard against decompression bombs; FASTMIM_MAX_IMAGE_PIXELS=N raises it, 0 removes it)"
    return text


def open_rgb(src: str | Path | bytes, name: str) -> Image.Image:
    """The 8-bit RGB image (``to_rgb``) of a file or of its bytes; ``BadImageError`` naming ``name`` and what is
    wrong when it cannot be read."""

    def read() -> Image.Image:
        if isinstance(src, (bytes, bytearray)):
            with Image.open(io.BytesIO(src)) as img:
                return to_rgb(img)
        with open_regular(src) as f, Image.open(f) as img:
            return to_rgb(img)

    try:
        try:
            return read()
        except Image.DecompressionBombWarning:  # warnings made errors (or fastmim's filter reset): read it as Pillow
            with warnings.catch_warnings():  # would without them (only on this rare path: the filter is per process)
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return read()
    except Exception as e:  # PIL raises several types for truncated or non-image files
        raise BadImageError(f"cannot read image {str(name)!r}: {decode_problem(e, src)}", str(name)) from e


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image. 16-bit and 32-bit grey (modes I;16*, I, F) are scaled to 8 bits first: PIL's
    convert("RGB") clips them at 255, turning a 16-bit PNG white."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255) else 255.0
        if img.mode == "F":  # floats: their own range
            lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
            a, top = a - lo, max(hi - lo, 1e-12)
        img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def is_utf8_name(name: str) -> bool:
    """Whether a file name decoded from the file system (its bytes that are not UTF-8 become surrogates) is UTF-8."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def list_images(root: str | Path) -> list[str]:
    """All image files below root (recursively, following class folders), sorted for a stable order; or, when root
    is a file, the images named by that scan list (``python -m fastmim.data.scan``), in its order.

    Raises:
        FileNotFoundError: root does not exist, or a scan list's image folder does not.
        NotADirectoryError: root is neither a directory nor a file.
        ValueError: root holds no image file, or is a file but not a valid scan list.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist")
    if root.is_file():
        from fastmim.data.scan import read_file_list  # scan imports this module

        if root.name.lower().endswith(_COMPRESSED_TARS):
            raise ValueError(f"data path {str(root)!r} is a compressed tar shard{_tar_hint([root.name])}")
        image_root, files = read_file_list(root)
        if not files:
            raise ValueError(
                f"scan list {str(root)!r} holds no images (every image under {image_root!r} failed the scan)"
            )
        return files
    if not root.is_dir():
        raise NotADirectoryError(f"data path {str(root)!r} is not a directory")
    skipped: dict[str, int] = {}
    files, others = [], []
    for f in iter_files(root, skipped):
        (files if is_image_file(f) else others).append(f)
    _note_skipped(root, skipped)
    if files:
        note_other_files(root, others)
    else:
        held = f"; it holds {len(others)} other file(s): {extension_counts(others)}" if others else ""
        held += _tar_hint(others)
        raise ValueError(f"data path {str(root)!r} holds no images (looked for {', '.join(IMG_EXTENSIONS)}){held}")
    return sorted(files)


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded. Raised in a loader worker, it reaches the training process as
    this type with the worker's traceback as its message; ``summary()`` is the one line that names the file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path

    def summary(self) -> str:
        lines = [ln.strip() for ln in str(self).splitlines() if "cannot read image " in ln]
        line = lines[-1] if lines else str(self).strip().splitlines()[-1]
        return line.split("BadImageError: ", 1)[-1]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabelled images for masked-modeling pretraining; item i is ``transform(RGB image)``.

    Args:
        root: folder of images or of class folders of images, or a scan list of one (``python -m fastmim.data.scan``:
            the images that decode, so a corrupt file cannot stop a run).
        transform: applied to each PIL image.
        seed: when given, the transform's random draws for sample i in epoch e come from a generator seeded by
            (seed, e, i), whichever process or worker loads it: augmentations do not depend on the number of
            loader workers, and a run resumed mid-epoch sees exactly the crops it would have seen.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, seed: int | None = None):
        check_pixel_limit()
        self.root = str(root)
        # (packed, so that forked loader workers reading it do not each copy a Python list of every name)
        self.files: Sequence[str] = PathList(self._list(root))
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def _list(self, root: str | Path) -> list[str]:
        files = list_images(root)
        note_split_folders(root, files)
        return files

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's augmentation seeds (call before creating the loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def read_bytes(self, index: int) -> bytes:
        """The encoded file of sample ``index``; ``BadImageError`` naming it when it cannot be read."""
        path = self.files[index]
        try:
            with open_regular(path) as f:
                return f.read()
        except OSError as e:
            raise BadImageError(f"cannot read image {path!r}: {e.strerror or e}", path) from e

    def load(self, index: int) -> Image.Image:
        return open_rgb(self.files[index], self.files[index])

    @contextlib.contextmanager
    def seeded(self, index: int):
        """Within it, torch's random draws for sample ``index`` in this epoch are those of a generator seeded by
        (seed, epoch, index) (unseeded when ``seed`` is None); the process's RNG (masks, dropout) is left as it was."""
        if self.seed is None:
            yield
            return
        with _SEEDED_LOCK, torch.random.fork_rng(devices=[]):  # one thread at a time: the generator is global
            # the CPU generator only: torch.manual_seed would reseed the CUDA generators too (drop path, noise),
            # which fork_rng(devices=[]) does not restore (this runs in the training process for the monitor and
            # the GPU loader's fallbacks)
            torch.random.default_generator.manual_seed(self._sample_seed(index))
            yield

    def _sample_seed(self, index: int) -> int:
        from fastmim.masking.rng import sample_seed

        return sample_seed(self.seed, self.epoch, index)

    def generator(self, index: int) -> torch.Generator | None:
        """A CPU generator in the state ``seeded(index)`` puts torch's global one in (None when ``seed`` is None):
        for draws made with an explicit generator (``crop_and_flip``), which leave the global generator, and any
        other thread's draws from it, alone."""
        return None if self.seed is None else torch.Generator().manual_seed(self._sample_seed(index))

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is None:
            return img
        with self.seeded(index):
            return self.transform(img)


_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_SHARD_NAMES = 1_000_000  # (what a pattern may expand to: a typo's {0..99999999} is refused, not built)


def is_shard_pattern(path: str | Path) -> bool:
    """Whether ``path`` is a pattern of tar shards, as webdataset takes them: braces (``train-{0000..0146}.tar``,
    ``{train,extra}-*.tar``) or glob characters (``shards/*/*.tar``) in a path that ends in ``.tar`` (or ``*``) and
    does not itself exist."""
    text = os.fspath(path)
    if not text.lower().endswith((".tar", "*")) or os.path.exists(text):
        return False
    return "{" in text or bool(_GLOB_CHARS.search(text))


def _brace_items(body: str, pattern: str, count: bool = False):
    """The alternatives of one brace group, as bash expands it: ``a,b``; ``LO..HI[..STEP]`` of integers (zero-padded
    to the wider end when an end has a leading zero, as webdataset's braceexpand pads) or of letters. None for a
    group bash leaves as it is (``{x}``). ``count``: how many, without making them."""
    ints = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
    letters = re.fullmatch(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?", body)
    if ints or letters:
        m = ints or letters
        lo, hi = (int(m[1]), int(m[2])) if ints else (ord(m[1]), ord(m[2]))
        step = abs(int(m[3] or 1)) or 1
        values = range(lo, hi + 1, step) if hi >= lo else range(lo, hi - 1, -step)
        if count:
            return len(values)
        if letters:
            return [chr(v) for v in values]
        pad = max(len(m[1]), len(m[2])) if re.match(r"-?0\d", m[1]) or re.match(r"-?0\d", m[2]) else 0
        return [f"{v:0{pad}d}" for v in values]
    if "," not in body:
        return None
    return body.count(",") + 1 if count else body.split(",")


def _expand_braces(pattern: str) -> list[str]:
    """Bash's brace expansion of ``pattern``, in order (``_brace_items``); several groups multiply. Nested braces are
    refused, as is an expansion to over a million names (counted before any is made)."""
    total = math.prod(
        n or 1 for n in (_brace_items(b, pattern, count=True) for b in re.findall(r"\{([^{}]*)\}", pattern))
    )
    if total > _MAX_SHARD_NAMES:
        raise ValueError(f"shard pattern {pattern!r} expands to over {_MAX_SHARD_NAMES:,} names")
    parts: list[list[str]] = []
    literal, i = "", 0
    while i < len(pattern):
        if pattern[i] == "}":
            raise ValueError(f"shard pattern {pattern!r} has an unmatched '}}'")
        if pattern[i] != "{":
            literal += pattern[i]
            i += 1
            continue
        end = pattern.find("}", i)
        if end == -1:
            raise ValueError(f"shard pattern {pattern!r} has an unmatched '{{'")
        body = pattern[i + 1 : end]
        if "{" in body:
            raise ValueError(f"shard pattern {pattern!r}: nested braces are not expanded; write the names out")
        items = _brace_items(body, pattern)
        if items is None:  # ({x}: kept as it is, as bash keeps it)
            literal += pattern[i : end + 1]
        else:
            parts += [[literal], items]
            literal = ""
        i = end + 1
    parts.append([literal])
    return ["".join(p) for p in itertools.product(*parts)]


def absolute_data_path(path: str) -> str:
    """``path`` made absolute, as a run's config keeps it (a resume from another directory reads the same data): a
    pattern of shards is joined to the working directory unless it is absolute or its first brace group's
    alternatives all are (not normalised: a ``..`` inside braces belongs to its alternative)."""
    if not is_shard_pattern(path):
        return os.path.abspath(path)
    if path.startswith("{") and "}" in path:
        items = _brace_items(path[1 : path.index("}")], path) or []
        if items and all(os.path.isabs(i) for i in items):
            return path
    path = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    # the folders before the first brace or glob normalised ("/./", "//", ".."), as os.path.abspath does a path's
    head = path[: min((path.find(c) for c in "{*?[" if c in path), default=len(path))]
    cut = head.rfind("/")
    return os.path.normpath(head[:cut]) + path[cut:] if cut > 0 else path


def _glob_tars(name: str) -> list[str]:
    """The .tar files a glob matches, sorted (hidden ones left out, as glob leaves them); the folders of its longest
    prefix that exists are taken as they are (a folder named ``set[v2]`` is not a character class)."""
    import glob

    head = name
    while head and not os.path.exists(head) and os.path.dirname(head) != head:
        head = os.path.dirname(head)
    pattern = glob.escape(head) + name[len(head) :] if head and os.path.exists(head) else name
    return [p for p in sorted(glob.glob(pattern)) if p.lower().endswith(".tar") and os.path.isfile(p)]


def expand_shard_pattern(pattern: str | Path) -> list[str]:
    """The tar shards a pattern names (``is_shard_pattern``), in the pattern's order: every name a brace expands to
    must be a .tar file; a glob takes the .tar files it matches, sorted (hidden ones left out).

    Raises:
        FileNotFoundError: a named shard is missing, or a glob matches no .tar file.
        ValueError: the pattern is malformed, or names something other than a .tar file.
    """
    text = os.fspath(pattern)
    shards, missing, seen = [], [], set()
    for name in _expand_braces(text):
        if os.path.exists(name) or not _GLOB_CHARS.search(name):
            if not os.path.exists(name):
                missing.append(name)
                continue
            if not (name.lower().endswith(".tar") and os.path.isfile(name)):
                raise ValueError(f"shard pattern {text!r} names {name!r}, which is not a .tar file: a pattern names "
                                 "webdataset tar shards only")  # fmt: skip
            found = [name]
        else:
            found = _glob_tars(name)
            if not found:
                missing.append(name)
        for p in found:
            if p not in seen:
                seen.add(p)
                shards.append(p)
    if missing:
        what = "match no .tar file" if all(_GLOB_CHARS.search(n) for n in missing) else "do not exist"
        named = ", ".join(repr(n) for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
        folder = os.path.dirname(missing[0]) or "."
        try:
            there = sorted(n for n in os.listdir(folder) if n.lower().endswith(".tar"))
        except OSError:  # (missing, or a folder that may be entered but not listed)
            there = []
        held = (f"; {folder} holds {len(there)} .tar file(s): {there[0]} ... {there[-1]}" if len(there) > 1 else
                f"; {folder} holds {there[0]}" if there else "")  # fmt: skip
        raise FileNotFoundError(
            f"shard pattern {text!r}: {len(missing)} of the names it expands to {what}: {named}{held}"
        )
    return shards


def _shard_families(shards: list[str]) -> dict[str, list[str]]:
    """The shards' names grouped by their name with every run of digits taken out ("train-#-of-#.tar")."""
    families: dict[str, list[str]] = {}
    for s in shards:
        name = os.path.basename(s)
        families.setdefault(re.sub(r"\d+", "#", name), []).append(name)
    return families


def _family_pattern(names: list[str]) -> str:
    """A glob of one family's names: each run of digits kept where the names share it, else ``*``."""
    split = [re.split(r"(\d+)", n) for n in names]
    return "".join(p if k % 2 == 0 or all(q[k] == p for q in split) else "*" for k, p in enumerate(split[0]))


_SPLITS = ("val", "validation", "valid", "test")  # the held-out splits of a download that sit beside its train/


def note_split_folders(root: str | Path, files: Sequence[str]) -> None:
    """Says (once, rank 0) when a folder read for pretraining holds a train/ split and a held-out one (val/, ...)
    with images in both: all of them are read, the held-out images too. ``root``: the folder, or its scan list."""
    if not files or f"splits:{root}" in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    if os.path.isfile(root):  # a scan list (DALI reads a scanned folder through it): the folder its images are in
        root = os.path.commonpath([files[0], files[len(files) // 2], files[-1]])
    try:  # (the folder's own entries first: the names are counted only where the splits are there)
        if not any(n.lower() == "train" for n in os.listdir(root)):
            return
    except OSError:
        return
    base = os.path.join(str(root), "")
    counts: dict[str, int] = {}
    for f in files:
        top = f[len(base) :].split(os.sep, 1)[0] if f.startswith(base) else ""
        if top.lower() in ("train", *_SPLITS):
            counts[top] = counts.get(top, 0) + 1
    train = next((t for t in counts if t.lower() == "train"), None)
    held = [t for t in counts if t.lower() in _SPLITS]
    if train is None or not held:
        return
    _NOTED.add(f"splits:{root}")
    said = ", ".join(f"{t}/ ({counts[t]} images)" for t in [train, *held])
    print(f"note: {str(root)} holds the splits {said}, all read for pretraining; to pretrain on the training images "
          f"alone (the others held out for evaluation), pass --data-path {os.path.join(str(root), train)}",
          file=sys.stderr, flush=True)  # fmt: skip


def note_shard_families(root: str | Path, shards: list[str]) -> None:
    """Says (once, rank 0) when a folder's shards are of several name families, such as the train and validation
    shards of one download side by side: all of them are read, and a pattern picks some."""
    families = _shard_families(shards)
    key = f"families:{root}"
    # only families of a numbered scheme, a run of digits standing as a part of the name ("train-#.tar", "#.tar"),
    # count: names of none (a.tar, b.tar; content hashes such as 3f9a2c.tar) make a family each, not worth a note
    numbered = [t for t in families if re.search(r"(^|[-_.])#([-_.]|$)", t)]
    if len(numbered) < 2 or key in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    _NOTED.add(key)
    ranked = sorted(families.values(), key=lambda names: -len(names))
    named = ", ".join(f"{_family_pattern(n)} ({len(n)})" for n in ranked[:4])
    example = os.path.join(str(root), _family_pattern(ranked[0]))
    print(f"note: {str(root)}: the {len(shards)} tar shards are of {len(families)} name families, all read: {named}"
          f"{' ...' if len(families) > 4 else ''}; to read some (the training shards of a download that also holds "
          f"the validation ones), pass a pattern in quotes, e.g. '{example}'",
          file=sys.stderr, flush=True)  # fmt: skip


def list_tar_shards(root: str | Path) -> list[str] | None:
    """The webdataset tar shards ``root`` names: a ``.tar`` file; a folder holding ``.tar`` files and no images
    (sorted); or a pattern of them (``expand_shard_pattern``). None for anything else (an image folder or a scan
    list).

    Raises:
        FileNotFoundError, ValueError: a pattern that names no shard, or a missing one (``expand_shard_pattern``).
    """
    if is_shard_pattern(root):
        return expand_shard_pattern(root)
    root = Path(root)
    if root.is_file():
        return [str(root)] if root.suffix.lower() == ".tar" else None
    if not root.is_dir():
        return None
    tars = sorted(str(p) for p in root.iterdir() if p.suffix.lower() == ".tar" and not p.name.startswith(".")
                  and p.is_file())  # fmt: skip
    if not tars or any(is_image_file(p) for p in iter_files(root)):
        return None
    return tars


def shard_base(root: str) -> str:
    """The folder a scan list of shards names its samples relative to: the folder itself, else the .tar file's or the
    pattern's folder (a pattern's samples are joined to it and normalised: ``../`` where the pattern has braces or
    globs in a folder's name)."""
    return root if os.path.isdir(root) else os.path.dirname(root)


# a webdataset image component: DALI's extension is everything after the first dot of the member's base name,
# matched exactly: these (lower or upper case) are the ones its webdataset reader is asked for
TAR_IMAGE_EXTS = tuple(e for x in IMG_EXTENSIONS for e in (x[1:], x[1:].upper()))
_SAMPLE_ID = re.compile(r"(.*?\.tar):(\d+):(.*)", re.S)


def split_sample_id(sample: str) -> tuple[str, int, str]:
    """(shard, data offset, member) of a tar sample id ``"shard:offset:member"`` (the member may hold ':')."""
    m = _SAMPLE_ID.fullmatch(sample)
    if m is None:
        raise ValueError(f"{sample!r} is not a tar sample id (shard.tar:offset:member)")
    return m[1], int(m[2]), m[3]


_TAR_LISTING = "v1"  # the cached listing's format (and what it lists): another value lists the shards again


def _read_shard(shard: str) -> dict:
    """One shard's image samples as ``list_tar_samples`` takes them: {"samples": [[data offset, size, member], ...],
    "left_out": [image members webdataset does not read], "cut": whether the shard ends inside a member}."""
    import tarfile

    samples, left_out, keys, cut = [], [], {}, False
    try:
        tar = tarfile.open(shard, "r:")
    except tarfile.ReadError as e:
        what = "an empty file (0 bytes)" if os.path.getsize(shard) == 0 else f"not an uncompressed tar file ({e})"
        raise ValueError(f"tar shard {shard!r} is {what}: re-write or remove it") from e
    with tar:
        try:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile() or "." not in base or base.split(".", 1)[1] not in TAR_IMAGE_EXTS:
                    # what DALI's reader skips too (a dotted base name, an odd-case extension, a link): said
                    # below where it looks like an image, so a folder and its shards are not silently different
                    if (m.isfile() or m.issym() or m.islnk()) and base.rsplit(".", 1)[-1].lower() in \
                            {e.lstrip(".") for e in IMG_EXTENSIONS}:  # fmt: skip
                        left_out.append(m.name)
                    continue
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                if key in keys:
                    raise ValueError(
                        f"tar shard {shard!r}: sample {key!r} holds two images ({keys[key]}, {m.name}): a sample "
                        "is one image; rename the other's extension (KEY.mask.png, say), which leaves it out"
                    )
                keys[key] = m.name
                samples.append([m.offset_data, m.size, m.name])
        except tarfile.ReadError:  # the shard ends inside a member or a header (an interrupted download or copy):
            cut = True  # its members up to there are read; a member cut short is a bad file when read
    return {"samples": samples, "left_out": left_out, "cut": cut}


def _shard_listing(shard: str) -> dict:
    """``_read_shard``, kept in the fastmim cache (``tar-lists/``) keyed by the shard's real path, size and time: a
    start-up (every rank's, every resume's) reads one small file per shard instead of every member's header (Python's
    tarfile: 8.4 s for 128k samples from the page cache, scattered reads through the whole shard from a disk)."""
    from fastmim.data.samples import cached_record, write_record

    st = os.stat(shard)
    # (the inode and the change time too: a shard rewritten with the same size and its time restored, as rsync -a or
    # cp -p leave it, moves its members; ctime cannot be set back)
    key = (f"{os.path.realpath(shard)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}|{_TAR_LISTING}|"
           f"{','.join(TAR_IMAGE_EXTS)}")  # fmt: skip
    path, listing = cached_record("tar-lists", key)
    if listing is None:
        listing = {"key": key, **_read_shard(shard)}
        write_record(path, listing)
    return listing


def list_tar_samples(shards: list[str]) -> tuple[list[str], list[int]]:
    """(ids, sizes) of every image of the tar shards, in shard and member order. An id is
    ``"shard:offset:member"``, DALI's ``source_info`` of a webdataset sample (offset: the member's data). One image
    per sample key (webdataset: the member name up to the first dot of its base name); uncompressed tars only (as
    DALI reads them). Each shard's listing is cached (``_shard_listing``)."""
    samples, sizes, left_out, cut = [], [], [], []
    for shard in shards:
        listing = _shard_listing(shard)
        for offset, size, name in listing["samples"]:
            samples.append(f"{shard}:{offset}:{name}")
            sizes.append(size)
        left_out += listing["left_out"]
        if listing["cut"]:
            cut.append(shard)
    if cut and os.environ.get("RANK", "0") == "0":
        print(f"note: {len(cut)} tar shard(s) end inside a member (truncated: an interrupted download or copy?): "
              f"{', '.join(repr(c) for c in cut[:3])}{' ...' if len(cut) > 3 else ''}; their members up to the cut "
              "are read (python -m fastmim.data.scan names the one cut)", file=sys.stderr, flush=True)  # fmt: skip
    if left_out and os.environ.get("RANK", "0") == "0":  # (said once, not by every process)
        print(f"note: {len(left_out)} image member(s) of the tar shards left out, as webdataset and DALI read them "
              f"(a sample is KEY.EXT: the base name up to its first dot, a lower- or upper-case extension, a regular "
              f"file): {', '.join(repr(n) for n in left_out[:3])}{' ...' if len(left_out) > 3 else ''}; rename them to "
              "read them", file=sys.stderr, flush=True)  # fmt: skip
    if not samples:
        raise ValueError(f"the tar shards {shards[0]!r}... hold no images (looked for {', '.join(IMG_EXTENSIONS)})")
    return samples, sizes


def dataset_digest(dataset) -> str | None:
    """A hash of a data set's file names (``files``), in the order samples are indexed, relative to their common
    folder: the same files wherever the folder is (copied elsewhere), and the same after a file is replaced at its
    path (how a bad file is fixed; a tar sample's id without its offset, which a replaced member moves); another after
    a file is added, removed or renamed. None for a data set without a file list. Kept on the data set (1.3 s for
    1.28M names)."""
    import hashlib

    files = getattr(dataset, "files", None)
    if not files:
        return None
    known = getattr(dataset, "_fastmim_digest", None)
    if known is not None and known[0] is files:
        return known[1]
    names = files
    if isinstance(dataset, TarShardDataset):  # shard:offset:member -> shard:member
        names = [f"{shard}:{member}" for shard, _, member in map(split_sample_id, files)]
    # (every path lies below the common folder of the least and the greatest: their common text up to its last '/',
    # as written; os.path.commonpath would drop a '.' or an empty part of a path spelled with "/./" or "//")
    common = os.path.commonprefix([min(names), max(names)]) if len(names) > 1 else names[0]
    cut = common.rfind("/") + 1
    h = hashlib.sha1()
    for f in names:
        h.update(f[cut:].encode("utf-8", "surrogateescape") + b"\n")
    digest = h.hexdigest()[:16]
    with contextlib.suppress(AttributeError):  # (a data set with __slots__)
        dataset._fastmim_digest = (files, digest)
    return digest


class TarShardDataset(ImageFolderDataset):
    """The images of webdataset tar shards (``list_tar_samples``), read by seeking to each member: a map-style
    dataset like ``ImageFolderDataset``; ``files[i]`` is ``"shard:offset:member"``."""

    def _list(self, root: str | Path) -> list[str]:
        shards = list_tar_shards(root)
        if shards is None:
            raise ValueError(
                f"data path {str(root)!r} is not a .tar file, a folder of .tar shards or a pattern of them"
            )
        self.shards = shards
        if os.path.isdir(root):
            note_shard_families(root, shards)
        files, sizes = list_tar_samples(shards)
        self.sizes = np.asarray(sizes, dtype=np.int64)  # (each member's size; an array, as files is packed)
        return files

    def read_bytes(self, index: int) -> bytes:
        name = self.files[index]
        shard, offset, _ = split_sample_id(name)
        try:
            size = int(self.sizes[index])
            with open(shard, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise BadImageError(f"cannot read image {name!r}: {e}", name) from e
        if len(data) != size:
            raise BadImageError(f"cannot read image {name!r}: the shard ends {size - len(data)} bytes "
                                "into it (truncated since it was listed?)", name)  # fmt: skip
        return data

    def load(self, index: int) -> Image.Image:
        return open_rgb(self.read_bytes(index), self.files[index])
