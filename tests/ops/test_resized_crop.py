"""resized_crop (the GPU loader's batched random-resized crop): the reference against torchvision's RandomResizedCrop
on PIL images (what the CPU loader runs), every backend against the reference (shrinking and enlarging crops, odd and
one-pixel sides, grey images, flips, float input, low-precision output), bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from fastmim.ops import resized_crop, resized_crop_ref
from fastmim.ops.reference import IMAGENET_MEAN, IMAGENET_STD

OP = "resized_crop"  # no C++ or CUDA kernel: the backend fixture skips those


def _images(shapes, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in shapes:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        smooth = torch.stack([(xx * 7 + yy * 3 + 40 * c) % 256 for c in range(channels)]).float()
        noise = torch.randint(0, 60, (channels, h, w), generator=g).float()
        out.append(((smooth + noise) % 256).to(torch.uint8))
    return out


SHAPES = [(37, 53), (20, 11), (64, 41), (5, 7), (1, 1), (90, 70)]
BOXES = torch.tensor([[3, 4, 30, 40], [0, 0, 20, 11], [10, 2, 50, 13], [1, 2, 3, 4], [0, 0, 1, 1], [0, 0, 90, 70]])
FLIPS = torch.tensor([True, False, True, False, True, False])


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_reference_is_torchvisions_random_resized_crop_on_pil_images(interp):
    """The CPU loader's pixels (PIL crop + bicubic resize with its 8-bit passes, flip, ToTensor, Normalize) within
    PIL's rounding of the reference's, on photo-like images. (At hard edges, where the bicubic filter overshoots and
    a pass clips, the order of the passes matters: Pillow picks it per resize, the reference always goes rows first.)"""
    g = torch.Generator().manual_seed(1)
    imgs = []
    for h, w in [(75, 100), (100, 75), (60, 60)]:
        yy, xx = torch.meshgrid(torch.linspace(0, 3, h), torch.linspace(0, 3, w), indexing="ij")
        smooth = torch.stack([torch.sin(xx + c) * torch.cos(yy * (c + 1)) for c in range(3)]) * 90 + 128
        imgs.append((smooth + torch.randn(3, h, w, generator=g) * 6).clamp(0, 255).round().to(torch.uint8))
    boxes = torch.tensor([[5, 10, 60, 70], [0, 3, 40, 30], [10, 10, 9, 12]])  # shrink, shrink, enlarge
    flips = torch.tensor([False, True, True])
    ref = resized_crop_ref(imgs, boxes, flips, 32, interp=interp)
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for n, img in enumerate(imgs):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        top, left, h, w = boxes[n].tolist()
        out = TF.resized_crop(pil, top, left, h, w, [32, 32], TF.InterpolationMode(interp))
        if flips[n]:
            out = TF.hflip(out)
        want = (TF.to_tensor(out) - m) / s
        diff = ((ref[n] - want) * s * 255).abs()  # in 0-255 levels
        assert diff.max() <= 1.5 and diff.mean() <= 0.5, (n, diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_backends_match_the_reference(backend, interp):
    device, _ = backend
    imgs = [x.to(device) for x in _images(SHAPES)]
    cases = [(imgs, BOXES, FLIPS, 16), (imgs, BOXES, FLIPS, 23)]
    # to one pixel: a 40-row crop takes 161 taps per output (the interpreter runs them one by one: a small batch)
    cases.append(([imgs[2], imgs[4]], torch.tensor([[3, 5, 40, 30], [0, 0, 1, 1]]), torch.tensor([True, False]), 1))
    for batch, boxes, flips, size in cases:
        out = resized_crop(batch, boxes, flips, size, interp=interp)
        ref = resized_crop_ref([x.cpu() for x in batch], boxes, flips, size, interp=interp)
        assert out.shape == (len(batch), 3, size, size) and out.dtype == torch.float32 and out.device == device
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-4)


def test_flip_mirrors_and_channels_are_normalised_apart(backend):
    device, _ = backend
    imgs = [x.to(device) for x in _images([(30, 40)], seed=2, channels=1)]
    box = torch.tensor([[2, 3, 25, 31]])
    plain = resized_crop(imgs, box, torch.tensor([False]), 12, mean=(0.5,), std=(0.25,))
    mirrored = resized_crop(imgs, box, torch.tensor([True]), 12, mean=(0.5,), std=(0.25,))
    torch.testing.assert_close(mirrored, plain.flip(-1), rtol=0, atol=0)
    ref = resized_crop_ref([imgs[0].cpu()], box, torch.tensor([False]), 12, mean=(0.5,), std=(0.25,))
    torch.testing.assert_close(plain.cpu(), ref, rtol=1e-5, atol=1e-4)


def test_float_images_and_low_precision_output(backend):
    device, _ = backend
    imgs = [x.float().to(device) for x in _images(SHAPES[:3])]
    ref = resized_crop_ref([x.cpu() for x in imgs], BOXES[:3], FLIPS[:3], 16)
    torch.testing.assert_close(resized_crop(imgs, BOXES[:3], FLIPS[:3], 16).cpu(), ref, rtol=1e-5, atol=1e-4)
    for dt in (torch.bfloat16, torch.float16):
        out = resized_crop(imgs, BOXES[:3], FLIPS[:3], 16, out_dtype=dt)
        assert out.dtype == dt
        torch.testing.assert_close(out.cpu().float(), ref, rtol=1e-2, atol=2e-2)


def test_empty_batch():
    out = resized_crop([], torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), 8)
    assert out.shape == (0, 3, 8, 8)


@pytest.mark.parametrize(
    "boxes, flips, size, match",
    [
        (torch.tensor([[0, 0, 38, 10]]), torch.tensor([False]), 8, r"box 0 \[0, 0, 38, 10\] .* not inside its 37x53"),
        (torch.tensor([[-1, 0, 5, 5]]), torch.tensor([False]), 8, "not inside"),
        (torch.tensor([[0, 0, 0, 5]]), torch.tensor([False]), 8, "not inside"),
        # values whose sums wrap past int64 (top + height < 0): refused, not cut to the kernels' int32
        (torch.tensor([[0, 2**63 - 2**30, 20, 2**32 + 10]]), torch.tensor([False]), 8, "not inside"),
        (torch.tensor([[0, 2**63 - 3, 15, 10]]), torch.tensor([False]), 8, "not inside"),
        (torch.tensor([[2**62, 3, 2**62, 20]]), torch.tensor([False]), 8, "not inside"),
        (torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([False]), 8, "boxes must be a CPU integer tensor"),
        (torch.tensor([[0, 0, 5, 5, 1]]), torch.tensor([False]), 8, r"boxes must be .*\[1, 4\]"),
        (torch.tensor([[0, 0, 5, 5]]), torch.tensor([False, True]), 8, r"flips must be a CPU tensor \[1\]"),
        (torch.tensor([[0, 0, 5, 5]]), torch.tensor([False]), 0, "size must be a positive int"),
    ],
)
def test_bad_input_is_named(boxes, flips, size, match):
    with pytest.raises(ValueError, match=match):
        resized_crop(_images([(37, 53)]), boxes, flips, size)
    with pytest.raises(ValueError, match="interp must be one of bicubic, bilinear, got 'nearest'"):
        resized_crop(_images([(37, 53)]), torch.tensor([[0, 0, 5, 5]]), torch.tensor([False]), 8, interp="nearest")


def test_images_that_do_not_match_are_named():
    imgs = _images([(10, 10), (10, 10)])
    box = torch.tensor([[0, 0, 5, 5], [0, 0, 5, 5]])
    with pytest.raises(ValueError, match=r"image 1 is torch.float32 .* all must be \[3, H, W\] alike"):
        resized_crop([imgs[0], imgs[1].float()], box, torch.tensor([False, False]), 4)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        resized_crop(imgs, box, torch.tensor([False, False]), 4, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"image 0 is torch.uint8 \(1, 3, 10, 10\); images must be real \[C, H, W\]"):
        resized_crop([imgs[0][None], imgs[1]], box, torch.tensor([False, False]), 4)  # a batch, not an image
    with pytest.raises(ValueError, match="image 1 is list"):
        resized_crop([imgs[0], [1, 2]], box, torch.tensor([False, False]), 4)


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_large_shrink_uses_every_tap(backend, interp):
    """A 500-px crop to 7 px: about 290 (bilinear 145) taps per output pixel, all weighed (a tap bound too small would
    drop some)."""
    device, _ = backend
    rng = np.random.default_rng(3)
    img = torch.from_numpy(rng.integers(0, 256, (3, 20, 500), dtype=np.uint8)).to(device)
    box, flip = torch.tensor([[0, 0, 20, 500]]), torch.tensor([False])
    out = resized_crop([img], box, flip, 7, interp=interp)
    want = resized_crop_ref([img.cpu()], box, flip, 7, interp=interp)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-4)
