"""Each DALI row carries the image of the dataset index returned beside it: solid-colour images (image i has its own
colour) make the check exact whatever the crop and flip, for image files and tar shards, over epochs and across a
checkpoint restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.data.dali import dali_problem
from fastmim.data.folder import TarShardDataset, list_images
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.data.test_tar_shards import make_shards

pytestmark = pytest.mark.skipif(dali_problem() is not None, reason=f"optional dependency absent: {dali_problem()}")

N = 24
TOL = 4.0  # JPEG's error on a flat colour, in 0-255 units; neighbouring images differ by 9 in red


def colour(i: int) -> tuple[int, int, int]:
    return 20 + 9 * i, 220 - 7 * i, (40 * i) % 200 + 30


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    root = tmp_path_factory.mktemp("solid")
    for i in range(N):
        Image.new("RGB", (48 + 3 * i, 40 + 2 * i), colour(i)).save(root / f"img{i:03d}.jpg", quality=95)
    files = list_images(root)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"img{i:03d}.jpg" for i in range(N)]
    shards = make_shards(tmp_path_factory.mktemp("solid_wds") / "shards", files, per_shard=7, extra=False)
    return files, shards


def row_colours(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] normalised rows -> [B, 3] mean colour in 0-255."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).mean(dim=(2, 3)).numpy()


def check_rows(batches, what: str) -> int:
    n = 0
    for x, idx in batches:
        got = row_colours(x)
        for row, i in zip(got, idx.tolist(), strict=True):
            want = np.array(colour(i), dtype=np.float32)
            assert np.abs(row - want).max() <= TOL, f"{what}: the row given index {i} has colour {row}, not {want}"
            n += 1
    return n


def make_loader(source, kind: str, seed: int):
    from fastmim.data.dali import DaliLoader

    files, shards = source
    if kind == "files":
        return DaliLoader(files, 4, 32, num_threads=2, seed=seed)
    ds = TarShardDataset(shards)
    return DaliLoader(ds.files, 4, 32, num_threads=2, tars=ds.shards, tar_sizes=ds.sizes, seed=seed)


@pytest.mark.parametrize("kind", ["files", "tars"])
def test_every_row_is_the_image_of_its_index_over_epochs_and_a_restore(solid, kind):
    ld = make_loader(solid, kind, seed=5)
    assert check_rows([(x.clone(), i.clone()) for x, i in ld], f"{kind} epoch 0") == N
    ld.set_epoch(1)
    it = iter(ld)
    first = [tuple(t.clone() for t in next(it)) for _ in range(2)]
    state = ld.state_dict()
    rest = [(x.clone(), i.clone()) for x, i in it]
    assert check_rows(first + rest, f"{kind} epoch 1") == N
    again = make_loader(solid, kind, seed=5)
    again.load_state_dict(state)
    again.set_epoch(1, 2 * 4)
    restored = [(x.clone(), i.clone()) for x, i in again]
    assert check_rows(restored, f"{kind} restored mid-epoch 1") == N - 8
    assert [i.tolist() for _, i in restored] == [i.tolist() for _, i in rest]
    again.set_epoch(2)
    assert check_rows([(x.clone(), i.clone()) for x, i in again], f"{kind} epoch 2") == N


def test_the_check_sees_a_row_paired_with_another_index(solid):
    """The control: the same rows with their indices rotated by one fail the check."""
    ld = make_loader(solid, "files", seed=5)
    x, idx = next(iter(ld))
    with pytest.raises(AssertionError, match="has colour"):
        check_rows([(x, torch.roll(idx, 1))], "rotated")
