"""The torchvision/PIL loader: shapes and values, seeding, sharding, and the same view of a dataset as DALI's."""

from __future__ import annotations

import pytest
import torch

from fastmim.data import ImageFolderDataset, build_pretrain_loader, pretrain_transform
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tv"), n=24, size=(90, 70))


def batches(folder, seed=0, rank=0, world=1, workers=0, batch=4):
    ds = ImageFolderDataset(folder, pretrain_transform(32), seed=seed)
    loader, sampler = build_pretrain_loader(ds, batch, workers, rank, world, seed=seed)
    sampler.set_epoch(0)
    return [(x.clone(), i.clone()) for x, i in loader]


def test_shapes_dtypes_and_value_range(folder):
    got = batches(folder, batch=5)
    assert len(got) == 4  # 24 images, drop-last batches of 5
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    for x, idx in got:
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
        assert idx.shape == (5,) and idx.dtype == torch.int64
        assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4 and float(x.std()) > 0.05


def test_the_same_seed_gives_the_same_batches_whatever_the_workers(folder):
    a, b, c = batches(folder, seed=3), batches(folder, seed=3, workers=2), batches(folder, seed=4)
    assert all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a, b, strict=True))
    assert not all(torch.equal(i, j) for (_, i), (_, j) in zip(a, c, strict=True))


def test_ranks_split_the_dataset_without_overlap_or_loss(folder):
    seen = [set(torch.cat([i for _, i in batches(folder, rank=r, world=3)]).tolist()) for r in range(3)]
    assert all(not (seen[a] & seen[b]) for a in range(3) for b in range(a + 1, 3))
    assert set().union(*seen) == set(range(24))


def test_a_loader_refuses_a_dataset_smaller_than_one_global_batch(folder):
    ds = ImageFolderDataset(folder, pretrain_transform(32))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_pretrain_loader(ds, 16, 0, 0, 2)
