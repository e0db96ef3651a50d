"""Device-resident loader and batched augmentation."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from balpoe.data.augment import augment_batch, normalize, random_crop_flip, random_rotation
from balpoe.data.device_loader import DeviceLoader


def _imgs(n=32, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_no_crop_no_flip_is_identity():
    x = _imgs()
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator().manual_seed(0)), x)
    assert torch.equal(augment_batch(x, 0, False, 0.0, torch.Generator()), x.float())


def test_flip_is_per_sample():
    x = _imgs(64)
    out = random_crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54  # both outcomes occur


def test_crop_is_a_window_of_the_zero_padded_image():
    x = _imgs(16, h=6, w=7)
    p = 2
    out = random_crop_flip(x, p, False, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for o, pad in zip(out, padded):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(o, pad[:, dy:dy + 6, dx:dx + 7])]
        assert hits, "output is not a crop of the padded input"
        offsets.add(hits[0])
    assert len(offsets) > 3  # per-sample offsets


def test_rotation_zero_is_identity_and_rotation_keeps_centre():
    x = torch.rand(4, 1, 9, 9) * 255
    assert torch.equal(random_rotation(x, 0.0, torch.Generator()), x)
    r = random_rotation(x, 15.0, torch.Generator().manual_seed(0))
    assert r.shape == x.shape
    assert torch.equal(r[:, :, 4, 4], x[:, :, 4, 4])  # rotation about the centre pixel
    assert not torch.equal(r, x)


def test_rotation_equals_torchvision_tensor_rotate_and_differs_from_pil_only_at_ties():
    """Per-sample rotation on the device against torchvision's ``rotate`` for the same angles (nearest,
    fill 0, about the centre): on uint8 tensors (torchvision's affine grid) equal up to float32 ties;
    on PIL images (the official CIFAR pipeline's ``RandomRotation``; PIL's fixed-point NEAREST) a few
    tie pixels per image take the neighbouring source pixel (README, Fidelity)."""
    n = 200
    x = _imgs(n=n, c=3, h=32, w=32, seed=3)
    ours = random_rotation(x.float(), 15.0, torch.Generator().manual_seed(5))
    angles = (torch.rand(n, generator=torch.Generator().manual_seed(5)) * 2 - 1) * (15.0 * math.pi / 180)
    pil = torch.stack([torch.from_numpy(np.array(TF.rotate(Image.fromarray(img.permute(1, 2, 0).numpy()),
                                                           math.degrees(a.item())))).permute(2, 0, 1)
                       for img, a in zip(x, angles)]).float()
    tensor = torch.stack([TF.rotate(img, math.degrees(a.item())) for img, a in zip(x, angles)]).float()
    pil_px = (ours != pil).any(1).flatten(1).sum(1)
    tv_px = (ours != tensor).any(1).flatten(1).sum(1)
    assert (tv_px > 0).float().mean() <= 0.02 and tv_px.max() <= 4
    assert 0 < (pil_px > 0).float().mean() <= 0.2 and pil_px.max() <= 12


def test_normalize_closed_form():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 0.2])
    expected = (x.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(normalize(x.float(), mean, std), expected, atol=1e-5)


def test_loader_epoch_covers_every_image_once_and_is_reproducible():
    x = _imgs(50)
    y = torch.arange(50)
    dl = DeviceLoader(x, y, 16, [0.5] * 3, [0.25] * 3, train=True, padding=1, flip=True, rotation=10, seed=5)
    assert len(dl) == 4
    dl.set_epoch(0)
    ys = torch.cat([b for _, b in dl])
    assert sorted(ys.tolist()) == list(range(50)) and ys.tolist() != list(range(50))
    a = [b.clone() for b, _ in dl]
    b = [b.clone() for b, _ in dl]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    dl.set_epoch(1)
    assert torch.cat([b for _, b in dl]).tolist() != ys.tolist()


def test_eval_loader_is_ordered_and_unaugmented():
    x = _imgs(10)
    dl = DeviceLoader(x, torch.arange(10), 4, [0.0] * 3, [1 / 255] * 3, train=False, padding=4, flip=True)
    xs, ys = zip(*dl)
    assert torch.cat(ys).tolist() == list(range(10))
    assert torch.allclose(torch.cat(xs), x.float(), atol=1e-3)


@pytest.mark.parametrize("n", [50, 51])
def test_loader_shards_like_distributed_sampler(n):
    x = _imgs(n)
    y = torch.arange(n)
    full = DeviceLoader(x, y, 1000, [0.5] * 3, [0.25] * 3, train=True, seed=2)
    order = torch.cat([b for _, b in full])
    shards = [torch.cat([b for _, b in DeviceLoader(x, y, 8, [0.5] * 3, [0.25] * 3, train=True, seed=2, rank=r,
                                                  world_size=2)]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    padded = torch.cat([order, order[: 2 * ((n + 1) // 2) - n]])
    assert torch.equal(shards[0], padded[0::2]) and torch.equal(shards[1], padded[1::2])


def test_class_balanced_loader_draws_an_epoch_of_samples():
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    dl = DeviceLoader(_imgs(100), y, 32, [0.5] * 3, [0.25] * 3, train=True, sampler="class_balanced")
    drawn = torch.cat([b for _, b in dl])
    assert len(drawn) == 100
    counts = torch.bincount(drawn, minlength=3)
    assert counts[2] > 15  # the single tail image is drawn ~1/3 of the time, not 1/100
