"""The dataset scan: each bad file found with its reason, a clean list both loaders accept, the CLI's exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastmim.data.folder import ImageFolderDataset, list_images
from fastmim.data.scan import default_list_path, find_scan, format_summary, main, read_file_list, scan
from fastmim.data.transforms import eval_transform
from tests.conftest import ROOT, make_image_folder

# planted file -> the reason the scan must give (None: a good image)
PLANTED = {
    "class0/corrupt.jpg": "corrupt",
    "class0/truncated.jpg": "truncated",
    "class1/random.jpg": "not an image",
    "class1/empty.jpg": "empty",
    "class1/no_eoi.jpg": "truncated",  # the end-of-image marker cut off: DALI rejects it, PIL decodes it
    "class1/padded.jpg": None,  # zero padding after the end-of-image marker is allowed
    "class1/trailer.jpg": None,  # so are bytes after it (camera trailers): DALI decodes those
    "class0/gif.jpg": "not a format DALI decodes (GIF)",  # PIL opens by content; DALI stops on a GIF
    "class1/no_iend.png": "truncated",  # a PNG without its end chunk: load() passes it, DALI does not
}


def make_planted_folder(root: Path) -> tuple[Path, list[str]]:
    """Good JPEGs and PNGs plus the PLANTED files and a notes.txt; returns (root, sorted good image paths)."""
    make_image_folder(root, n=6, size=(40, 48))
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / f"class{i}" / f"p{i}.png")
    jpeg = (root / "class0" / "img000.jpg").read_bytes()
    corrupt = bytearray(jpeg)
    dqt = jpeg.index(b"\xff\xdb")  # the quantisation table header, overwritten: identifiable, not decodable
    corrupt[dqt : dqt + 40] = bytes(40)
    (root / "class0" / "corrupt.jpg").write_bytes(bytes(corrupt))
    (root / "class0" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "class1" / "random.jpg").write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    (root / "class1" / "empty.jpg").write_bytes(b"")
    (root / "class1" / "no_eoi.jpg").write_bytes(jpeg[:-2])
    (root / "class1" / "trailer.jpg").write_bytes(jpeg + b"trailer" * 10)
    (root / "class1" / "padded.jpg").write_bytes(jpeg + b"\x00" * 7 + b"\n")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "class0" / "gif.jpg", "GIF")
    png = (root / "class0" / "p0.png").read_bytes()
    (root / "class1" / "no_iend.png").write_bytes(png[:-12])
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skipped.jpg").write_bytes(b"")  # hidden folders are never read
    bad = {str(root / p) for p, r in PLANTED.items() if r is not None}
    good = sorted(p for p in list_images(root) if p not in bad)
    return root, good


@pytest.fixture
def planted(tmp_path):
    return make_planted_folder(tmp_path.resolve() / "data")


def test_scan_names_each_bad_file_and_lists_the_good_ones(planted, tmp_path):
    root, good = planted
    result = scan(root, workers=0, out=tmp_path / "list.txt", progress=False)
    assert result.root == str(root)
    assert result.good == good and len(good) == 10  # 6 JPEGs, 2 PNGs, the padded and trailer JPEGs
    reasons = {os.path.relpath(p, root): r for p, r in result.bad}
    assert set(reasons) == {p for p, r in PLANTED.items() if r is not None}
    for path, reason in reasons.items():
        expected = PLANTED[path]
        assert reason == expected or reason.startswith(f"{expected}: "), (path, reason)
    assert reasons["class0/corrupt.jpg"] != "corrupt: "  # carries PIL's message
    assert result.non_images == [str(root / "notes.txt")]
    assert result.files == len(good) + len(reasons) + 1
    assert result.counts() == {"truncated": 3, "corrupt": 1, "not an image": 1, "empty": 1,
                               "not a format DALI decodes (GIF)": 1}  # fmt: skip


def test_list_round_trips_and_loads_as_a_dataset(planted, tmp_path):
    root, good = planted
    out = tmp_path / "lists" / "clean.txt"
    result = scan(root, workers=0, out=out, progress=False)
    assert result.list_path == out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith(f"# fastmim-scan v2 root={root} images=10 bad=7 files=18 mtime=")
    assert lines[1:] == [os.path.relpath(p, root) for p in good]
    assert read_file_list(out) == (str(root), good)
    assert not [p for p in os.listdir(out.parent) if p != "clean.txt"]  # no temporary file left behind
    ds = ImageFolderDataset(out, transform=eval_transform(32))
    assert ds.files == good and len(ds) == 10
    assert tuple(ds[len(ds) - 1].shape) == (3, 32, 32)


def test_find_scan_is_up_to_date_until_the_folder_changes(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    root, good = planted
    assert find_scan(root) is None
    result = scan(root, workers=0, progress=False)
    assert result.list_path == default_list_path(root) and result.list_path.is_relative_to(tmp_path / "cache")
    assert find_scan(root) == result.list_path
    os.rename(good[0], good[0] + ".jpg")  # same count and mtimes, but a listed image is gone
    assert find_scan(root) is None
    os.rename(good[0] + ".jpg", good[0])
    assert find_scan(root) == result.list_path
    (root / "class0" / "new.png").write_bytes((root / "class0" / "p0.png").read_bytes())
    assert find_scan(root) is None


def test_a_file_replaced_with_an_old_time_makes_the_scan_out_of_date(planted, tmp_path, monkeypatch):
    """cp -p, rsync -a, tar x or touch -d give a rewritten file an old time: the newest time and the count stay, the
    listed names too; the digest of sizes and times sees it (the auto loader would otherwise send a bad file to
    DALI). Times and sizes put back as they were (a copy that keeps them) find the scan again; a list written before
    the digest (no such field) is checked as before."""
    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    root, good = planted
    result = scan(root, workers=0, progress=False)
    target = good[0]
    st = os.stat(target)
    original = Path(target).read_bytes()
    Path(target).write_bytes((root / "class0" / "truncated.jpg").read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # a second older than it was
    assert find_scan(root) is None
    Path(target).write_bytes(original)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert find_scan(root) == result.list_path
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # the same bytes, another time: a change too
    assert find_scan(root) is None
    lines = result.list_path.read_text().split("\n")
    assert lines[0].rsplit(" ", 1)[1].startswith("digest=")
    older = lines[0].rsplit(" ", 1)[0].replace(" v2 ", " v1 ")  # an older fastmim's list: v1, no digest
    result.list_path.write_text("\n".join([older, *lines[1:]]))
    assert find_scan(root) == result.list_path  # (the newest time and the count are unchanged)
    assert read_file_list(result.list_path)[1] == good


def test_workers_give_the_same_result_as_in_process(planted, tmp_path):
    root, _ = planted
    one = scan(root, workers=0, out=tmp_path / "a.txt", progress=False)
    two = scan(root, workers=2, out=tmp_path / "b.txt", progress=False)
    assert (two.good, two.bad, two.non_images) == (one.good, one.bad, one.non_images)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()


def test_in_process_scan_leaves_pil_truncation_setting_alone(planted, tmp_path, monkeypatch):
    root, _ = planted
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    result = scan(root, workers=1, out=tmp_path / "l.txt", progress=False)
    assert str(root / "class0" / "truncated.jpg") in dict(result.bad)  # checked strictly all the same
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_cli_reports_bad_files_and_exits_2_on_a_missing_path(planted, tmp_path):
    root, good = planted
    out, report = tmp_path / "clean.txt", tmp_path / "report.json"
    runs = {
        "ok": [str(root), "--out", str(out), "--report", str(report), "--workers", "2"],
        "missing": [str(tmp_path / "nope")],
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {  # concurrently: each start imports torch (seconds)
        k: subprocess.Popen([sys.executable, "-m", "fastmim.data.scan", *a], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for k, a in runs.items()
    }  # fmt: skip
    res = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    (stdout, stderr), code = res["ok"]
    assert code == 0, stderr
    for rel in ("class0/corrupt.jpg", "class0/truncated.jpg", "class1/random.jpg", "class1/empty.jpg"):
        assert f"{root / rel}: {PLANTED[rel]}" in stdout
    assert str(root / "notes.txt") in stdout and f"--data-path {out}" in stdout
    assert read_file_list(out)[1] == good
    assert '"reason": "not an image"' in report.read_text()
    (stdout, stderr), code = res["missing"]
    assert code == 2 and stdout == ""
    assert stderr == f"error: data path {str(tmp_path / 'nope')!r} does not exist\n"


@pytest.mark.parametrize(
    "kind, words",
    [("empty", "is empty"), ("text", "holds no images"), ("file", "is not a directory")],
)
def test_cli_exits_2_on_an_unusable_folder(kind, words, tmp_path, capsys):
    # main() is what `python -m fastmim.data.scan` runs; in-process, as each new process spends seconds importing torch
    path = tmp_path / kind
    if kind == "file":
        path.write_text("not a folder\n")
    else:
        path.mkdir()
    if kind == "text":
        (path / "readme.txt").write_text("no images here\n")
    assert main([str(path), "--quiet", "--out", str(tmp_path / "l.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "l.txt").exists()
    assert captured.err.startswith(f"error: data path {str(path)!r} ") and words in captured.err
    assert len(captured.err.splitlines()) == 1


def test_read_file_list_says_what_is_wrong(planted, tmp_path):
    root, _ = planted
    with pytest.raises(ValueError, match="not a fastmim scan list"):
        read_file_list(root / "notes.txt")
    with pytest.raises(ValueError, match="is an image file"):
        read_file_list(root / "class0" / "img000.jpg")
    out = scan(root, workers=0, out=tmp_path / "l.txt", progress=False).list_path
    lines = out.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.txt"
    cut.write_text("".join(lines[:-2]))
    with pytest.raises(ValueError, match="names 8 images but its header says images=10"):
        read_file_list(cut)
    newer = tmp_path / "v3.txt"
    newer.write_text(lines[0].replace(" v2 ", " v3 ") + "".join(lines[1:]))
    with pytest.raises(ValueError, match="format 'v3'; this fastmim reads v1 and v2"):
        read_file_list(newer)
    moved = tmp_path / "moved.txt"
    moved.write_text(lines[0].replace(f"root={root} ", f"root={tmp_path / 'gone'} ") + "".join(lines[1:]))
    with pytest.raises(FileNotFoundError, match="gone"):
        read_file_list(moved)
    with pytest.raises(ValueError, match="not a fastmim scan list"):  # the dataset's own error, for --data-path
        ImageFolderDataset(root / "notes.txt")


def test_a_list_with_no_good_image_is_refused_by_the_loader(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    result = scan(tmp_path / "bad", workers=0, out=tmp_path / "l.txt", progress=False)
    assert result.good == [] and result.bad == [(str((tmp_path / "bad" / "a.jpg").resolve()), "empty")]
    with pytest.raises(ValueError, match="holds no images"):
        list_images(result.list_path)


def test_cli_exits_2_when_no_image_decodes(tmp_path, capsys):
    """A folder whose image files all fail to decode: the findings and the (empty) list as usual, then status 2,
    as for a folder without images: there is nothing to train on."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"not a jpeg")
    (root / "b.png").write_bytes(b"")
    assert main([str(root), "--quiet", "--workers", "0", "--out", str(tmp_path / "l.txt")]) == 2
    out = capsys.readouterr().out
    assert "no image decoded: the list is empty" in out and str(root / "a.jpg") in out


