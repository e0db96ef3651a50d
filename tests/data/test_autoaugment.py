"""Batched strong augmentation (balpoe.data.autoaugment) against torchvision and timm.

Pixel parity: every op on a batch with per-sample magnitudes equals torchvision's
``autoaugment._apply_op`` (the functional ops AutoAugment / TrivialAugmentWide call) or timm's PIL
op on each image.  Distribution parity: the per-sample choices match torchvision's policy tables
(analytically) and timm's draws (recorded by replacing timm's op functions with recorders).
"""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as taa
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode, TrivialAugmentWide
from torchvision.transforms.autoaugment import _apply_op

from image_pairs import from_pil as _from_pil, to_pil as _to_pil, uint8_batch as _batch

from balpoe.data.autoaugment import (
    CIFAR10_POLICY, RAND_INCREASING_OPS, RAND_OPS, TV_OPS, WIDE_OPS, RandAugmentConfig, apply_op,
    autoaugment_cifar10, cutout, parse_randaugment, rand_augment, sample_autoaugment_cifar10,
    sample_rand_augment, sample_trivial_augment, strong_augment, trivial_augment_wide)
from balpoe.errors import BalpoeError

SHAPES = [(3, 20, 24), (1, 32, 32), (3, 32, 32)]


# ----------------------------------------------------------------------------- torchvision ops

