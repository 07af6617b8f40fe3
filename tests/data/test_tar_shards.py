"""Webdataset tar shards: the sample index, the map-style dataset, and both loaders reading them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.data.dali import dali_problem
from fastmim.data.folder import TarShardDataset, list_images, list_tar_samples, list_tar_shards
from tests.conftest import make_image_folder


def make_shards(root, files, per_shard=10, extra=True):
    """Webdataset shards: sample k of shard s is ``s{s}/k{k:03d}.jpg`` (+ a ``.cls`` member, not an image)."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(root / f"shard-{s // per_shard:04d}.tar", "w") as tar:
            for k, f in enumerate(files[s : s + per_shard]):
                tar.add(f, arcname=f"s{s // per_shard}/k{k:03d}.jpg")
                if extra:
                    info = tarfile.TarInfo(f"s{s // per_shard}/k{k:03d}.cls")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"7"))
    return root


def truncated_member_shard(path, files, bad, name):
    """A one-shard folder: ``files`` as members ``name.format(k)``, member ``bad`` cut to a third."""
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w") as tar:
        for k, f in enumerate(files):
            blob = open(f, "rb").read()
            blob = blob[: len(blob) // 3] if k == bad else blob
            info = tarfile.TarInfo(name.format(k))
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("wds")
    files = list_images(make_image_folder(base / "src", n=24, size=(90, 70)))
    return make_shards(base / "shards", files), files


def test_samples_are_indexed_in_shard_and_member_order_and_load_as_the_original_images(shards):
    root, files = shards
    assert list_tar_shards(root) == [str(root / f"shard-{i:04d}.tar") for i in range(3)]
    assert list_tar_shards(root / "shard-0001.tar") == [str(root / "shard-0001.tar")]
    assert list_tar_shards(files[0].rsplit("/", 2)[0]) is None  # an image folder is not shards
    ids, sizes = list_tar_samples(list_tar_shards(root))
    assert len(ids) == 24 and ids[11] == f"{root}/shard-0001.tar:{ids[11].split(':')[1]}:s1/k001.jpg"
    ds = TarShardDataset(root)
    assert len(ds) == 24 and ds.files == ids and sizes == ds.sizes.tolist()
    for i in (0, 11, 23):  # pixel for pixel the file that was packed
        with Image.open(files[i]) as ref:
            assert np.array_equal(np.asarray(ds.load(i)), np.asarray(ref.convert("RGB")))


def test_bad_shards_name_the_problem(tmp_path, shards):
    _, files = shards
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "a.tar", "w:gz") as tar:
        tar.add(files[0], arcname="x.jpg")
    with pytest.raises(ValueError, match="is not an uncompressed tar file"):
        TarShardDataset(tmp_path / "gz")
    with tarfile.open(tmp_path / "two.tar", "w") as tar:
        tar.add(files[0], arcname="x.jpg")
        tar.add(files[1], arcname="x.png")
    with pytest.raises(ValueError, match="sample 'x' holds two images"):
        TarShardDataset(tmp_path / "two.tar")
    with pytest.raises(ValueError, match="is not a .tar file, a folder of .tar shards or a pattern of them"):
        TarShardDataset(tmp_path / "missing.tar")


