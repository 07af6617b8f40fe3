"""PathList / LabelledPaths: the packed file lists loader workers share without copying them."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest

from fastmim.data.folder import ImageFolderDataset
from fastmim.data.pathlist import LabelledPaths, PathList

# (a name that is not UTF-8, an empty one)
NAMES = ["/d/a.jpg", "/d/é/b.png", "/d/\udcff-latin1.jpg", "", "/d/c d.JPEG"]


def test_a_path_list_reads_back_every_name_as_a_list_does():
    p = PathList(NAMES)
    assert len(p) == 5 and list(p) == NAMES and [p[i] for i in range(5)] == NAMES and p == NAMES and p == tuple(NAMES)
    assert p[-1] == NAMES[-1] and p[np.int64(2)] == NAMES[2] and p[1:4] == NAMES[1:4] and p[::-2] == NAMES[::-2]
    assert p.index("/d/c d.JPEG") == 4 and "/d/a.jpg" in p and "/d/x" not in p
    assert p != NAMES[:4] and p != [*NAMES[:4], "/d/other"] and PathList(NAMES) == p and PathList(NAMES[:4]) != p
    assert min(p) == min(NAMES) and sorted(p) == sorted(NAMES)
    for bad in (5, -6):
        with pytest.raises(IndexError, match="out of range for 5 names"):
            p[bad]
    with pytest.raises(TypeError):
        p["0"]
    assert list(pickle.loads(pickle.dumps(p))) == NAMES and len(PathList()) == 0 and list(PathList()) == []
    assert "PathList(['/d/a.jpg'" in repr(p) and "5 names" in repr(p)
    pairs = LabelledPaths([(n, k % 2) for k, n in enumerate(NAMES)])
    assert list(pairs) == [(n, k % 2) for k, n in enumerate(NAMES)] and pairs[1] == ("/d/é/b.png", 1)
    assert all(type(y) is int for _, y in pairs) and pickle.loads(pickle.dumps(pairs)) == pairs and len(pairs) == 5


def _private_growth(ds, conn):  # in a forked child: what reading every name as __getitem__ does costs in private pages
    def private_kib():
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty"))

    before = private_kib()
    total = sum(len(ds.files[i]) for i in range(len(ds)))
    conn.send((private_kib() - before, total))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_forked_worker_reading_every_name_does_not_copy_the_list():
    """A Python list of names was copied page by page into every forked loader worker as its items' reference counts
    were written: about 120 bytes a name (150 MiB per worker for ImageNet). Packed, the names stay shared."""

    class Synthetic(ImageFolderDataset):
        def _list(self, root):
            return [f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(200) for i in range(1000)]

    ds = Synthetic("unused")
    as_list = Synthetic("unused")
    as_list.files = list(as_list.files)  # (what the dataset held before)
    growth = {}
    for name, d in (("packed", ds), ("list", as_list)):
        here, there = mp.get_context("fork").Pipe()
        child = mp.get_context("fork").Process(target=_private_growth, args=(d, there))
        child.start()
        growth[name], total = here.recv()
        child.join()
        assert total == sum(map(len, d.files))
    assert growth["list"] > 10_000, growth  # (the measurement sees the copy: 200k names, ~23 MB)
    assert growth["packed"] < 2_000, growth