def test_the_folder_walk_takes_each_folder_once_and_skips_hidden_files(tmp_path, capsys):
    """A symlink back up the tree is not followed round (the images are not repeated), a second link to a walked
    folder adds nothing, and hidden files (macOS's ._* AppleDouble files) are skipped like hidden folders; a
    symlinked class folder outside the tree is still read."""
    root = make_image_folder(tmp_path / "d", n=4)
    outside = make_image_folder(tmp_path / "elsewhere", n=2, seed=1)
    (root / "class0" / "up").symlink_to("..")  # a loop
    (root / "again").symlink_to(root / "class1")  # the same folder twice
    (root / "linked").symlink_to(outside / "class0")
    (root / "class0" / "._img000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    files = list_images(root)
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["img000.jpg", "img000.jpg", "img001.jpg", "img002.jpg", "img003.jpg"], files
    assert "2 linked folder(s) lead to a folder already read" in capsys.readouterr().err  # said, once
    list_images(root)
    assert capsys.readouterr().err == ""
    assert scan(root, workers=0).bad == []  # the AppleDouble file is not read as an image


def test_a_name_that_is_not_utf8_is_left_out_by_the_scan_and_named_by_dali(tmp_path):
    """A Latin-1 file name (bytes that are not UTF-8): the scan lists it as bad, saying why, and DALI given it
    refuses it by name instead of failing in its pipeline's build; the torch loader reads it."""
    root = make_image_folder(tmp_path / "d", n=4)
    odd = os.path.join(os.fsencode(root / "class0"), b"latin1_\xe9.jpg")
    os.rename(os.fsencode(root / "class0" / "img000.jpg"), odd)
    result = scan(root, workers=0)
    assert [(os.fsencode(p), r) for p, r in result.bad] == [(odd, "name is not valid UTF-8 (DALI cannot open it; "
                                                                   "rename the file)")]  # fmt: skip
    assert len(result.good) == 3
    line = next(x for x in format_summary(result).splitlines() if "latin1_" in x)  # its bytes, not a surrogate
    assert line.startswith("  b'") and "latin1_\\xe9.jpg': name is not valid UTF-8" in line and "\\udce9" not in line
    files = list_images(root)
    assert len(ImageFolderDataset(root, eval_transform(32))[files.index(os.fsdecode(odd))].shape) == 3
    pytest.importorskip("nvidia.dali", reason="DALI's check needs DALI installed (fastmim[dali])")
    from fastmim.data.dali import DaliLoader

    with pytest.raises(ValueError, match=r"DALI cannot open b'.*latin1_\\xe9.jpg': its name is not valid UTF-8"):
        DaliLoader(files, 2, 32, num_threads=1)


def test_an_earlier_fastmims_scan_is_found_and_out_of_date_once_it_missed_images(tmp_path, monkeypatch):
    """A shared cache: an earlier fastmim's list (v1, under its own name) is still found; one written before .jfif
    files were read (counted then among the other files) is out of date, or DALI would leave them out silently."""
    from fastmim.data.scan import _list_path

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", n=6)
    result = scan(root, workers=0, progress=False)
    assert result.list_path.name.endswith(".v2.txt")
    lines = result.list_path.read_text().split("\n")
    v1 = lines[0].rsplit(" ", 1)[0].replace(" v2 ", " v1 ")
    legacy = _list_path(root, ".txt")
    legacy.write_text("\n".join([v1, *lines[1:]]))
    result.list_path.unlink()
    assert find_scan(root) == legacy  # (the same files: up to date by its count and newest time)
    jfif = root / "class0" / "photo.jfif"
    jfif.write_bytes((root / "class0" / "img000.jpg").read_bytes())
    os.utime(jfif, (0, 0))  # older than the newest: the count of files grew, though
    files = int(v1.split(" files=")[1].split()[0])
    legacy.write_text("\n".join([v1.replace(f" files={files} ", f" files={files + 1} "), *lines[1:]]))
    assert find_scan(root) is None  # 6 images and no bad one listed, 7 read now


def test_under_torchrun_rank_0_alone_looks_at_the_data_and_every_rank_takes_its_loader(tmp_path, monkeypatch):
    """The scan's up-to-date check stats every file (11 s for 1.28M files on a local disk): every process did it,
    and a node without the folder's scan picked another loader than rank 0's. Rank 0 now looks; the others take its
    answer, its usage error, or are told that its scan list is not on their machine. (broadcast_object stood in.)"""
    from fastmim import pretrain
    from fastmim.config import PretrainConfig
    from fastmim.train.distributed import DistInfo

    folder = tmp_path / "data"
    for i in range(3):
        (folder / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "c" / f"{i}.png")
    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    listed = scan(folder, workers=0, progress=False).list_path
    cfg = PretrainConfig(data_path=str(folder), loader="auto")
    rank0 = pretrain._choose_loader(cfg)
    sent = []
    monkeypatch.setattr(pretrain, "broadcast_object", lambda obj, info: sent.append(obj) or obj)
    two = DistInfo(rank=0, world_size=2)
    assert pretrain.choose_loader(cfg, torch_cpu(), info=two) == pretrain.choose_loader(cfg, torch_cpu())
    assert sent == [rank0]
    looked = []
    monkeypatch.setattr(pretrain, "_choose_loader", lambda c: looked.append(c))  # (rank 1 must not look)
    for answer, expect in ((rank0, None), (pretrain.UsageError("no such folder"), "no such folder")):
        monkeypatch.setattr(pretrain, "broadcast_object", lambda obj, info, a=answer: a)
        if expect is None:
            if rank0[0] == "dali":
                assert pretrain.choose_loader(cfg, torch_cpu(), info=DistInfo(1, 2))[:2] == ("dali", str(listed))
        else:
            with pytest.raises(pretrain.UsageError, match=expect):
                pretrain.choose_loader(cfg, torch_cpu(), info=DistInfo(1, 2))
    if rank0[0] == "dali":  # DALI installed: rank 0 reads the folder's scan, which rank 1's machine lacks
        monkeypatch.setattr(pretrain, "broadcast_object", lambda obj, info: ("dali", str(tmp_path / "x.v2.txt"), ""))
        with pytest.raises(pretrain.UsageError, match="rank 1: rank 0 reads the data with DALI through the folder's"):
            pretrain.choose_loader(cfg, torch_cpu(), info=DistInfo(1, 2))
    assert looked == []


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_under_torchrun_ranks_reading_different_data_are_refused(tmp_path, monkeypatch):
    """A node with its own out-of-date scan list (or a copy of the folder still being written) read other samples:
    other epoch lengths, and the ranks' collectives fell out of step. Every rank now compares (gather stood in)."""
    from fastmim import pretrain
    from fastmim.data.folder import dataset_digest
    from fastmim.train.distributed import DistInfo

    folder = tmp_path / "data"
    (folder / "c").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "c" / f"{i}.png")
    ds = ImageFolderDataset(folder)
    mine = (4, dataset_digest(ds), None)
    monkeypatch.setattr(pretrain, "gather_objects", lambda obj, info: [obj, mine, obj])
    pretrain.check_same_data(ds, DistInfo(0, 3))  # the same names: taken
    fewer = ImageFolderDataset(folder)
    fewer.files = fewer.files[:3]
    with pytest.raises(pretrain.UsageError, match=r"rank 0 has 3 images .*, rank 1 4 images .*; 1 of 3 ranks differ"):
        pretrain.check_same_data(fewer, DistInfo(0, 3))
    renamed = ImageFolderDataset(folder)
    renamed.files = [*renamed.files[:3], str(folder / "c" / "other.png")]  # as many, another name
    with pytest.raises(pretrain.UsageError, match="the ranks read different data"):
        pretrain.check_same_data(renamed, DistInfo(0, 3))
    copied = tmp_path / "elsewhere"  # the same names under another folder: the same data
    copied.mkdir()
    (folder / "c").rename(copied / "c")
    pretrain.check_same_data(ImageFolderDataset(copied), DistInfo(0, 3))


