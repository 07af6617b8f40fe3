"""--loader torch-gpu (fastmim.data.gpu_decode): the same samples, order and crops as the torch loader; batches
independent of worker count and prefetching; byte batching with files nvJPEG does not take (PNG, CMYK) augmented in
the worker; a JPEG the decoder rejects decoded by PIL; files nothing decodes named, or replaced by the torch loader's
stand-in; the CLI's choice, exact resume. Everything but the CUDA decode runs here (torchvision's CPU decoder stands
in for nvJPEG); ``-m gpu`` checks nvJPEG's pixels against the CPU loader's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim import pretrain
from fastmim.config import PretrainConfig
from fastmim.data import BadImageError, ImageFolderDataset, build_pretrain_loader, pretrain_transform
from fastmim.data.gpu_decode import EncodedImages, EncodedSample, GpuDecodeLoader, collate_encoded
from fastmim.data.transforms import IMAGENET_STD, denormalize
from fastmim.train.checkpoint import load_checkpoint
from tests.conftest import TINY_ARGS, make_image_folder

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised images in 0-255 levels."""
    return (a.cpu() - b.cpu()).abs() * STD * 255


def _loaders(root, batch=4, workers=0, prefetch=0, seed=5, skip_bad=False, device="cpu", size=48, interp=None,
             crop="random-resized"):  # fmt: skip
    base = ImageFolderDataset(root, pretrain_transform(size, interp=interp, crop=crop), seed=seed)
    encoded, sampler = build_pretrain_loader(EncodedImages(base), batch, workers, seed=seed, skip_bad=skip_bad,
                                             collate_images=collate_encoded)  # fmt: skip
    gpu = GpuDecodeLoader(encoded, base, torch.device(device), size, skip_bad=skip_bad, seed=seed, prefetch=prefetch)
    return base, gpu, sampler


def _epoch(loader, sampler, base, epoch):
    sampler.set_epoch(epoch)
    base.set_epoch(epoch)
    return [(imgs.cpu(), idx) for imgs, idx, *_ in loader]


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "d", n=12, size=(60, 84))


@pytest.mark.parametrize(
    ("crop", "interp"),
    [("random-resized", None), ("random-resized", "bilinear"), ("simple", None), ("simple", "bicubic")],
)  # MAE's bicubic crop; SimMIM's and I-JEPA's bilinear one; PixMIM's simple crop (bilinear), and bicubic
def test_same_samples_and_crops_as_the_torch_loader(folder, crop, interp):
    base, gpu, sampler = _loaders(folder, workers=2, prefetch=2, interp=interp, crop=crop)
    assert (gpu.crop, gpu.interp) == (crop, interp or ("bicubic" if crop == "random-resized" else "bilinear"))
    ref_base = ImageFolderDataset(folder, pretrain_transform(48, interp=interp, crop=crop), seed=5)
    ref, ref_sampler = build_pretrain_loader(ref_base, 4, 0, seed=5)
    for epoch in (0, 1):
        got = _epoch(gpu, sampler, base, epoch)
        want = _epoch(ref, ref_sampler, ref_base, epoch)
        assert len(got) == len(want) == 3
        for (a, ia), (b, ib) in zip(got, want, strict=True):
            assert torch.equal(ia, ib)
            d = _levels(a, b)  # libjpeg-turbo's pixels, PIL's 8-bit resize passes against fp32 ones
            # (where the synthetic images wrap from 255 to 0, bicubic overshoots: PIL clips its 8-bit intermediate
            # between the passes, the fp32 kernel does not; up to 16 levels there, on a few pixels of some crops)
            far = float((d > 3.0).flatten(1).float().mean(1).max())  # per image: a bug in one image shows
            assert d.mean() <= 0.6 and far <= 0.02 and d.max() <= 24.0, (d.max().item(), d.mean().item(), far)
    first, second = _epoch(gpu, sampler, base, 0), _epoch(gpu, sampler, base, 1)
    assert not torch.equal(first[0][1], second[0][1])  # a new order (and new crops) each epoch