def test_pretrain_reads_tar_shards_with_the_torch_loader_and_refuses_dali_without_the_flag(shards, tmp_path, capsys):
    from fastmim import pretrain
    from tests.conftest import TINY_ARGS

    root, _ = shards
    args = [*TINY_ARGS, "--data-path", str(root), "--max-steps", "2"]
    pretrain.run([*args, "--output-dir", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert "24 images in 3 tar shards from" in out and "loader torch" in out and "done: step 2" in out
    if dali_problem() is None:
        with pytest.raises(pretrain.UsageError, match="holds tar shards; they have not been scanned"):
            pretrain.run([*args, "--output-dir", str(tmp_path / "d"), "--loader", "dali"])


def test_the_scan_reads_tar_shards_and_clears_clean_ones_for_dali(shards, tmp_path, capsys):
    from fastmim import pretrain
    from fastmim.data.scan import find_scan, read_file_list, scan, scan_header

    root, files = shards
    copy = make_shards(tmp_path / "copy", files)
    clean = scan(copy, workers=2, progress=False)
    assert len(clean.good) == 24 and clean.bad == [] and clean.good == TarShardDataset(copy).files
    assert find_scan(copy) == clean.list_path and scan_header(clean.list_path) == (str(copy.resolve()), 24, 0)
    with pytest.raises(ValueError, match="is of the tar shards"):
        read_file_list(clean.list_path)  # not a list of files for --data-path
    # a truncated member: found by id, and the shards are no longer cleared for DALI
    bad_dir = truncated_member_shard(tmp_path / "bad" / "shard-0000.tar", files[:8], 5, "k{:03d}.jpg")
    found = scan(bad_dir, workers=0, progress=False)
    assert [(i.rsplit(":", 1)[1], r) for i, r in found.bad] == [("k005.jpg", "truncated")] and len(found.good) == 7
    if dali_problem() is None:
        from tests.conftest import TINY_ARGS

        args = [*TINY_ARGS, "--max-steps", "1", "--output-dir"]
        with pytest.raises(pretrain.UsageError, match="the scan found 1 bad image"):
            pretrain.run([*args, str(tmp_path / "r1"), "--data-path", str(bad_dir), "--loader", "dali"])
        pretrain.run([*args, str(tmp_path / "r2"), "--data-path", str(copy)])  # auto: scanned clean -> DALI
        assert "loader DALI (cpu" in capsys.readouterr().out
        (copy / "shard-0002.tar").touch()  # changed since the scan
        assert find_scan(copy) is None


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_dali_reads_tar_shards_sharded_checkpointed_and_with_dataset_indices(shards):
    from fastmim.data.dali import DaliLoader

    root, _ = shards
    ds = TarShardDataset(root)
    seen = []
    for rank in range(2):
        ld = DaliLoader(ds.files, 4, 32, num_threads=2, tars=ds.shards, rank=rank, world_size=2, seed=3)
        got = [(x, i) for x, i in ld]
        assert len(got) == 3 and all(x.shape == (4, 3, 32, 32) for x, _ in got)
        seen.append(set(torch.cat([i for _, i in got]).tolist()))
    assert not (seen[0] & seen[1]) and seen[0] | seen[1] == set(range(24))
    assert seen[0] == set(range(12))  # rank 0 reads the first half of the samples, in order
    ld = DaliLoader(ds.files, 4, 32, num_threads=2, tars=ds.shards, seed=3)
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    rest = [(x.clone(), i.clone()) for x, i in it]
    again = DaliLoader(ds.files, 4, 32, num_threads=2, tars=ds.shards, seed=3)
    again.load_state_dict(state)
    got = list(again)
    assert all(torch.equal(a, b) and torch.equal(i, j) for (a, i), (b, j) in zip(got, rest, strict=True))


def test_member_names_with_colons_and_non_ascii_and_odd_extensions(shards, tmp_path):
    """Ids split at the shard's '.tar:offset:', so a member may hold ':'; PAX names that DALI does not decode are
    still found by (shard, offset); a dotted or odd-case extension is skipped by the index as DALI skips it."""
    from fastmim.data.scan import scan

    _, files = shards
    (tmp_path / "odd").mkdir()
    with tarfile.open(tmp_path / "odd" / "s.tar", "w") as tar:  # Python writes PAX headers for these names
        for i, f in enumerate(files[:8]):
            tar.add(f, arcname=f"2026-11-26T10:00:{i:02d}_ñandú.jpg")
        tar.add(files[8], arcname="x.v2.jpg")  # DALI's extension "v2.jpg": not an image component
        tar.add(files[9], arcname="y.Jpg")
    ds = TarShardDataset(tmp_path / "odd")
    assert len(ds) == 8 and ds.files[3].endswith(":2026-11-26T10:00:03_ñandú.jpg")
    assert ds.load(3).size == Image.open(files[3]).size
    assert len(scan(tmp_path / "odd", workers=0, progress=False).good) == 8
    if dali_problem() is None:
        from fastmim.data.dali import DaliLoader

        got = torch.cat([i for _, i in DaliLoader(ds.files, 4, 32, num_threads=1, tars=ds.shards)])
        assert sorted(got.tolist()) == list(range(8))


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_shards_dali_cannot_read_give_a_clear_error(shards, tmp_path):
    from fastmim.data.dali import DaliLoader

    _, files = shards
    (tmp_path / "long").mkdir()
    with tarfile.open(tmp_path / "long" / "s.tar", "w") as tar:  # names over 100 characters: PAX, skipped by DALI
        for i, f in enumerate(files[:8]):
            tar.add(f, arcname="L" * 120 + f"_{i}.jpg")
    ds = TarShardDataset(tmp_path / "long")
    assert len(ds) == 8
    with pytest.raises(ValueError, match="rewrite the shards with GNU tar"):  # DALI's own index skips them
        DaliLoader(ds.files, 4, 32, num_threads=1, tars=ds.shards)
    # through index files written from ours (what pretraining does), DALI reads exactly the indexed members
    ld = DaliLoader(ds.files, 4, 32, num_threads=1, tars=ds.shards, tar_sizes=ds.sizes)
    assert sorted(torch.cat([i for _, i in ld]).tolist()) == list(range(8))


@pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")
def test_index_files_are_written_once_and_a_bad_member_is_named_by_its_real_id(shards, tmp_path):
    from fastmim.data.dali import DaliDecodeError, DaliLoader, write_wds_indexes

    _, files = shards
    bad_dir = truncated_member_shard(tmp_path / "bad" / "s.tar", files[:8], 2, "m {:03d}.jpg")  # a space: the
    # index format splits on spaces
    ds = TarShardDataset(bad_dir)
    first = write_wds_indexes(ds.files, ds.sizes, ds.shards)
    stamp = [p.stat().st_mtime_ns for p in map(Path, first)]
    assert write_wds_indexes(ds.files, ds.sizes, ds.shards) == first  # cached: the same files, not rewritten
    assert [p.stat().st_mtime_ns for p in map(Path, first)] == stamp
    assert Path(first[0]).read_text().splitlines()[0] == "v1.2 8"
    ld = DaliLoader(ds.files, 4, 32, num_threads=1, tars=ds.shards, tar_sizes=ds.sizes)
    with pytest.raises(DaliDecodeError) as err:
        list(ld)
    assert err.value.path == ds.files[2] and err.value.path.endswith(":m 002.jpg")


def test_image_members_webdataset_does_not_read_are_said(tmp_path, shards, capsys):
    """Dotted base names, odd-case extensions and links are not samples (webdataset's and DALI's rule): left out,
    and said, so that a folder and its shards do not silently differ; other members (labels) are not mentioned."""
    root, files = shards
    capsys.readouterr()
    list_tar_samples(list_tar_shards(root))  # (.cls members only: nothing to say)
    assert "left out" not in capsys.readouterr().err
    shard = tmp_path / "odd.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("x/good.jpg", "x/photo.v2.jpg", "x/holiday.Jpg"):
            tar.add(files[0], arcname=name)
        link = tarfile.TarInfo("x/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "good.jpg"
        tar.addfile(link)
    ids, _ = list_tar_samples([str(shard)])
    assert [i.rsplit(":", 1)[1] for i in ids] == ["x/good.jpg"]
    err = capsys.readouterr().err
    assert "note: 3 image member(s) of the tar shards left out" in err and "'x/photo.v2.jpg'" in err, err


def test_the_run_data_digest_of_shards_keeps_a_replaced_member_and_sees_a_new_one(tmp_path):
    """The checkpoint's data-set digest names a tar sample by shard and member, not by its offset: a bad member
    rewritten at its name (another size: the later members' offsets move) is the same data set, moved shards too; a
    member more is another."""
    from types import SimpleNamespace

    from fastmim.train.engine import Trainer

    files = list_images(make_image_folder(tmp_path / "src", n=6, size=(40, 30)))

    def digest(folder):
        return Trainer.data_digest(SimpleNamespace(dataset=TarShardDataset(folder)))

    good = digest(make_shards(tmp_path / "a", files))
    fixed = truncated_member_shard(tmp_path / "b" / "shard-0000.tar", files, 0, "s0/k{:03d}.jpg")  # a short member 0
    assert TarShardDataset(fixed).files != TarShardDataset(tmp_path / "a").files  # (the offsets moved)
    assert digest(fixed) == digest(make_shards(tmp_path / "c", files, extra=False)) == good
    assert digest(make_shards(tmp_path / "d", [*files, files[0]])) != good


def test_a_shard_cut_short_keeps_its_members_up_to_the_cut_and_names_the_cut_one(tmp_path, shards, capsys):
    """An interrupted download or copy ends a shard inside its last member: the whole data set was refused ("not an
    uncompressed tar file", no member named); now the members before the cut are read, a note says which shard, the
    member cut short is a bad file named when read (or by the scan), and --skip-bad-files trains past it."""
    from fastmim.data.folder import BadImageError, split_sample_id
    from fastmim.data.scan import scan

    src, files = shards
    root = tmp_path / "cut"
    root.mkdir()
    whole = (src / "shard-0001.tar").read_bytes()
    (root / "shard-0000.tar").write_bytes((src / "shard-0000.tar").read_bytes())
    last = TarShardDataset(src / "shard-0001.tar").files[-1]
    _, offset, member = split_sample_id(last)
    (root / "shard-0001.tar").write_bytes(whole[: offset + 100])  # inside the last member's data
    ds = TarShardDataset(root)
    assert len(ds) == 20 and ds.files[-1].endswith(f":{offset}:{member}")
    assert "1 tar shard(s) end inside a member (truncated" in capsys.readouterr().err
    with pytest.raises(BadImageError, match=r"the shard ends .* bytes into it"):
        ds.read_bytes(19)
    assert ds.load(18).size == (70, 90)  # the ones before it read
    found = scan(root, workers=0, progress=False, out=tmp_path / "list.txt")
    assert [(p.rsplit(":", 1)[1], r) for p, r in found.bad] == [(member, "truncated")] and len(found.good) == 19


def test_empty_zero_byte_compressed_and_misplaced_shards_are_named(tmp_path, shards, capsys):
    """A 0-byte shard and a compressed one are named with what to do; a tar with no image sample (a writer stopped
    after rolling over) between good ones is left out of DALI's reader (whose index of 0 samples stopped the run);
    shards beside images or in subfolders, and compressed ones, are hinted at where a folder is read as images."""
    from fastmim.data.folder import list_images

    src, files = shards
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "a.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"tar shard '.*a.tar' is an empty file \(0 bytes\): re-write or remove it"):
        TarShardDataset(tmp_path / "zero")
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "a.tar.gz", "w:gz") as tar:
        tar.add(files[0], arcname="x.jpg")
    with pytest.raises(ValueError, match="if the compressed tars are webdataset shards, decompress them to read them"):
        list_images(gz)
    with pytest.raises(ValueError, match="is a compressed tar shard; if the compressed tars are webdataset shards"):
        list_images(gz / "a.tar.gz")
    mixed = make_shards(tmp_path / "mixed", files[:10])
    (mixed / "thumb.jpg").write_bytes(open(files[0], "rb").read())
    capsys.readouterr()
    assert len(list_images(mixed)) == 1
    assert "if the .tar files are webdataset shards, pass a .tar file" in capsys.readouterr().err
    empty = make_shards(tmp_path / "empty", files[:20])
    with tarfile.open(empty / "shard-0001b.tar", "w"):
        pass  # no member at all, between the two good shards
    ds = TarShardDataset(empty)
    assert len(ds) == 20 and len(ds.shards) == 3
    if dali_problem() is not None:
        return  # (the DALI half needs DALI: fastmim[dali])
    from fastmim.data.dali import DaliLoader

    loader = DaliLoader(ds.files, 4, 32, num_threads=1, tars=ds.shards, tar_sizes=ds.sizes)
    assert sorted(int(i) for _, idx in loader for i in idx) == list(range(20))


def test_dali_on_shards_refuses_what_it_cannot_read_and_takes_any_sample_count(tmp_path, shards):
    """DALI over shards: a member past its shard's end (cut short) is refused by name before DALI reads unmapped
    memory (a segfault); shards spelled otherwise than the samples' are refused; a sample count the ranks do not
    divide (9 over 2) reads (the count check compared DALI's whole-shard count with the ranks' even share)."""
    if dali_problem() is not None:
        pytest.skip(f"optional dependency absent: {dali_problem()}")
    import os

    from fastmim.data.dali import DaliLoader

    src, files = shards
    odd = make_shards(tmp_path / "odd", files[:9], per_shard=5)
    ds = TarShardDataset(odd)
    seen = set()
    for rank in range(2):
        ld = DaliLoader(ds.files, 2, 32, num_threads=1, tars=ds.shards, tar_sizes=ds.sizes, rank=rank, world_size=2)
        seen |= {int(i) for _, idx in ld for i in idx}
    assert seen <= set(range(9)) and len(seen) >= 8
    rel = [os.path.relpath(t) for t in ds.shards]
    with pytest.raises(ValueError, match="name shards that tars does not list"):
        DaliLoader(ds.files, 2, 32, num_threads=1, tars=rel, tar_sizes=ds.sizes)
    cut = tmp_path / "cut"
    cut.mkdir()
    whole = (src / "shard-0000.tar").read_bytes()
    last = TarShardDataset(src / "shard-0000.tar").files[-1]
    (cut / "shard-0000.tar").write_bytes(whole[: int(last.split(":")[-2]) + 100])
    short = TarShardDataset(cut)
    with pytest.raises(ValueError, match=r"ends inside its member 's0/k009.jpg' \(cut short"):
        DaliLoader(short.files, 2, 32, num_threads=1, tars=short.shards, tar_sizes=short.sizes)


def test_upper_case_tar_shards_are_shards_and_a_folder_named_tar_is_not(tmp_path, shards):
    src, files = shards
    root = tmp_path / "upper"
    root.mkdir()
    (root / "A.TAR").write_bytes((src / "shard-0000.tar").read_bytes())
    (root / "dir.tar").mkdir()
    assert list_tar_shards(root) == [str(root / "A.TAR")] and len(TarShardDataset(root)) == 10


def test_brace_and_glob_patterns_name_shards_as_webdataset_does(tmp_path, shards):
    """A download's train and validation shards often share a folder: a pattern picks some ('train-{0000..0146}.tar',
    '{a,b}/*.tar'), in the pattern's order; a missing shard, a pattern that names none or a non-tar is refused."""
    from fastmim.data.folder import _expand_braces, is_shard_pattern

    src, _ = shards
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        for i in range(3):
            (tmp_path / part / f"shard-{i:04d}.tar").write_bytes((src / f"shard-{i:04d}.tar").read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("x")
    a = tmp_path / "a"
    assert _expand_braces("x{8..10}") == ["x8", "x9", "x10"] and _expand_braces("x{08..10}") == ["x08", "x09", "x10"]
    assert _expand_braces("{2..0}{a,b}") == ["2a", "2b", "1a", "1b", "0a", "0b"]
    assert _expand_braces("{00..10..5}{x..z}") == [f"{n}{c}" for n in ("00", "05", "10") for c in "xyz"]
    assert _expand_braces("run{1}/s{1,2}") == ["run{1}/s1", "run{1}/s2"]  # ({x} is kept, as bash keeps it)
    # the folders that exist are taken as they are: "set[v2]" is not a character class, "{1}" not a group
    odd = tmp_path / "set[v2]" / "run{1}"
    odd.mkdir(parents=True)
    (odd / "s-0.tar").write_bytes((src / "shard-0000.tar").read_bytes())
    assert list_tar_shards(f"{odd}/*.tar") == list_tar_shards(f"{odd}/s-{{0..0}}.tar") == [str(odd / "s-0.tar")]
    assert not is_shard_pattern(tmp_path / "set[v2]" / "typo")  # (an image folder's typo: not a pattern of shards)
    assert list_tar_shards(f"{a}/shard-{{0002,0000}}.tar") == [str(a / "shard-0002.tar"), str(a / "shard-0000.tar")]
    assert list_tar_shards(f"{a}/shard-{{0000..0001}}.tar") == [str(a / f"shard-{i:04d}.tar") for i in range(2)]
    assert list_tar_shards(f"{a}/*") == list_tar_shards(a)  # (a glob takes the .tar files only)
    both = list_tar_shards(f"{tmp_path}/{{a,b}}/shard-000[12].tar")
    assert both == [str(tmp_path / p / f"shard-{i:04d}.tar") for p in "ab" for i in (1, 2)]
    assert len(TarShardDataset(f"{tmp_path}/*/shard-0000.tar")) == 20
    with pytest.raises(FileNotFoundError, match=r"1 of the names it expands to do not exist: '.*shard-0003.tar'; "
                       r".*/a holds 3 .tar file\(s\): shard-0000.tar ... shard-0002.tar"):  # fmt: skip
        list_tar_shards(f"{a}/shard-{{0000..0003}}.tar")
    with pytest.raises(FileNotFoundError, match="match no .tar file"):
        list_tar_shards(f"{a}/train-*.tar")
    (a / "sub.tar").mkdir()
    with pytest.raises(ValueError, match="'.*sub.tar', which is not a .tar file"):
        list_tar_shards(f"{a}/{{sub,shard-0000}}.tar")
    with pytest.raises(FileNotFoundError, match=r"do not exist: '.*/shard-\{0000\}.tar'"):  # ({x}: as bash, kept)
        list_tar_shards(f"{a}/shard-{{0000}}.tar")
    with pytest.raises(ValueError, match="nested braces"):
        list_tar_shards(f"{a}/shard-{{000{{0,1}}}}.tar")
    with pytest.raises(ValueError, match="expands to over 1,000,000 names"):
        list_tar_shards(f"{a}/{{0..9999}}-{{0..9999}}.tar")
    with pytest.raises(ValueError, match="unmatched"):
        list_tar_shards(f"{a}/shard-{{0000,0001}}}}.tar")
    literal = tmp_path / "c{1,2}"  # a folder whose name has braces is itself, not a pattern
    literal.mkdir()
    (literal / "s.tar").write_bytes((src / "shard-0000.tar").read_bytes())
    assert not is_shard_pattern(literal) and list_tar_shards(literal) == [str(literal / "s.tar")]


def test_pretrain_and_the_scan_take_a_pattern_and_a_mixed_folder_is_said(tmp_path, shards, capsys):
    from fastmim import pretrain
    from fastmim.data.scan import find_scan, main, scan
    from tests.conftest import TINY_ARGS

    src, _ = shards
    root = tmp_path / "download"
    root.mkdir()
    for i in range(3):
        for name in (f"imagenet1k-train-{i:04d}.tar", f"imagenet1k-validation-{i:02d}.tar"):
            (root / name).write_bytes((src / f"shard-{i:04d}.tar").read_bytes())
    assert len(TarShardDataset(root)) == 48
    err = capsys.readouterr().err
    assert "the 6 tar shards are of 2 name families, all read: imagenet1k-train-*.tar (3)" in err
    assert f"pass a pattern in quotes, e.g. '{root}/imagenet1k-train-*.tar'" in err
    TarShardDataset(src)
    assert "name families" not in capsys.readouterr().err  # (one family)
    unnumbered = tmp_path / "unnumbered"  # names of no numbered scheme: a family each, and no note
    unnumbered.mkdir()
    for i, name in enumerate(("alpha.tar", "beta.tar", "3f9a2c.tar", "d41d8c.tar")):
        (unnumbered / name).write_bytes((src / f"shard-{i % 3:04d}.tar").read_bytes())
    expected = sum(len(TarShardDataset(src / f"shard-{i % 3:04d}.tar")) for i in range(4))
    assert len(TarShardDataset(unnumbered)) == expected
    assert "name families" not in capsys.readouterr().err
    from fastmim.data.folder import note_shard_families

    note_shard_families(tmp_path / "mini", ["mini-train-0000.tar", "mini-val-0000.tar"])  # (one shard each)
    assert "the 2 tar shards are of 2 name families" in capsys.readouterr().err
    note_shard_families(tmp_path / "one", ["shard-0001.tar", "shard-0002.tar", "extra.tar"])
    assert "name families" not in capsys.readouterr().err  # (one numbered family)
    pattern = f"{root}/imagenet1k-train-{{0000..0001}}.tar"
    args = [*TINY_ARGS, "--max-steps", "1", "--output-dir"]
    pretrain.run([*args, str(tmp_path / "t"), "--data-path", pattern, "--loader", "torch"])
    assert f"20 images in 2 tar shards from {pattern}, loader torch" in capsys.readouterr().out
    with pytest.raises(pretrain.UsageError, match=r"names it expands to do not exist: '.*-0005.tar'"):
        pretrain.run([*args, str(tmp_path / "u"), "--data-path", f"{root}/imagenet1k-train-{{0000..0005}}.tar"])
    # the scan of a pattern: its own list, found again for the same pattern, its command quoted for a shell
    assert main([pattern, "--quiet", "--workers", "0"]) == 0
    assert f"--data-path '{pattern}' ... (DALI reads the shards" in capsys.readouterr().out
    listed = scan(pattern, workers=0, progress=False)
    assert find_scan(pattern) == listed.list_path and find_scan(f"{root}/imagenet1k-train-*.tar") is None
    assert listed.good == TarShardDataset(pattern).files
    if dali_problem() is None:
        pretrain.run([*args, str(tmp_path / "d"), "--data-path", pattern])  # auto: scanned clean -> DALI
        assert "loader DALI" in capsys.readouterr().out
        (root / "imagenet1k-train-0001.tar").touch()
        assert find_scan(pattern) is None


def test_a_shards_listing_is_cached_until_the_shard_changes(tmp_path, shards, monkeypatch, capsys):
    """Listing a shard reads every member's header (8.4 s for 128k samples from the page cache): every rank did it
    at every start. The listing is now kept in the cache, keyed by the shard's path, size and time."""
    import os

    from fastmim.data import folder

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    src, files = shards
    root = tmp_path / "s"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tar:  # a name that is not UTF-8, a member webdataset leaves out
        for i, f in enumerate(files[:3]):
            tar.add(f, arcname=f"k{i}-\udcff.jpg" if i == 1 else f"k{i}.jpg")
        tar.add(files[3], arcname="x.v2.jpg")
    (root / "b.tar").write_bytes((src / "shard-0000.tar").read_bytes()[:7000])  # cut inside a member
    first = list_tar_samples(list_tar_shards(root))
    said = capsys.readouterr().err
    assert "1 tar shard(s) end inside a member" in said and "1 image member(s) of the tar shards left out" in said
    assert len(list((tmp_path / "cache" / "tar-lists").glob("*.json"))) == 2

    def no_read(shard):
        raise AssertionError(f"{shard} was read again")

    monkeypatch.setattr(folder, "_read_shard", no_read)
    assert list_tar_samples(list_tar_shards(root)) == first and ":k1-\udcff.jpg" in first[0][1]
    assert capsys.readouterr().err == said  # (the notes, from the cache too)
    with tarfile.open(root / "a.tar", "w") as tar:  # rewritten: another listing
        tar.add(files[0], arcname="only.jpg")
    os.utime(root / "a.tar", ns=(1, 1))
    with pytest.raises(AssertionError, match="a.tar was read again"):
        list_tar_samples(list_tar_shards(root))
    monkeypatch.undo()
    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    assert [i.rsplit(":", 1)[1] for i in list_tar_samples([str(root / "a.tar")])[0]] == ["only.jpg"]
    for damaged in (tmp_path / "cache" / "tar-lists").glob("*.json"):
        damaged.write_text("{not json")
    assert list_tar_samples([str(root / "a.tar")])[0][0].endswith(":only.jpg")
    (tmp_path / "file").write_text("x")  # a cache that cannot be written: listed each time, no error
    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "file" / "cache"))
    assert list_tar_samples([str(root / "a.tar")])[0][0].endswith(":only.jpg")


def test_a_pattern_is_kept_absolute_as_written_and_its_scan_list_named_when_a_shard_goes(tmp_path, shards, monkeypatch):
    import os

    from fastmim.data.folder import absolute_data_path
    from fastmim.data.scan import read_file_list, scan

    src, _ = shards
    monkeypatch.chdir(tmp_path)
    assert absolute_data_path("s/x-{0..3}.tar") == f"{tmp_path}/s/x-{{0..3}}.tar"
    assert absolute_data_path("{/x/a,/x/b}/s.tar") == "{/x/a,/x/b}/s.tar"  # (os.path.abspath made it cwd//x/a)
    assert absolute_data_path("/x/{a,b/../c}/s.tar") == "/x/{a,b/../c}/s.tar"  # (normpath cut it to /x/c}/s.tar)
    assert absolute_data_path("s/../t") == f"{tmp_path}/t"
    root = tmp_path / "p"
    root.mkdir()
    for i in range(2):
        (root / f"s-{i}.tar").write_bytes((src / f"shard-000{i}.tar").read_bytes())
    listed = scan(f"{root}/s-{{0..1}}.tar", workers=0, progress=False).list_path
    os.remove(root / "s-1.tar")
    with pytest.raises(ValueError, match="is of the tar shards"):
        read_file_list(listed)


def test_a_shard_rewritten_with_its_size_and_time_restored_is_listed_again(tmp_path, shards, monkeypatch):
    """rsync -a or cp -p of a shard whose members moved (same size: tar pads to 10 KiB records) kept the listing's
    key (path, size, mtime): the torch loader would read the old offsets. The key has the inode and ctime too."""
    import os

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    _, files = shards
    shard = tmp_path / "a.tar"
    for order in (files[:4], files[:4][::-1]):
        with tarfile.open(tmp_path / "new.tar", "w") as tar:
            for f in order:
                tar.add(f, arcname=f"k{files.index(f)}.jpg")
        if shard.exists():
            st = shard.stat()
            os.replace(tmp_path / "new.tar", shard)
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert shard.stat().st_size == st.st_size
        else:
            os.replace(tmp_path / "new.tar", shard)
        ids, _ = list_tar_samples([str(shard)])
        assert ids[0].endswith(f":k{files.index(order[0])}.jpg")


def test_a_scan_clears_each_shard_whatever_names_it_later(tmp_path, shards, monkeypatch):
    """A scan's clearance was looked up by the exact data path: the folder scanned, then a pattern over its
    training shards (or another spelling, or the folder moved) was "not scanned" and --loader auto read with torch.
    Each shard's result is kept by its name, size and time: any set of scanned shards is cleared."""
    import os
    import shutil

    from fastmim import pretrain
    from fastmim.config import PretrainConfig
    from fastmim.data.scan import main, scanned_bad

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    src, files = shards
    root = tmp_path / "dl"
    shutil.copytree(src, root)
    bad = truncated_member_shard(tmp_path / "b" / "shard-0009.tar", files[:4], 2, "k{:03d}.jpg")
    assert scanned_bad(list_tar_shards(root)) is None
    assert main([str(root), "--quiet", "--workers", "0", "--out", str(tmp_path / "elsewhere.txt")]) == 0
    for spelled in (f"{root}/shard-{{0000..0001}}.tar", f"{root}/shard-000[02].tar", str(root / "shard-0001.tar")):
        assert scanned_bad(list_tar_shards(spelled)) == 0, spelled
    moved = tmp_path / "moved"
    os.rename(root, moved)
    assert scanned_bad(list_tar_shards(f"{moved}/*.tar")) == 0  # (the same bytes: a move keeps name, size, time)
    assert main([str(bad / "shard-0009.tar"), "--quiet", "--workers", "0"]) == 0
    assert scanned_bad([str(bad / "shard-0009.tar"), str(moved / "shard-0000.tar")]) == 1
    (moved / "shard-0001.tar").touch()  # changed since
    assert scanned_bad(list_tar_shards(moved)) is None
    if dali_problem() is None:
        kind, _, why = pretrain._choose_loader(PretrainConfig(data_path=f"{moved}/shard-000[02].tar"))
        assert (kind, why) == ("dali", "webdataset tar shards, 2 shards scanned clean")


def test_shard_clearance_tells_same_named_shards_apart_and_reads_an_earlier_scan(tmp_path, shards, monkeypatch):
    """Two shards of one name, size and time (tar pads to 10 KiB records) shared one scan record: the last scan's
    verdict cleared the other. Members now count in the key. A scan list written before the per-shard records (an
    earlier fastmim's, still up to date) clears the shards it covers, as it did."""
    import os
    import shutil

    from fastmim.data.scan import _shard_scan_path, scan, scanned_bad

    monkeypatch.setenv("FASTMIM_CACHE", str(tmp_path / "cache"))
    _, files = shards
    blob = open(files[0], "rb").read()
    for folder, second in (("A", "x1.jpg"), ("B", "y1.jpg")):  # the same sizes, another member name
        (tmp_path / folder).mkdir()
        with tarfile.open(tmp_path / folder / "s.tar", "w") as tar:
            for name in ("x0.jpg", second):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        os.utime(tmp_path / folder / "s.tar", ns=(10**18, 10**18))
    a, b = str(tmp_path / "A" / "s.tar"), str(tmp_path / "B" / "s.tar")
    assert os.path.getsize(a) == os.path.getsize(b) and _shard_scan_path(a)[1] != _shard_scan_path(b)[1]
    scan(a, workers=0, progress=False)
    assert scanned_bad([a]) == 0 and scanned_bad([b]) is None
    root = tmp_path / "dl"
    shutil.copytree(shards[0], root)
    scan(root, workers=0, progress=False)
    shutil.rmtree(tmp_path / "cache" / "tar-scans")  # (as an earlier fastmim left the cache: its scan list alone)
    assert scanned_bad(list_tar_shards(root)) == 0
    assert len(list((tmp_path / "cache" / "tar-scans").glob("*.json"))) == 3  # (recorded from it)
    assert scanned_bad(list_tar_shards(root)[:1]) == 0


def test_a_missing_shard_in_a_folder_that_cannot_be_listed_is_still_a_clear_error(tmp_path, shards, monkeypatch):
    import os

    src, _ = shards
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(FileNotFoundError, match=r"do not exist: '.*shard-0009.tar'$"):
        list_tar_shards(f"{src}/shard-{{0008..0009}}.tar")
    monkeypatch.setattr(os, "listdir", real)