TV_MAGNITUDES = {
    "ShearX": [-0.3, 0.1, 0.99, -0.6], "ShearY": [0.3, -0.1, 0.57, -0.99],
    "TranslateX": [-9.6, 3.0, 14.2, -32.0], "TranslateY": [9.6, -3.0, 0.7, 32.0],
    "Rotate": [-30.0, 12.5, 135.0, -4.3], "Posterize": [8, 4, 6, 2], "Solarize": [255.0, 0.0, 127.5, 28.33],
    **{op: [-0.9, -0.3, 0.45, 0.99] for op in ("Brightness", "Color", "Contrast", "Sharpness")},
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("fill", [None, "channels"])
def test_torchvision_ops_equal_functional_per_image(shape, interpolation, fill):
    # The affine grid is built with the same float32 operations as torchvision's _gen_affine_grid,
    # so even the resampling ops (nearest and bilinear) agree exactly, borders included.
    x = _batch(*shape)
    fill = None if fill is None else [128.0, 60.0, 7.0][: shape[0]]
    for op in TV_OPS:
        mags = TV_MAGNITUDES.get(op, [0.0] * 4)
        ours = apply_op(x, op, torch.tensor(mags, dtype=torch.float64), fill=fill, interpolation=interpolation)
        ref = torch.stack([_apply_op(xi, op, float(m), InterpolationMode(interpolation), fill)
                           for xi, m in zip(x, mags)])
        assert ours.dtype == torch.uint8 and ours.shape == x.shape
        assert torch.equal(ours, ref), f"{op} {shape} {interpolation} fill={fill}"


def test_torchvision_ops_change_the_images():
    x = _batch(3, 20, 24)
    for op in TV_OPS[1:]:
        out = apply_op(x, op, torch.tensor(TV_MAGNITUDES.get(op, [0.0] * 4), dtype=torch.float64))
        assert not torch.equal(out, x), op  # guards against a silently skipped op


# ----------------------------------------------------------------------------- timm (PIL) ops

TIMM_ARGS = {
    "Rotate": [13.7, -30.0, 7.5, 0.0], "ShearX": [0.3, -0.17, 0.05, -0.3], "ShearY": [-0.3, 0.17, 0.21, 0.0],
    "TranslateXRel": [0.45, -0.2, 0.1, -0.45], "TranslateYRel": [-0.45, 0.2, 0.13, 0.33],
    "TranslateX": [10.8, -3.0, 250.0, 0.5], "TranslateY": [-10.8, 3.25, 2.0, 7.0],
    "Posterize": [1, 4, 2, 8], "Solarize": [0, 100, 256, 128], "SolarizeAdd": [0, 50, 110, 33],
    **{op: [0.1, 1.0, 1.9, 0.55] for op in ("Color", "Contrast", "Brightness", "Sharpness")},
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_timm_ops_equal_pil_per_image(shape, interpolation):
    c = shape[0]
    x = _batch(*shape)
    fill = (124, 116, 104) if c == 3 else 128
    resample = Image.BILINEAR if interpolation == "bilinear" else Image.NEAREST
    for op in RAND_OPS + ("TranslateX", "TranslateY"):
        args = TIMM_ARGS.get(op)
        ours = apply_op(x, op, torch.tensor(args or [0.0] * 4, dtype=torch.float64), style="timm",
                        fill=fill, interpolation=interpolation)
        fn = taa.NAME_TO_OP[op]
        ref = torch.stack([_from_pil(fn(_to_pil(xi), *([] if args is None else [a]), fillcolor=fill,
                                        resample=resample), c) for xi, a in zip(x, args or [0] * 4)])
        diff = (ours.int() - ref.int()).abs()
        if op == "Rotate" and interpolation == "bilinear":
            # PIL rounds the rotation matrix to 15 decimals, which can move a truncation by one level.
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, op
        elif interpolation == "nearest" and fn in (taa.rotate, taa.shear_x, taa.shear_y, taa.translate_x_rel,
                                                   taa.translate_y_rel, taa.translate_x_abs, taa.translate_y_abs):
            # PIL's NEAREST affine runs in 16.16 fixed point; ties at exact pixel edges may pick the
            # neighbour.  Allow at most 1% of pixels to come from a neighbouring source pixel.
            assert (diff > 0).float().mean() <= 0.01, op
        else:
            assert torch.equal(ours, ref), f"{op} {shape} {interpolation}"


def test_timm_increasing_ops_use_the_base_op():
    x = _batch(3, 20, 24)
    arg = torch.tensor([0.3, 1.7, 1.0, 0.1], dtype=torch.float64)
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        assert torch.equal(apply_op(x, name, arg, style="timm"),
                           apply_op(x, name.replace("Increasing", ""), arg, style="timm"))


# ----------------------------------------------------------------------------- choice distributions

def _close(count, n, p, sigmas=4.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_autoaugment_cifar10_draws_match_torchvision_tables():
    n, size = 20000, (20, 24)
    aa = AutoAugment(AutoAugmentPolicy.CIFAR10)
    assert [tuple(map(tuple, sub)) for sub in aa.policies] == [tuple(map(tuple, s)) for s in CIFAR10_POLICY]
    space = aa._augmentation_space(10, size)
    # Expected number of (op, signed magnitude) events per image under torchvision's forward.
    expected = {}
    for sub in aa.policies:
        for name, p, k in sub:
            mags, signed = space[name]
            m = float(mags[k]) if k is not None else 0.0
            for sign, w in ([(1.0, 0.5), (-1.0, 0.5)] if signed else [(1.0, 1.0)]):
                key = (name, sign * m)
                expected[key] = expected.get(key, 0.0) + p * w / len(aa.policies)
    s = sample_autoaugment_cifar10(n, size, torch.Generator().manual_seed(1))
    got = {}
    for o, m in zip(s["op"][s["apply"]].tolist(), s["magnitude"][s["apply"]].tolist()):
        got[(TV_OPS[o], m)] = got.get((TV_OPS[o], m), 0) + 1
    assert set(got) <= set(expected), set(got) - set(expected)
    for key, p in expected.items():
        assert _close(got.get(key, 0), n, p), (key, got.get(key, 0), n * p)
    # Sub-policy choice uniform; each op slot applied with its probability.
    counts = torch.bincount(s["policy"], minlength=25)
    assert all(_close(int(c), n, 1 / 25) for c in counts)
    for pid, sub in enumerate(CIFAR10_POLICY):
        rows = s["policy"] == pid
        for slot, (name, p, _) in enumerate(sub):
            assert (s["op"][rows, slot] == TV_OPS.index(name)).all()
            assert _close(int(s["apply"][rows, slot].sum()), int(rows.sum()), p), (pid, slot)


def test_trivial_augment_draws_match_torchvision_tables():
    n = 20000
    space = TrivialAugmentWide()._augmentation_space(31)
    assert tuple(space) == WIDE_OPS
    s = sample_trivial_augment(n, torch.Generator().manual_seed(2))
    op, bins, mag = s["op"][:, 0], s["bin"][:, 0], s["magnitude"][:, 0]
    assert all(_close(int(c), n, 1 / 14) for c in torch.bincount(op, minlength=14))
    for t, name in enumerate(WIDE_OPS):
        mags, signed = space[name]
        rows = op == t
        if mags.ndim == 0:
            assert (mag[rows] == 0).all()
            continue
        table = mags.double()[bins[rows]]
        assert torch.equal(mag[rows].abs(), table.abs()), name
        if signed:
            assert _close(int((mag[rows] < 0).sum()), int((table != 0).sum()), 0.5), name
        else:
            assert (mag[rows] >= 0).all()
    assert all(_close(int(c), n, 1 / 31) for c in torch.bincount(bins, minlength=31))


def _record_timm(config, n_images, seed):
    """Names and level arguments of the ops timm's RandAugment applies, op functions replaced by recorders."""
    ra = taa.rand_augment_transform(config, {})
    events = []
    for op in ra.ops:
        op.aug_fn = lambda img, *args, _name=op.name, **kw: events.append((_name, args[0] if args else 0.0)) or img
    random.seed(seed)
    np.random.seed(seed)
    for _ in range(n_images):
        ra(None)
    return ra, events


def _ks_statistic(a, b):
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


@pytest.mark.parametrize("config", ["rand-n2-m10-mstd0.5", "rand-m7-n3-mstd101-inc1-p0.8", "rand-n2-m12-mmax12-inc1"])
def test_rand_augment_draws_match_timm(config):
    n_timm, n_ours = 15000, 40000
    ra, events = _record_timm(config, n_timm, seed=3)
    cfg = parse_randaugment(config)
    names = RAND_INCREASING_OPS if cfg.increasing else RAND_OPS
    assert tuple(op.name for op in ra.ops) == names
    s = sample_rand_augment(n_ours, torch.Generator().manual_seed(4), config)
    ours_ops = s["op"][s["apply"]].tolist()
    ours_args = s["arg"][s["apply"]].tolist()
    # application probability p per op slot
    assert _close(len(events), n_timm * cfg.n, cfg.p) and _close(len(ours_ops), n_ours * cfg.n, cfg.p)
    for t, name in enumerate(names):
        theirs = [a for nm, a in events if nm == name]
        ours = [a for o, a in zip(ours_ops, ours_args) if o == t]
        p1, p2 = len(theirs) / len(events), len(ours) / len(ours_ops)
        pooled = (len(theirs) + len(ours)) / (len(events) + len(ours_ops))
        se = math.sqrt(pooled * (1 - pooled) * (1 / len(events) + 1 / len(ours_ops)))
        assert abs(p1 - p2) <= 4 * se, (name, p1, p2)
        if name not in ("AutoContrast", "Equalize", "Invert"):
            # two-sample Kolmogorov-Smirnov at alpha = 0.001 on the level arguments
            crit = 1.95 * math.sqrt((len(theirs) + len(ours)) / (len(theirs) * len(ours)))
            assert _ks_statistic(theirs, ours) <= crit, name


def test_rand_augment_magnitude_noise_is_clipped_gaussian():
    s = sample_rand_augment(50000, torch.Generator().manual_seed(5), "rand-n2-m10-mstd0.5")
    mag = s["magnitude"].flatten()
    assert mag.max() == 10.0 and mag.min() >= 0.0
    assert _close(int((mag == 10.0).sum()), mag.numel(), 0.5)  # half the normal mass lies above m = 10
    assert abs(mag.mean().item() - (10 - 0.5 / math.sqrt(2 * math.pi))) < 0.01


@pytest.mark.parametrize("config", ["rand-n2-m10-mstd0.5", "rand-m9-n3-mstd101-inc1", "rand-n1-m7-p0.8-mmax12",
                                    "rand-m12"])
def test_parse_randaugment_matches_timm(config):
    cfg = parse_randaugment(config)
    ra = taa.rand_augment_transform(config, {})
    op = ra.ops[0]
    assert cfg.n == ra.num_layers and cfg.m == op.magnitude and cfg.p == op.prob
    assert cfg.mstd == op.magnitude_std and cfg.mmax == (op.magnitude_max or 10)
    assert (RAND_INCREASING_OPS if cfg.increasing else RAND_OPS) == tuple(o.name for o in ra.ops)
    assert parse_randaugment("rand-n2-m10-mstd0.5") == RandAugmentConfig(n=2, m=10, mstd=0.5)


# ----------------------------------------------------------------------------- whole policies

def test_autoaugment_batch_equals_torchvision_ops_replayed_per_image():
    x = _batch(3, 20, 24).repeat(12, 1, 1, 1)
    out = autoaugment_cifar10(x, torch.Generator().manual_seed(6))
    s = sample_autoaugment_cifar10(len(x), (20, 24), torch.Generator().manual_seed(6))
    for i, img in enumerate(x):
        for slot in range(2):
            if s["apply"][i, slot]:
                img = _apply_op(img, TV_OPS[s["op"][i, slot]], float(s["magnitude"][i, slot]),
                                InterpolationMode.NEAREST, None)
        assert torch.equal(out[i], img), i


def test_trivial_augment_batch_equals_torchvision_ops_replayed_per_image():
    x = _batch(1, 32, 32).repeat(12, 1, 1, 1)
    out = trivial_augment_wide(x, torch.Generator().manual_seed(7), interpolation="bilinear")
    s = sample_trivial_augment(len(x), torch.Generator().manual_seed(7))
    ref = torch.stack([_apply_op(img, WIDE_OPS[s["op"][i, 0]], float(s["magnitude"][i, 0]),
                                 InterpolationMode.BILINEAR, None) for i, img in enumerate(x)])
    assert torch.equal(out, ref)


def test_rand_augment_batch_equals_timm_ops_replayed_per_image():
    x = _batch(3, 20, 24).repeat(12, 1, 1, 1)
    out = rand_augment(x, torch.Generator().manual_seed(8), "rand-n3-m9-mstd0.5", fill=128)
    s = sample_rand_augment(len(x), torch.Generator().manual_seed(8), "rand-n3-m9-mstd0.5")
    for i, img in enumerate(x):
        im = _to_pil(img)
        for slot in range(3):
            if s["apply"][i, slot]:
                name = RAND_OPS[s["op"][i, slot]]
                a = float(s["arg"][i, slot])
                args = [] if name in ("AutoContrast", "Equalize", "Invert") else [
                    int(a) if name in ("Posterize", "Solarize", "SolarizeAdd") else a]
                im = taa.NAME_TO_OP[name](im, *args, fillcolor=(128, 128, 128), resample=Image.BILINEAR)
        diff = (out[i].int() - _from_pil(im, 3).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, i  # Rotate: see the op test


@pytest.mark.parametrize("policy, distinct", [("autoaugment_cifar10", 16), ("trivialaugment", 30),
                                              ("randaugment", 30)])
def test_each_sample_draws_independently_and_seed_reproduces(policy, distinct):
    x = _batch(3, 32, 32)[:1].repeat(64, 1, 1, 1)
    out = strong_augment(x, policy, torch.Generator().manual_seed(0))
    # 64 copies of one image: per-sample draws give many different outputs (AutoAugment leaves
    # about 1 in 6 images untouched, and its 25 sub-policies repeat within 64 draws)
    assert len({bytes(img.numpy()) for img in out}) > distinct
    a = strong_augment(x, policy, torch.Generator().manual_seed(0), cutout_length=8)
    b = strong_augment(x, policy, torch.Generator().manual_seed(0), cutout_length=8)
    c = strong_augment(x, policy, torch.Generator().manual_seed(1), cutout_length=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_none_policy_and_zero_cutout_are_identity():
    x = _batch(3, 20, 24)
    assert torch.equal(strong_augment(x, "none", torch.Generator()), x)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_runs_on_the_device_of_the_input(device):
    x = _batch(3, 20, 24).to(device)
    for policy in ("autoaugment_cifar10", "trivialaugment", "randaugment"):
        out = strong_augment(x, policy, torch.Generator(device).manual_seed(0), cutout_length=8)
        assert out.device == x.device and out.dtype == torch.uint8 and out.shape == x.shape
    for op in TV_OPS:  # the ops themselves do not depend on the device
        m = torch.tensor(TV_MAGNITUDES.get(op, [0.0] * 4), dtype=torch.float64)
        assert torch.equal(apply_op(x, op, m.to(device)).cpu(), apply_op(x.cpu(), op, m)), op


# ----------------------------------------------------------------------------- Cutout

@pytest.mark.parametrize("length", [9, 10])
def test_cutout_matches_reference_holes(length):
    x = torch.full((200, 3, 20, 24), 255, dtype=torch.uint8)
    out = cutout(x, length, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    cy = torch.randint(20, (200, 1), generator=g)[:, 0].numpy()
    cx = torch.randint(24, (200, 1), generator=g)[:, 0].numpy()
    for i in range(200):  # DeVries & Taylor's Cutout(n_holes=1, length) given the same centre
        mask = np.ones((20, 24), np.float32)
        y1, y2 = np.clip(cy[i] - length // 2, 0, 20), np.clip(cy[i] + length // 2, 0, 20)
        x1, x2 = np.clip(cx[i] - length // 2, 0, 24), np.clip(cx[i] + length // 2, 0, 24)
        mask[y1:y2, x1:x2] = 0.0
        assert torch.equal(out[i], (x[i].float() * torch.from_numpy(mask)).to(torch.uint8)), i
    holes = (out == 0).all(1).sum((1, 2))
    side = 2 * (length // 2)  # the reference's hole is [c - length//2, c + length//2)
    assert holes.max() == side * side and holes.min() < side * side  # full holes and clipped ones
    assert len(set(zip(cy.tolist(), cx.tolist()))) > 100  # per-sample centres


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", ["autoaugment_imagenet", "AutoAugment", ""])
def test_unknown_policy_is_a_one_line_error(bad):
    with pytest.raises(BalpoeError, match="unknown strong augmentation policy") as err:
        strong_augment(_batch(3, 8, 8), bad, torch.Generator())
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["rand-n2-x5", "randaugment-m9", "rand-mfoo", "rand-m9.5", "rand-n2-m10-mstd",
                                 "rand-p1.5", "augmix-m5"])
def test_bad_randaugment_config_is_a_one_line_error(bad):
    with pytest.raises(BalpoeError, match="bad RandAugment config") as err:
        rand_augment(_batch(3, 8, 8), torch.Generator(), bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


def test_bad_inputs_are_errors():
    with pytest.raises(BalpoeError, match="uint8 batch"):
        autoaugment_cifar10(_batch(3, 8, 8).float(), torch.Generator())
    with pytest.raises(BalpoeError, match="'Cutout'"):
        apply_op(_batch(3, 8, 8), "Cutout", torch.zeros(4))
    with pytest.raises(BalpoeError, match="interpolation 'bicubic'"):
        trivial_augment_wide(_batch(3, 8, 8), torch.Generator(), interpolation="bicubic")