def test_a_rank_that_cannot_set_up_its_data_is_named_on_every_rank(tmp_path, monkeypatch):
    """A rank whose node lacks the folder stopped alone; the others waited in their next collective (on several
    nodes, until a timeout). Its problem is gathered: every rank stops, naming it. (gather stood in.)"""
    from fastmim import pretrain
    from fastmim.train.distributed import DistInfo

    folder = tmp_path / "data"
    (folder / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "c" / "0.png")
    ds = ImageFolderDataset(folder)
    gathered = []
    monkeypatch.setattr(pretrain, "gather_objects", lambda obj, info: gathered.append(obj) or [(1, "x", None), obj])
    with pytest.raises(pretrain.UsageError, match="no such folder"):  # (the rank's own problem, as it was)
        pretrain.check_same_data(None, DistInfo(1, 2), pretrain.UsageError("no such folder"))
    assert gathered == [(None, None, "no such folder")]
    monkeypatch.setattr(pretrain, "gather_objects", lambda obj, info: [obj, (None, None, "OSError: disk gone")])
    with pytest.raises(pretrain.UsageError, match="rank 1 could not set up its data: OSError: disk gone"):
        pretrain.check_same_data(ds, DistInfo(0, 2))
    # rank 0 stopped (Ctrl-C, a stop signal) while choosing the loader: the others stop as it does
    monkeypatch.setattr(pretrain, "broadcast_object", lambda obj, info: KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pretrain.choose_loader(pretrain.PretrainConfig(data_path=str(folder)), torch_cpu(), info=DistInfo(1, 2))


def test_the_data_digest_is_the_same_however_the_path_is_spelled(tmp_path):
    from fastmim.data.folder import dataset_digest

    folder = tmp_path / "data"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / c / "0.png")

    class Named:
        def __init__(self, files):
            self.files = files

    plain = dataset_digest(ImageFolderDataset(folder))
    for spelled in (f"{tmp_path}//data", f"{tmp_path}/./data"):
        names = [f"{spelled}/a/0.png", f"{spelled}/b/0.png"]
        assert dataset_digest(Named(names)) == plain


