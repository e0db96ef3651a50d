"""The official BalPoE AutoAugment form (``autoaugment_cifar10_official``) against the official
PIL ops on the same images.

Reference: emasa/BalPoE-CalibratedLT ``dataset/autoaugm.py`` (commit ca607ae): ``CIFAR10Policy``
(lines 90-143, sub-policies at 105-134), ``SubPolicy`` (lines 200-262: magnitude tables at 202-217,
``rotate_with_fill`` at 220-222, the op lambdas at 224-250, ``random.random() < p`` at 261-262).
The reference functions below write those PIL calls out, with the random sign passed in.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from image_pairs import from_pil as _from_pil, to_pil as _to_pil, uint8_batch as _batch

from balpoe.data.autoaugment import (
    CIFAR10_POLICY, TV_OPS, autoaugment_cifar10_official, official_cifar10_arguments, official_cifar10_op,
    sample_autoaugment_cifar10_official, strong_augment)

# dataset/autoaugm.py lines 105-134, in order: (p1, op1, bin1, p2, op2, bin2)
OFFICIAL_SUBPOLICIES = [
    (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2), (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7), (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1), (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3), (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4), (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8), (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
]
NAMES = {"shearX": "ShearX", "shearY": "ShearY", "translateX": "TranslateX", "translateY": "TranslateY",
         "rotate": "Rotate", "color": "Color", "posterize": "Posterize", "solarize": "Solarize",
         "contrast": "Contrast", "sharpness": "Sharpness", "brightness": "Brightness",
         "autocontrast": "AutoContrast", "equalize": "Equalize", "invert": "Invert"}
FILL = (128, 128, 128)


def official_ranges():
    """``SubPolicy.ranges``, lines 202-217 (``np.int`` is ``int`` in the numpy of the time)."""
    return {"shearX": np.linspace(0, 0.3, 10), "shearY": np.linspace(0, 0.3, 10),
            "translateX": np.linspace(0, 150 / 331, 10), "translateY": np.linspace(0, 150 / 331, 10),
            "rotate": np.linspace(0, 30, 10), "color": np.linspace(0.0, 0.9, 10),
            "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int), "solarize": np.linspace(256, 0, 10),
            "contrast": np.linspace(0.0, 0.9, 10), "sharpness": np.linspace(0.0, 0.9, 10),
            "brightness": np.linspace(0.0, 0.9, 10)}


def official_op(name, img, magnitude, sign=1):
    """The lambdas of lines 224-250 with ``random.choice([-1, 1])`` replaced by ``sign``."""
    if name == "rotate":  # rotate_with_fill, lines 220-222: RGBA rotate (NEAREST), composite over grey
        rot = img.convert("RGBA").rotate(magnitude)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)
    fill = FILL if img.mode == "RGB" else 128
    if name == "shearX":
        return img.transform(img.size, Image.AFFINE, (1, magnitude * sign, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fill)
    if name == "shearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, magnitude * sign, 1, 0), Image.BICUBIC, fillcolor=fill)
    if name == "translateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, magnitude * img.size[0] * sign, 0, 1, 0), fillcolor=fill)
    if name == "translateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, magnitude * img.size[1] * sign), fillcolor=fill)
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness,
               "brightness": ImageEnhance.Brightness}
    if name in enhance:
        return enhance[name](img).enhance(1 + magnitude * sign)
    if name == "posterize":
        return ImageOps.posterize(img, int(magnitude))
    if name == "solarize":
        return ImageOps.solarize(img, magnitude)
    return {"autocontrast": ImageOps.autocontrast, "equalize": ImageOps.equalize, "invert": ImageOps.invert}[name](img)


def _ours(name, x, bin_, signs):
    table = official_cifar10_arguments(tuple(x.shape[-2:])).get(NAMES[name])
    base = table[bin_] if table else 0.0
    if NAMES[name] in ("Color", "Contrast", "Sharpness", "Brightness"):
        args = [1 + base * s for s in signs]
    elif NAMES[name] in ("Posterize", "Solarize", "Rotate"):
        args = [base] * len(signs)
    else:
        args = [base * s for s in signs]
    return official_cifar10_op(NAMES[name], x, torch.tensor(args, dtype=torch.float64))


def test_policy_table_is_the_official_one():
    ours = [(p1, n1, k1, p2, n2, k2) for (n1, p1, k1), (n2, p2, k2) in CIFAR10_POLICY]
    ranges = official_ranges()
    for mine, (p1, n1, k1, p2, n2, k2) in zip(ours, OFFICIAL_SUBPOLICIES, strict=True):
        # ops without a magnitude table ignore the official bin
        want = (p1, NAMES[n1], k1 if n1 in ranges else None, p2, NAMES[n2], k2 if n2 in ranges else None)
        assert mine == want


def test_magnitude_tables_are_the_official_ones():
    args = official_cifar10_arguments((32, 32))
    r = official_ranges()
    assert args["TranslateX"] == [m * 32 for m in r["translateX"].tolist()]
    assert args["Solarize"] == r["solarize"].tolist() and args["Solarize"][2] == pytest.approx(199.111, abs=1e-3)
    assert args["Posterize"] == [float(b) for b in r["posterize"]]
    assert args["Rotate"] == r["rotate"].tolist()


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 20, 24)])
@pytest.mark.parametrize("name, bin_", [("rotate", 2), ("rotate", 9), ("translateX", 9), ("translateX", 8),
                                        ("translateY", 3), ("translateY", 9), ("solarize", 2), ("solarize", 3),
                                        ("solarize", 8), ("solarize", 0)])
def test_geometric_and_solarize_ops_equal_the_official_pil_op(shape, name, bin_):
    c = shape[0]
    x = _batch(*shape)
    signs = [1, -1, 1, -1]
    mag = official_ranges()[name][bin_]
    ref = torch.stack([_from_pil(official_op(name, _to_pil(xi), mag, s), c) for xi, s in zip(x, signs)])
    assert torch.equal(_ours(name, x, bin_, signs), ref)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 20, 24)])
@pytest.mark.parametrize("name, bin_", [("shearX", 9), ("shearY", 8), ("shearY", 7), ("shearX", 2)])
def test_bicubic_shear_equals_the_official_pil_op(shape, name, bin_):
    c = shape[0]
    x = _batch(*shape)
    signs = [1, -1, -1, 1]
    mag = official_ranges()[name][bin_]
    ref = torch.stack([_from_pil(official_op(name, _to_pil(xi), mag, s), c) for xi, s in zip(x, signs)])
    diff = (_ours(name, x, bin_, signs).int() - ref.int()).abs()
    assert diff.max() <= 1  # bicubic: within one grey level (in practice exact)
    assert (diff > 0).float().mean() < 0.001


@pytest.mark.parametrize("name", ["color", "contrast", "sharpness", "brightness", "posterize", "autocontrast",
                                  "equalize", "invert"])
def test_colour_and_histogram_ops_equal_the_official_pil_op(name):
    for shape in [(3, 32, 32), (1, 28, 28)]:
        x = _batch(*shape)
        signs = [1, -1, 1, -1]
        bin_ = 7
        mag = official_ranges()[name][bin_] if name in official_ranges() else 0
        ref = torch.stack([_from_pil(official_op(name, _to_pil(xi), mag, s), shape[0]) for xi, s in zip(x, signs)])
        assert torch.equal(_ours(name, x, bin_, signs), ref), (name, shape)


def test_official_forms_differ_from_torchvision_as_documented():
    # translate: 150/331 * 32 * k/9 px with NEAREST, i.e. round(x + 0.5 + t) -> 5 / 13 / 15 px at bins 3 / 8 / 9
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    x[..., :, 20] = 255
    for bin_, shift in ((3, 5), (8, 13), (9, 15)):
        out = _ours("translateX", x, bin_, [1])
        assert (out[0, 0, 0] == 255).nonzero().flatten().tolist() == [20 - shift]
        assert (out[0, 0, :, 32 - shift:] == 128).all()  # grey fill
    # rotate: always counter-clockwise, never mirrored by a sign
    y = _batch(3, 32, 32)
    assert torch.equal(_ours("rotate", y, 2, [1, -1, 1, -1]), _ours("rotate", y, 2, [1, 1, 1, 1]))
    # solarize bin 2: pixels >= 199.11 invert, so 199 stays (torchvision's linspace(255, 0, 10) inverts it)
    z = torch.tensor([[[[198, 199, 200, 255]]]], dtype=torch.uint8)
    assert _ours("solarize", z, 2, [1]).flatten().tolist() == [198, 199, 55, 0]


def test_whole_policy_equals_official_ops_replayed_per_image():
    x = _batch(3, 32, 32).repeat(16, 1, 1, 1)
    out = autoaugment_cifar10_official(x, torch.Generator().manual_seed(5))
    s = sample_autoaugment_cifar10_official(len(x), (32, 32), torch.Generator().manual_seed(5))
    ranges = official_ranges()
    inverse = {v: k for k, v in NAMES.items()}
    applied = 0
    for i, img in enumerate(x):
        im = _to_pil(img)
        p = s["policy"][i].item()
        for slot in range(2):
            if not s["apply"][i, slot]:
                continue
            applied += 1
            name = inverse[TV_OPS[s["op"][i, slot]]]
            k = OFFICIAL_SUBPOLICIES[p][2 + 3 * slot]
            mag = ranges[name][k] if name in ranges else 0
            arg = s["arg"][i, slot].item()
            sign = -1 if (arg < 0 or (name in ("color", "contrast", "sharpness", "brightness") and arg < 1)) else 1
            im = official_op(name, im, mag, sign)
        diff = (out[i].int() - _from_pil(im, 3).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001, i
    assert applied > 20


def test_apply_probabilities_are_strict_and_per_sample():
    n = 20000
    s = sample_autoaugment_cifar10_official(n, (32, 32), torch.Generator().manual_seed(0))
    prob = torch.tensor([[p1, p2] for p1, _, _, p2, _, _ in OFFICIAL_SUBPOLICIES], dtype=torch.float64)
    expected = prob[s["policy"]].sum().item()
    assert abs(s["apply"].sum().item() - expected) < 4 * (n * 2 * 0.25) ** 0.5
    zero = s["policy"] == 14  # (solarize 0.5, invert 0.0): the official invert never runs
    assert not s["apply"][zero, 1].any()


def test_strong_augment_runs_the_official_policy_with_its_fill():
    x = _batch(1, 28, 28).repeat(8, 1, 1, 1)
    a = strong_augment(x, "autoaugment_cifar10_official", torch.Generator().manual_seed(1))
    b = autoaugment_cifar10_official(x, torch.Generator().manual_seed(1), fill=128)
    c = strong_augment(x, "autoaugment_cifar10_official", torch.Generator().manual_seed(1), fill=0)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(c, autoaugment_cifar10_official(x, torch.Generator().manual_seed(1), fill=0))