def test_batches_do_not_depend_on_workers_or_prefetching(folder):
    runs = []
    for workers, prefetch in ((0, 0), (2, 2), (1, 1)):
        base, gpu, sampler = _loaders(folder, workers=workers, prefetch=prefetch)
        runs.append(_epoch(gpu, sampler, base, 3))
    for other in runs[1:]:
        for (a, ia), (b, ib) in zip(runs[0], other, strict=True):
            assert torch.equal(ia, ib) and torch.equal(a, b)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_byte_batching_and_files_nvjpeg_does_not_take(tmp_path):
    """A batch of a JPEG, a grey JPEG, a PNG and a CMYK JPEG: the JPEGs' bytes end to end with their places and crops;
    the PNG and the CMYK JPEG augmented in the worker, exactly as the torch loader does them."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:50, 0:70]
    smooth = np.stack([np.sin(xx / 9 + c) * np.cos(yy / 7) * 90 + 128 for c in range(3)], -1)
    photo = Image.fromarray(np.clip(smooth + rng.normal(0, 5, smooth.shape), 0, 255).astype(np.uint8))
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.jpg").write_bytes(_jpeg(photo))
    (root / "b.jpg").write_bytes(_jpeg(photo.convert("L")))
    photo.save(root / "c.png")
    (root / "d.jpg").write_bytes(_jpeg(photo.convert("CMYK")))
    base = ImageFolderDataset(root, pretrain_transform(32), seed=1)
    enc = EncodedImages(base)
    items = [enc[i] for i in range(4)]
    assert [isinstance(x, EncodedSample) for x in items] == [True, True, False, False]
    batch = collate_encoded(items)
    assert batch.size == 4 and batch.positions.tolist() == [0, 1] and batch.done_positions.tolist() == [2, 3]
    for j, name in enumerate(("a.jpg", "b.jpg")):
        assert batch.data[batch.offsets[j] : batch.offsets[j + 1]].numpy().tobytes() == (root / name).read_bytes()
    torch.testing.assert_close(batch.done, torch.stack([base[2], base[3]]), rtol=0, atol=0)
    loader, sampler = build_pretrain_loader(enc, 4, 0, seed=1, collate_images=collate_encoded)
    imgs, idx = next(iter(GpuDecodeLoader(loader, base, torch.device("cpu"), 32, prefetch=0)))
    want = torch.stack([base[int(i)] for i in idx])
    d = _levels(imgs, want)
    assert d.max() <= 3.0 and d.mean() <= 0.6
    grey = denormalize(imgs[idx == 1])[0] * 255  # a grey JPEG comes out as RGB with equal channels
    assert (grey[0] - grey[1]).abs().max() <= 1 and (grey[0] - grey[2]).abs().max() <= 1


def _victim_folder(tmp_path) -> tuple[Path, Path]:
    root = make_image_folder(tmp_path / "d", n=12, size=(60, 84))
    victim = sorted(root.rglob("*.jpg"))[5]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])  # a readable header, a third of the data: no decoder finishes it
    return root, victim


def test_a_jpeg_no_decoder_finishes_is_named(tmp_path):
    root, victim = _victim_folder(tmp_path)
    base, gpu, sampler = _loaders(root, workers=2, prefetch=2)
    with pytest.raises(BadImageError, match=f"cannot read image '{victim}'"):
        _epoch(gpu, sampler, base, 0)


def test_a_file_that_is_no_image_is_named_by_the_worker(tmp_path):
    root = make_image_folder(tmp_path / "d", n=8, size=(60, 84))
    victim = sorted(root.rglob("*.jpg"))[2]
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    base, gpu, sampler = _loaders(root, workers=2, prefetch=2)
    with pytest.raises(BadImageError) as err:
        _epoch(gpu, sampler, base, 0)
    assert f"cannot read image '{victim}'" in err.value.summary()


def test_skip_bad_sends_the_torch_loaders_stand_in(tmp_path):
    root, victim = _victim_folder(tmp_path)
    base, gpu, sampler = _loaders(root, skip_bad=True, prefetch=2)
    bad = base.files.index(str(victim))
    batches = _epoch(gpu, sampler, base, 0)
    idx = torch.cat([i for _, i in batches])
    imgs = torch.cat([x for x, _ in batches])
    stand_ins = (idx < 0).nonzero().flatten().tolist()
    assert len(stand_ins) == 1 and bad not in idx.tolist()
    j = -1 - int(idx[stand_ins[0]])
    from fastmim.data import replacement_index

    assert j == replacement_index(bad, 1, len(base), 5)
    torch.testing.assert_close(imgs[stand_ins[0]], base[j], rtol=0, atol=0)  # the CPU pipeline's, same crop


def test_a_jpeg_the_decoder_rejects_is_decoded_by_pil(folder, monkeypatch):
    import fastmim.data.gpu_decode as gd

    base, gpu, sampler = _loaders(folder, prefetch=0)
    real = gd.decode_jpegs
    rejected = Path(base.files[3]).read_bytes()

    def picky(datas, device):
        if any(d.numpy().tobytes() == rejected for d in datas):
            raise RuntimeError("nvJPEG: unsupported JPEG (a stand-in for what the GPU decoder refuses)")
        return real(datas, device)

    monkeypatch.setattr(gd, "decode_jpegs", picky)
    batches = _epoch(gpu, sampler, base, 0)
    assert gpu.stats["cpu_fallbacks"] == 1
    idx = torch.cat([i for _, i in batches])
    imgs = torch.cat([x for x, _ in batches])
    pos = int((idx == 3).nonzero())
    torch.testing.assert_close(imgs[pos], base[3], rtol=0, atol=0)
    others = [int(i) for i in idx if int(i) != 3]
    d = _levels(imgs[idx != 3], torch.stack([base[i] for i in others]))
    assert d.max() <= 3.0


def test_a_stand_in_nothing_decodes_is_replaced_by_its_own_stand_in(tmp_path):
    """A file that is no image is replaced in the worker by its stand-in j (sent as -1 - j); when j's data is
    truncated too, the decoding side puts j's own stand-in there, still sent as a stand-in, with its pixels."""
    from fastmim.data import replacement_index

    root = make_image_folder(tmp_path / "d", n=12, size=(60, 84))
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    n, seed = len(files), 5
    victim = 2
    j = replacement_index(victim, 1, n, seed)
    Path(files[victim]).write_bytes(b"not an image at all")
    good = Path(files[j]).read_bytes()
    Path(files[j]).write_bytes(good[: len(good) // 3])  # a readable header: the worker sends it to the decoder
    base, gpu, sampler = _loaders(root, skip_bad=True, workers=1, prefetch=2, seed=seed)
    assert base.files == files
    batches = _epoch(gpu, sampler, base, 0)
    idx = torch.cat([i for _, i in batches])
    imgs = torch.cat([x for x, _ in batches])
    sent = sorted(-1 - int(i) for i in idx if i < 0)
    k = replacement_index(j, 1, n, seed)
    assert sent == sorted([k, k]), (sent, victim, j, k)  # j's own place and the victim's both get k
    for pos in (idx < 0).nonzero().flatten().tolist():
        want = base[-1 - int(idx[pos])]  # the stand-in's own pixels and crop, not those of files[-1 - j]
        torch.testing.assert_close(imgs[pos], want, rtol=0, atol=0)
    assert gpu.stats["cpu_fallbacks"] == 2


def test_crops_in_chunks_give_the_same_batch(folder, monkeypatch):
    import fastmim.data.gpu_decode as gd

    base, gpu, sampler = _loaders(folder, prefetch=0)
    whole = _epoch(gpu, sampler, base, 2)
    monkeypatch.setattr(gd, "CROP_CHUNK_BYTES", 60 * 84 * 3 + 1)  # one image per resized_crop call
    chunked = _epoch(gpu, sampler, base, 2)
    for (a, ia), (b, ib) in zip(whole, chunked, strict=True):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    assert list(gd._chunks(list("abcd"), [3, 3, 5, 1], 6)) == [["a", "b"], ["c", "d"]]
    assert list(gd._chunks(list("ab"), [9, 1], 6)) == [["a"], ["b"]]  # one over the limit goes alone


def test_stats_count_the_batches_delivered_and_closing_does_not_wait_on_a_stuck_reader(folder, monkeypatch):
    import threading
    import time

    import fastmim.data.gpu_decode as gd

    base, gpu, sampler = _loaders(folder, prefetch=2)
    sampler.set_epoch(0)
    for _ in gpu:
        break  # the thread has decoded more than this one
    assert gpu.stats["batches"] == 1
    stuck = threading.Event()

    class StuckAfterOne:  # a loader whose second batch never comes (a worker hung on a network file)
        collate_fn = None

        def __len__(self):
            return 3

        def __iter__(self):
            yield next(iter(gpu.loader))
            stuck.wait(60)

    monkeypatch.setattr(gd, "CLOSE_TIMEOUT_S", 0.5)
    hung = GpuDecodeLoader(StuckAfterOne(), base, torch.device("cpu"), 48, prefetch=1)
    it = iter(hung)
    next(it)
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 5.0
    stuck.set()


def test_seeded_draws_leave_the_cuda_generators_alone(folder, monkeypatch):
    """A sample's seeded crop draw (in the training process: the monitor, the GPU loader's fallbacks) must not
    reseed the CUDA generators (drop path, noise), which fork_rng(devices=[]) would not restore."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    base = ImageFolderDataset(folder, pretrain_transform(32), seed=5)
    state = torch.get_rng_state()
    first = base[1]
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
    torch.rand(3)  # the process's generator moves on; the sample's draw does not
    torch.testing.assert_close(base[1], first, rtol=0, atol=0)


def test_auto_decodes_on_the_gpu_where_dali_does_not_read(image_folder, monkeypatch):
    import fastmim.data.gpu_decode as gd

    cfg = PretrainConfig(data_path=str(image_folder))  # unscanned: not for DALI
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gd, "gpu_decode_problem", lambda device: None)
    kind, root, why = pretrain.choose_loader(cfg, cuda)
    assert kind == "torch-gpu" and root == str(image_folder) and "decoded on the GPU" in why
    assert pretrain.choose_loader(cfg, torch.device("cpu"))[0] == "torch"
    monkeypatch.setattr(gd, "gpu_decode_problem", lambda device: "torchvision cannot decode JPEGs on the GPU here (x)")
    kind, _, why = pretrain.choose_loader(cfg, cuda)
    assert kind == "torch" and "torchvision cannot decode JPEGs on the GPU here" in why
    skip = PretrainConfig(data_path=str(image_folder), skip_bad_files=True)
    monkeypatch.setattr(gd, "gpu_decode_problem", lambda device: None)
    assert pretrain.choose_loader(skip, cuda)[0] == "torch-gpu"  # it can skip a sample; DALI cannot
    assert pretrain.choose_loader(PretrainConfig(data_path=str(image_folder), loader="torch"), cuda)[0] == "torch"


def test_cli_trains_with_torch_gpu_and_resumes_exactly(image_folder, tmp_path, capsys):
    common = [*TINY_ARGS, "--data-path", str(image_folder), "--epochs", "2", "--loader", "torch-gpu",
              "--num-workers", "1", "--vis-interval", "100"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain.run([*common, "--output-dir", str(straight), "--max-steps", "8"])
    assert "loader torch-gpu (1 worker read, decoding on the CPU: this run has no GPU)" in capsys.readouterr().out
    pretrain.run([*common, "--output-dir", str(split), "--max-steps", "3"])
    pretrain.run(["--resume", "--output-dir", str(split), "--max-steps", "8"])
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert (b["epoch"], b["batch"], b["step"]) == (1, 2, 8)
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("crop", ["random-resized", "simple"])
def test_nvjpeg_pixels_match_the_cpu_loaders(tmp_path, crop):
    root = make_image_folder(tmp_path / "d", n=16, size=(120, 160))
    base, gpu, sampler = _loaders(root, batch=8, workers=2, prefetch=2, device="cuda", size=64, crop=crop)
    ref_base = ImageFolderDataset(root, pretrain_transform(64, crop=crop), seed=5)
    ref, ref_sampler = build_pretrain_loader(ref_base, 8, 0, seed=5)
    got, want = _epoch(gpu, sampler, base, 0), _epoch(ref, ref_sampler, ref_base, 0)
    for (a, ia), (b, ib) in zip(got, want, strict=True):
        assert torch.equal(ia, ib)
        d = _levels(a, b)  # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a level or two
        # (and PIL's clipped 8-bit intermediate at the synthetic 255->0 wraps: see the CPU test above)
        far = float((d > 6.0).flatten(1).float().mean(1).max())  # per image
        assert d.mean() <= 1.5 and far <= 0.02 and d.max() <= 32.0, (d.max().item(), d.mean().item(), far)
    assert gpu.stats["cpu_fallbacks"] == 0


@pytest.mark.gpu
def test_nvjpeg_names_a_truncated_jpeg(tmp_path):
    root, victim = _victim_folder(tmp_path)
    base, gpu, sampler = _loaders(root, workers=2, prefetch=2, device="cuda")
    with pytest.raises(BadImageError, match=f"cannot read image '{victim}'"):
        _epoch(gpu, sampler, base, 0)


@pytest.mark.parametrize(
    "size", [(84, 60), (60, 84), (500, 375), (1, 1), (400, 20), (20, 400), (3, 7)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_crop_draws_with_a_generator_are_torchvisions_draws(size):
    """crop_and_flip with an explicit generator gives the box and flip torchvision's transform draws from the global
    generator in the same state (extreme aspect ratios reach the centred fallback)."""
    from fastmim.data.transforms import crop_and_flip, pretrain_steps

    t = pretrain_transform(32)
    crop, flip = pretrain_steps(t)
    img = Image.new("RGB", size)
    with torch.random.fork_rng(devices=[]):
        for seed in range(60):
            torch.random.default_generator.manual_seed(seed)
            want = (crop.get_params(img, crop.scale, crop.ratio), bool(torch.rand(1) < flip.p))
            torch.random.default_generator.manual_seed(seed + 1)  # the global state must not matter
            assert crop_and_flip(t, img, torch.Generator().manual_seed(seed)) == want, seed


def test_the_loader_thread_leaves_the_global_generator_alone(folder, monkeypatch):
    """With workers=0 the crops are drawn in the GPU loader's thread while the training thread draws masks and drop
    paths from torch's global generator: the loader's draws must not touch it (they did: seeded() reseeds it)."""
    base = ImageFolderDataset(folder, pretrain_transform(48), seed=5)
    enc = EncodedImages(base)
    seeded = []
    monkeypatch.setattr(type(base), "seeded", lambda self, i: seeded.append(i))
    state = torch.random.get_rng_state()
    samples = [enc[i] for i in range(len(base))]
    assert torch.equal(torch.random.get_rng_state(), state) and not seeded
    assert {type(s) for s in samples} == {EncodedSample}
    # and the crops are still (seed, epoch, index)'s: another epoch draws others, the same epoch the same
    base.set_epoch(1)
    again = [enc[i] for i in range(len(base))]
    base.set_epoch(0)
    assert [s.box for s in samples] == [enc[i].box for i in range(len(base))]
    assert [s.box for s in samples] != [s.box for s in again]