def test_the_up_to_date_check_stats_in_threads_in_order(tmp_path):
    """The check stats every file; on a shared file system a stat takes 0.1-1 ms, so it is spread over threads
    (20k files at 0.5 ms each, simulated: 12.6 s in one thread, 1.1 s in 16). The results keep the paths' order."""
    from fastmim.data.scan import _stat_all

    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.bin"
        if i == 4:
            p.symlink_to(tmp_path / "gone")  # a broken link: None
        else:
            p.write_bytes(b"x" * i)
        paths.append(str(p))
    got = _stat_all(paths, threads=4, chunk=3)
    assert [None if st is None else st.st_size for st in got] == [0, 1, 2, 3, None, 5, 6, 7, 8, 9]
    assert [st and st.st_size for st in _stat_all(paths)] == [st and st.st_size for st in got]


def _tiffs() -> dict[str, bytes]:
    import io

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    kinds = {"RGB": rgb, "L": rgb.convert("L"), "1": rgb.convert("1"), "LAB": rgb.convert("LAB"),
             "I": Image.fromarray(rng.integers(0, 2**31, (24, 32)).astype(np.int32)),
             "I;16": Image.fromarray(rng.integers(0, 65535, (24, 32)).astype(np.uint16)),
             "F": Image.fromarray(rng.random((24, 32)).astype(np.float32))}  # fmt: skip
    out = {}
    for mode, img in kinds.items():
        buf = io.BytesIO()
        img.save(buf, format="TIFF")
        out[mode] = buf.getvalue()
    return out


def test_tiffs_dali_does_not_decode_as_pil_are_named_by_the_scan():
    """A 1-bit (scanned documents) or 32-bit integer TIFF passed the scan, which cleared the folder for DALI, whose
    decoder then stopped the run on it ("missing: BitsPerSample") and pointed back to the scan; a CIELAB one decodes
    in other colours there. The torch loaders read them all."""
    from fastmim.data.folder import open_rgb
    from fastmim.data.scan import check_bytes

    reasons = {mode: check_bytes(data) for mode, data in _tiffs().items()}
    assert {m for m, r in reasons.items() if r is not None} == {"1", "I", "LAB"}, reasons
    assert reasons["1"] == "a TIFF DALI does not decode as PIL does (1-bit pixels, mode 1)"
    for mode, data in _tiffs().items():
        assert open_rgb(data, mode).size == (32, 24)  # (what --loader torch trains on)


def test_the_tiff_modes_the_scan_passes_are_those_dali_decodes():
    """The scan's list, checked against the installed DALI's CPU decoder: each TIFF it passes decodes, each 1-bit or
    integer one it names fails (a DALI that learns them shows here, to widen the list)."""
    pytest.importorskip("nvidia.dali", reason="DALI is an optional dependency (pip install nvidia-dali-cuda130)")
    from nvidia.dali import fn, pipeline_def, types

    from fastmim.data.scan import check_bytes

    def decodes(data: bytes) -> bool:
        arr = np.frombuffer(data, dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            return fn.decoders.image(fn.external_source(source=lambda: [arr], batch=True, dtype=types.UINT8),
                                     device="cpu", output_type=types.RGB)  # fmt: skip

        p = pipe()
        p.build()
        try:
            p.run()
            return True
        except RuntimeError:
            return False

    for mode, data in _tiffs().items():
        if mode != "LAB":  # (decoded, in other colours: named for that)
            assert decodes(data) == (check_bytes(data) is None), mode


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_with_an_image_name_is_named_not_waited_on(tmp_path):
    """mkfifo pipe.jpg: the scan and the loaders opened it and waited for a writer, for ever (Ctrl-C's stop after
    the step in flight never came). It is an unreadable file now, named as such."""
    import signal as sig

    from fastmim.data.folder import BadImageError, open_rgb
    from fastmim.data.scan import check_image

    root = make_image_folder(tmp_path / "d", n=4, classes=1)
    pipe = root / "class0" / "pipe.jpg"
    os.mkfifo(pipe)
    sig.signal(sig.SIGALRM, lambda *a: pytest.fail("a read of the named pipe blocked"))
    sig.alarm(60)
    try:
        assert check_image(str(pipe)) == "unreadable: not a regular file (a named pipe, socket or device)"
        with pytest.raises(BadImageError, match="not a regular file"):
            open_rgb(str(pipe), str(pipe))
        ds = ImageFolderDataset(root)  # (read_bytes: the encoded file --loader torch-gpu sends to the GPU)
        with pytest.raises(BadImageError, match="not a regular file"):
            ds.read_bytes(ds.files.index(str(pipe)))
        with pytest.raises(BadImageError, match="not a regular file"):
            ds[ds.files.index(str(pipe))]
        result = scan(root, workers=0, out=tmp_path / "list.txt", progress=False)
    finally:
        sig.alarm(0)
    assert result.bad == [(str(pipe), "unreadable: not a regular file (a named pipe, socket or device)")]
    assert len(result.good) == 4


def test_the_summary_says_what_the_walk_left_out(tmp_path):
    """Hidden images and folders and a link loop are not read by the loaders; the scan's summary and its report
    say how many, so that its count of files is explained (before: they were left out unsaid)."""
    root = make_image_folder(tmp_path / "d", n=4)
    (root / "class0" / ".hidden.jpg").write_bytes((root / "class0" / "img000.jpg").read_bytes())
    (root / ".thumbs").mkdir()
    (root / "class1" / "up").symlink_to("..")
    result = scan(root, workers=0, progress=False, out=tmp_path / "l.txt")
    assert result.left_out == {"hidden images": 1, "hidden folders": 1, "walked twice": 1}
    assert len(result.good) == 4 and result.to_json()["left_out"] == result.left_out
    line = next(x for x in format_summary(result).splitlines() if x.startswith("not read"))
    assert "1 hidden image(s)" in line and "1 hidden folder(s)" in line and "1 linked folder(s)" in line, line
    plain = scan(make_image_folder(tmp_path / "plain", n=2), workers=0, progress=False, out=tmp_path / "p.txt")
    assert plain.left_out == {} and "not read" not in format_summary(plain)
