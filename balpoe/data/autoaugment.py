"""Strong augmentation on whole uint8 batches, on the training device, drawn per sample.

Provides AutoAugment with the CIFAR-10 policy (Cubuk et al. 2019), RandAugment as configured by
timm's ``rand_augment_transform`` (Cubuk et al. 2020), TrivialAugment Wide (Müller & Hutter 2021)
and Cutout (DeVries & Taylor 2017) for a batch ``x`` of shape ``[B, C, H, W]`` (uint8, C = 1 or
3) on any device.  Every sample draws its own sub-policy / ops, magnitudes, signs and application
flags from the given ``torch.Generator``; the pixel work runs once per op *type* on the subset of
samples that drew it (no PIL, no per-sample Python loop).

Two op families share the machinery:

* ``style="torchvision"``: the uint8 tensor ops that ``torchvision.transforms.AutoAugment`` and
  ``TrivialAugmentWide`` call (``_apply_op``: affine grid + ``grid_sample`` with nearest or
  bilinear resampling and zero padding, ``_blend`` with truncation, equalize, autocontrast, ...);
* ``style="timm"``: the PIL semantics of timm's RandAugment ops (``ImageEnhance`` blends with a
  float32 factor and truncation, the ``SMOOTH`` kernel, ``ImageOps`` look-up tables, PIL's
  ``Image.transform`` affine resampling with pixel-centre coordinates and a fill colour).  timm
  draws BILINEAR or BICUBIC at random for its affine ops; here the interpolation is fixed,
  bilinear by default (PIL's bilinear filter: clamped neighbours, truncation, outside -> fill).

Parity is tested in ``tests/data/test_autoaugment.py``: every op against torchvision's functional
op or timm's PIL op on each image of a batch (exact for the colour / histogram ops, within one
grey level for resampling ops), and the sampled choices against torchvision's tables and timm's
recorded draws.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from balpoe.errors import BalpoeError

POLICIES = ("none", "autoaugment_cifar10", "autoaugment_cifar10_official", "randaugment", "trivialaugment")

# torchvision op names; TrivialAugmentWide uses the first 14 in this order, AutoAugment adds Invert.
TV_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
WIDE_OPS = TV_OPS[:14]
# timm's ``_RAND_TRANSFORMS`` and ``_RAND_INCREASING_TRANSFORMS`` (same order).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                       "TranslateYRel")

# torchvision ``AutoAugmentPolicy.CIFAR10``: 25 sub-policies of (op, probability, magnitude bin).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
           "Sharpness"}


# --------------------------------------------------------------------------- magnitude tables

def autoaugment_magnitudes(num_bins: int, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """torchvision ``AutoAugment._augmentation_space`` (float32 values, unsigned); ``image_size`` is (H, W)."""
    h, w = image_size
    lin = lambda hi: torch.linspace(0.0, hi, num_bins)  # noqa: E731
    return {"ShearX": lin(0.3), "ShearY": lin(0.3), "TranslateX": lin(150.0 / 331.0 * w),
            "TranslateY": lin(150.0 / 331.0 * h), "Rotate": lin(30.0), "Brightness": lin(0.9),
            "Color": lin(0.9), "Contrast": lin(0.9), "Sharpness": lin(0.9),
            "Posterize": 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int(),
            "Solarize": torch.linspace(255.0, 0.0, num_bins)}


def wide_magnitudes(num_bins: int = 31) -> dict[str, torch.Tensor]:
    """torchvision ``TrivialAugmentWide._augmentation_space`` for the ops that take a magnitude."""
    lin = lambda hi: torch.linspace(0.0, hi, num_bins)  # noqa: E731
    return {"ShearX": lin(0.99), "ShearY": lin(0.99), "TranslateX": lin(32.0), "TranslateY": lin(32.0),
            "Rotate": lin(135.0), "Brightness": lin(0.99), "Color": lin(0.99), "Contrast": lin(0.99),
            "Sharpness": lin(0.99), "Posterize": 8 - (torch.arange(num_bins) / ((num_bins - 1) / 6)).round().int(),
            "Solarize": torch.linspace(255.0, 0.0, num_bins)}


# --------------------------------------------------------------------------- pixel helpers

def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _fill_tensor(fill, c: int, device) -> torch.Tensor:
    vals = [float(fill)] * c if isinstance(fill, (int, float)) else [float(f) for f in fill]
    if len(vals) == 1:
        vals = vals * c
    if len(vals) != c:
        raise BalpoeError(f"fill {fill!r} must be one number or one value per channel ({c})")
    return torch.tensor(vals, device=device).view(1, c, 1, 1)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) look-up: ``lut`` is ``[B*C, 256]``."""
    b, c, h, w = x.shape
    return lut.gather(1, x.reshape(b * c, h * w).long()).reshape(b, c, h, w).to(torch.uint8)


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """256-bin histogram of every (sample, channel): one ``bincount`` with per-row offsets."""
    b, c, h, w = x.shape
    rows = torch.arange(b * c, device=x.device).unsqueeze(1) * 256
    flat = (x.reshape(b * c, h * w).long() + rows).reshape(-1)
    return torch.bincount(flat, minlength=256 * b * c).view(b * c, 256)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation, ``torchvision.transforms.functional.equalize`` and
    ``PIL.ImageOps.equalize`` (the two agree): step = (pixels - count of the last used bin) // 255,
    lut[i] = (step // 2 + pixels below i) // step, identity when step is 0."""
    hist = _histograms(x)
    bins = torch.arange(256, device=x.device).expand_as(hist)
    last = hist.gather(1, torch.where(hist > 0, bins, 0).amax(1, keepdim=True))
    step = (hist.sum(1, keepdim=True) - last) // 255
    lut = (hist.cumsum(1) - hist + step // 2) // step.clamp(min=1)
    return _apply_lut(x, torch.where(step > 0, lut.clamp(0, 255), bins))


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` (per sample, 0..8) most significant bits."""
    mask = 256 - torch.bitwise_left_shift(torch.ones_like(bits, dtype=torch.long), 8 - bits.long().clamp(0, 8))
    return x & _col(mask.to(torch.uint8))


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the pixels ``>= threshold`` (per sample)."""
    return torch.where(x.float() >= _col(threshold.float()), 255 - x, x)


def _gray_tv(x: torch.Tensor) -> torch.Tensor:  # torchvision rgb_to_grayscale, uint8 [B, 1, H, W]
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).unsqueeze(1)


def _gray_pil(x: torch.Tensor) -> torch.Tensor:  # PIL convert("L"): ITU-R 601-2 in 16-bit fixed point
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).unsqueeze(1)


def _blend_tv(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``_blend``: ``factor*img + (1-factor)*other`` in float32, clamped, truncated."""
    f = _col(factor.double())
    return (f.float() * img + (1.0 - f).float() * other).clamp(0, 255).to(torch.uint8)


def _blend_pil(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, img, factor)``: ``d + a*(img - d)`` in float32, clamped, truncated."""
    diff = (img.int() - degenerate.int()).float()
    return (degenerate.float() + _col(factor).float() * diff).clamp(0, 255).to(torch.uint8)


def _smooth_tv(x: torch.Tensor) -> torch.Tensor:  # torchvision _blurred_degenerate_image
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x.float(), kernel, groups=c).round().to(torch.uint8)
    return out


def _smooth_pil(x: torch.Tensor) -> torch.Tensor:  # PIL ImageFilter.SMOOTH (border copied, +0.5, truncate)
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x
    k1, k5 = torch.tensor(1.0 / 13, dtype=torch.float32), torch.tensor(5.0 / 13, dtype=torch.float32)
    xf = x.float()
    row = lambda r, mid: (r[..., :-2] * k1 + r[..., 1:-1] * mid) + r[..., 2:] * k1  # noqa: E731
    ss = 0.5 + row(xf[..., 2:, :], k1)
    ss = ss + row(xf[..., 1:-1, :], k5)
    ss = ss + row(xf[..., :-2, :], k1)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp(0, 255).to(torch.uint8)
    return out


def _autocontrast_tv(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True).float()
    hi = x.amax(dim=(-2, -1), keepdim=True).float()
    scale = 255 / (hi - lo)
    flat = ~torch.isfinite(scale)
    lo, scale = lo.masked_fill(flat, 0), scale.masked_fill(flat, 1)
    return ((x - lo) * scale).clamp(0, 255).to(torch.uint8)


def _autocontrast_pil(x: torch.Tensor) -> torch.Tensor:  # ImageOps.autocontrast (cutoff 0), float64 LUT
    b, c = x.shape[:2]
    lo = x.amin(dim=(-2, -1)).reshape(b * c, 1).double()
    hi = x.amax(dim=(-2, -1)).reshape(b * c, 1).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    bins = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = (bins * scale + (-lo) * scale).trunc().clamp(0, 255)
    return _apply_lut(x, torch.where(hi > lo, lut, bins).long())


# --------------------------------------------------------------------------- affine resampling

def _tv_affine(x, angle, translate, shear, center, fill, interpolation):
    """torchvision tensor ``affine``/``rotate``: inverse matrix as ``_get_inverse_affine_matrix``
    (float64, then float32), grid as ``_gen_affine_grid``, ``grid_sample`` with zero padding,
    optional fill through the extra mask channel, rounding back to uint8."""
    b, c, h, w = x.shape
    dev = x.device
    rot, sx, sy = (torch.deg2rad(v.double()) for v in (angle, shear[0], shear[1]))
    (cx, cy), (tx, ty) = center, (translate[0].double(), translate[1].double())
    cos_sy = torch.cos(sy)
    a = torch.cos(rot - sy) / cos_sy
    bb = -torch.cos(rot - sy) * torch.tan(sx) / cos_sy - torch.sin(rot)
    cc = torch.sin(rot - sy) / cos_sy
    d = -torch.sin(rot - sy) * torch.tan(sx) / cos_sy + torch.cos(rot)
    m0, m1, m3, m4 = d, -bb, -cc, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    theta = torch.stack([m0, m1, m2, m3, m4, m5], 1).float().view(b, 2, 3)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w, device=dev)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h, device=dev)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=dev)], -1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=dev)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    img = x.float()
    if fill is not None:
        img = torch.cat([img, torch.ones_like(img[:, :1])], 1)
    out = F.grid_sample(img, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    if fill is not None:
        mask, out, fill_img = out[:, -1:], out[:, :-1], _fill_tensor(fill, c, dev)
        out = (torch.where(mask < 0.5, fill_img, out) if interpolation == "nearest"
               else out * mask + (1.0 - mask) * fill_img)
    return out.round().to(torch.uint8)


def _pil_affine(x, coeffs, fill, interpolation):
    """PIL ``Image.transform(size, AFFINE, coeffs)``: output pixel centre (x+.5, y+.5) maps to the
    input point ``(a x + b y + c, d x + e y + f)``; outside the image -> ``fill``; bilinear uses the
    clamped 2x2 neighbourhood in float64 and truncates, nearest takes the pixel containing the point."""
    b, c, h, w = x.shape
    dev = x.device
    px = torch.arange(w, device=dev, dtype=torch.float64) + 0.5
    py = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5)[:, None]
    a0, a1, a2, a3, a4, a5 = (v.view(b, 1, 1) for v in coeffs.double().unbind(1))
    sx, sy = a0 * px + a1 * py + a2, a3 * px + a4 * py + a5
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(1)
    flat = x.reshape(b, c, h * w)

    def pick(iy, ix):
        idx = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, idx).view(b, c, h, w)

    if interpolation == "nearest":
        out = pick(sy.floor().long(), sx.floor().long())
    elif interpolation == "bicubic":  # PIL's transform filter: a = -1 cubic, clamped neighbours, float64
        fx, fy = sx - 0.5, sy - 0.5
        x0, y0 = fx.floor(), fy.floor()
        dx, dy = (fx - x0).unsqueeze(1), (fy - y0).unsqueeze(1)
        x0, y0 = x0.long(), y0.long()
        rows = [_pil_cubic(*(pick(y0 + i, x0 + j).double() for j in (-1, 0, 1, 2)), dx) for i in (-1, 0, 1, 2)]
        out = _pil_cubic(*rows, dy).clamp(0, 255).to(torch.uint8)
    else:
        fx, fy = sx - 0.5, sy - 0.5
        x0, y0 = fx.floor(), fy.floor()
        dx, dy = (fx - x0).unsqueeze(1), (fy - y0).unsqueeze(1)
        x0, y0 = x0.long(), y0.long()
        p00, p01, p10, p11 = (pick(y0 + i, x0 + j).double() for i in (0, 1) for j in (0, 1))
        v1, v2 = p00 + (p01 - p00) * dx, p10 + (p11 - p10) * dx
        out = (v1 + (v2 - v1) * dy).to(torch.uint8)
    return torch.where(inside, out, _fill_tensor(fill, c, dev).to(torch.uint8))


def _pil_cubic(v1, v2, v3, v4, d):
    """PIL ``Geometry.c`` ``BICUBIC``: the cubic through four neighbours at offset ``d`` in [0, 1)
    (terms summed in PIL's order, so float64 results agree bit for bit)."""
    return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (((v2 - v1) - v3) + v4)))


def _pil_matrix(*cols) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v, dtype=torch.float64).expand_as(cols[0]) for v in cols], 1)


def _pil_rotate_coeffs(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:  # Image.rotate, expand=False
    ang = -torch.deg2rad(torch.remainder(degrees.double(), 360.0))
    cos, sin = torch.cos(ang), torch.sin(ang)
    cx, cy = w / 2, h / 2
    return _pil_matrix(cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


# --------------------------------------------------------------------------- op tables

def _tv_op(name, x, m, fill, interpolation):
    b, c, h, w = x.shape
    zero = torch.zeros_like(m, dtype=torch.float64)
    if name in ("ShearX", "ShearY"):
        s = torch.rad2deg(torch.atan(m.double()))
        shear = (s, zero) if name == "ShearX" else (zero, s)
        return _tv_affine(x, zero, (zero, zero), shear, (-w * 0.5, -h * 0.5), fill, interpolation)
    if name in ("TranslateX", "TranslateY"):
        t = m.double().trunc()
        translate = (t, zero) if name == "TranslateX" else (zero, t)
        return _tv_affine(x, zero, translate, (zero, zero), (0.0, 0.0), fill, interpolation)
    if name == "Rotate":
        return _tv_affine(x, -m.double(), (zero, zero), (zero, zero), (0.0, 0.0), fill, interpolation)
    factor = 1.0 + m.double()
    if name == "Brightness":
        return _blend_tv(x, torch.zeros_like(x), factor)
    if name == "Color":
        return x if c == 1 else _blend_tv(x, _gray_tv(x), factor)
    if name == "Contrast":
        mean = (_gray_tv(x) if c == 3 else x).float().mean(dim=(-3, -2, -1), keepdim=True)
        return _blend_tv(x, mean, factor)
    if name == "Sharpness":
        return x if h <= 2 or w <= 2 else _blend_tv(x, _smooth_tv(x), factor)
    if name == "Posterize":
        return posterize(x, m.double().trunc())
    if name == "Solarize":
        return solarize(x, m)
    return {"Identity": lambda: x, "AutoContrast": lambda: _autocontrast_tv(x),
            "Equalize": lambda: equalize(x), "Invert": lambda: invert(x)}[name]()


def _timm_op(name, x, arg, fill, interpolation):
    b, c, h, w = x.shape
    name = name.replace("Increasing", "").replace("Original", "")
    one, zero = torch.ones_like(arg, dtype=torch.float64), torch.zeros_like(arg, dtype=torch.float64)
    affine = {"ShearX": lambda: _pil_matrix(one, arg, zero, zero, one, zero),
              "ShearY": lambda: _pil_matrix(one, zero, zero, arg, one, zero),
              "TranslateXRel": lambda: _pil_matrix(one, zero, arg * w, zero, one, zero),
              "TranslateYRel": lambda: _pil_matrix(one, zero, zero, zero, one, arg * h),
              "TranslateX": lambda: _pil_matrix(one, zero, arg, zero, one, zero),
              "TranslateY": lambda: _pil_matrix(one, zero, zero, zero, one, arg),
              "Rotate": lambda: _pil_rotate_coeffs(arg, h, w)}
    if name in affine:
        return _pil_affine(x, affine[name](), fill, interpolation)
    if name == "Brightness":
        return _blend_pil(torch.zeros_like(x), x, arg)
    if name == "Color":
        return x if c == 1 else _blend_pil(_gray_pil(x).expand_as(x), x, arg)
    if name == "Contrast":
        gray = _gray_pil(x) if c == 3 else x
        mean = (gray.sum(dim=(-3, -2, -1), keepdim=True).double() / (h * w) + 0.5).floor()
        return _blend_pil(mean.int().expand_as(x), x, arg)
    if name == "Sharpness":
        return _blend_pil(_smooth_pil(x), x, arg)
    if name == "Posterize":
        return posterize(x, arg.clamp(max=8))
    if name == "Solarize":
        return solarize(x, arg)
    if name == "SolarizeAdd":  # timm solarize_add: pixels below 128 get + arg (saturating)
        return torch.where(x < 128, (x.int() + _col(arg).int()).clamp(max=255).to(torch.uint8), x)
    return {"AutoContrast": lambda: _autocontrast_pil(x), "Equalize": lambda: equalize(x),
            "Invert": lambda: invert(x), "Identity": lambda: x}[name]()


def apply_op(x: torch.Tensor, op: str, magnitude: torch.Tensor, *, style: str = "torchvision",
             fill=None, interpolation: str | None = None) -> torch.Tensor:
    """Apply one op to every sample of a uint8 batch ``[B, C, H, W]``, with a per-sample ``magnitude [B]``.

    ``style="torchvision"``: ``op`` is a :data:`TV_OPS` name and ``magnitude`` the signed value that
    torchvision's ``autoaugment._apply_op`` receives (factor ``1 + m`` for the colour ops, degrees for
    Rotate, ``tan`` of the shear angle, pixels for Translate, bits for Posterize, a threshold for
    Solarize).  ``fill=None`` is torchvision's default (zero padding); interpolation ``"nearest"``
    (default) or ``"bilinear"``.

    ``style="timm"``: ``op`` is a timm op name (:data:`RAND_OPS`, the ``*Increasing`` variants,
    ``TranslateX``/``TranslateY`` in pixels) and ``magnitude`` the argument that timm's level function
    returns (an ``ImageEnhance`` factor, degrees, shear factor, translate fraction, bits, threshold,
    SolarizeAdd increment).  ``fill=None`` means timm's grey 128; interpolation ``"bilinear"`` (default)
    or ``"nearest"``.  Posterize with 0 bits gives black (older Pillow; recent Pillow rejects 0 bits).

    Pass float64 magnitudes for bit parity: the references compute their arguments in double precision.
    """
    _check_batch(x)
    magnitude = torch.as_tensor(magnitude, device=x.device).reshape(-1).expand(x.shape[0])
    if style == "torchvision":
        if op not in TV_OPS:
            raise BalpoeError(f"unknown torchvision augmentation op {op!r}")
        interp = _check_interpolation(interpolation or "nearest")
        return _tv_op(op, x, magnitude, fill, interp)
    if style == "timm":
        base = op.replace("Increasing", "").replace("Original", "")
        if base not in RAND_OPS + ("TranslateX", "TranslateY"):
            raise BalpoeError(f"unknown timm augmentation op {op!r}")
        interp = _check_interpolation(interpolation or "bilinear")
        return _timm_op(op, x, magnitude.double(), 128 if fill is None else fill, interp)
    raise BalpoeError(f"unknown augmentation op style {style!r} (expected 'torchvision' or 'timm')")


def _check_batch(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise BalpoeError(f"strong augmentation needs a uint8 batch [B, 1 or 3, H, W], got {x.dtype} "
                          f"{tuple(x.shape)}")


def _check_interpolation(mode: str) -> str:
    if mode not in ("nearest", "bilinear"):
        raise BalpoeError(f"unknown interpolation {mode!r} (expected 'nearest' or 'bilinear')")
    return mode


def _apply_slots(x, names, op, arg, apply, fn):
    """Apply slot 0 to every sample, then slot 1, ...: per slot, samples are grouped by the op they
    drew (one ``argsort`` + ``bincount``) and each op runs once on its group."""
    x = x.clone()
    for s in range(op.shape[1]):
        code = torch.where(apply[:, s], op[:, s], len(names))
        order = torch.argsort(code, stable=True)
        counts = torch.bincount(code, minlength=len(names) + 1).tolist()
        for name, idx in zip(names, order.split(counts)):
            if idx.numel() and name != "Identity":
                x.index_copy_(0, idx, fn(name, x.index_select(0, idx), arg[idx, s]))
    return x


# --------------------------------------------------------------------------- AutoAugment (CIFAR-10)

def sample_autoaugment_cifar10(batch: int, image_size: tuple[int, int], generator: torch.Generator,
                               device=None) -> dict[str, torch.Tensor]:
    """Per-sample draws of torchvision ``AutoAugment(AutoAugmentPolicy.CIFAR10)``: a sub-policy
    uniformly among 25, for each of its two ops ``apply = U[0,1) <= p`` and a sign (negative when
    the signed op draws 0).  Returns ``policy [B]``, ``op [B, 2]`` (indices into :data:`TV_OPS`),
    ``magnitude [B, 2]`` (float64, as passed to ``_apply_op``) and ``apply [B, 2]``."""
    device = device or generator.device
    mags = autoaugment_magnitudes(10, tuple(image_size))
    op_idx = torch.tensor([[TV_OPS.index(n) for n, _, _ in sub] for sub in CIFAR10_POLICY], device=device)
    prob = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], device=device)
    mag = torch.tensor([[0.0 if k is None else float(mags[n][k]) for n, _, k in sub] for sub in CIFAR10_POLICY],
                       dtype=torch.float64, device=device)
    signed = torch.tensor([n in _SIGNED for n in TV_OPS], device=device)
    policy = torch.randint(len(CIFAR10_POLICY), (batch,), generator=generator, device=device)
    probs = torch.rand(batch, 2, generator=generator, device=device)
    signs = torch.randint(2, (batch, 2), generator=generator, device=device)
    op = op_idx[policy]
    magnitude = torch.where(signed[op] & (signs == 0), -mag[policy], mag[policy])
    return {"policy": policy, "op": op, "magnitude": magnitude, "apply": probs <= prob[policy]}


def autoaugment_cifar10(x: torch.Tensor, generator: torch.Generator, *, fill=None,
                        interpolation: str = "nearest") -> torch.Tensor:
    """AutoAugment (Cubuk et al. 2019) with the CIFAR-10 policy, drawn per sample; reproduces
    torchvision ``AutoAugment(AutoAugmentPolicy.CIFAR10)`` (10 magnitude bins, random signs, nearest
    interpolation and zero fill by default)."""
    _check_batch(x)
    s = sample_autoaugment_cifar10(x.shape[0], x.shape[-2:], generator, x.device)
    interp = _check_interpolation(interpolation)
    return _apply_slots(x, TV_OPS, s["op"], s["magnitude"], s["apply"],
                        lambda name, xs, m: _tv_op(name, xs, m, fill, interp))


# --------------------------------------------------------------------------- AutoAugment, official BalPoE form

#: ops of the official BalPoE ``CIFAR10Policy`` that draw a random sign (``random.choice([-1, 1])``);
#: Rotate does not: it always turns counter-clockwise by +theta
OFFICIAL_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Sharpness",
                             "Brightness"})


def official_cifar10_arguments(image_size: tuple[int, int]) -> dict[str, list[float]]:
    """The 10-bin magnitude tables of the official BalPoE ``CIFAR10Policy`` (``SubPolicy.ranges``
    of emasa/BalPoE-CalibratedLT ``dataset/autoaugm.py``, numpy float64), turned into the argument
    each PIL op receives before its sign: shear factor, translation in pixels (150/331 of the image
    side times k/9), degrees, ImageEnhance magnitude (the factor is ``1 +- m``), posterize bits,
    solarize threshold (``linspace(256, 0, 10)``)."""
    h, w = image_size
    lin = lambda hi: np.linspace(0.0, hi, 10)  # noqa: E731
    return {"ShearX": lin(0.3).tolist(), "ShearY": lin(0.3).tolist(),
            "TranslateX": [m * w for m in lin(150 / 331).tolist()],
            "TranslateY": [m * h for m in lin(150 / 331).tolist()],
            "Rotate": lin(30).tolist(), "Color": lin(0.9).tolist(), "Contrast": lin(0.9).tolist(),
            "Sharpness": lin(0.9).tolist(), "Brightness": lin(0.9).tolist(),
            "Posterize": np.round(np.linspace(8, 4, 10), 0).astype(np.int64).astype(float).tolist(),
            "Solarize": np.linspace(256, 0, 10).tolist()}


def sample_autoaugment_cifar10_official(batch: int, image_size: tuple[int, int], generator: torch.Generator,
                                        device=None) -> dict[str, torch.Tensor]:
    """Per-sample draws of the official BalPoE ``CIFAR10Policy``: a sub-policy uniformly among the
    25 of :data:`CIFAR10_POLICY` (the official list is the same), each op applied when
    ``U[0,1) < p`` and, for :data:`OFFICIAL_SIGNED` ops, a random sign.  Returns ``policy [B]``,
    ``op [B, 2]`` (indices into :data:`TV_OPS`), ``arg [B, 2]`` (float64: what the PIL op receives,
    ``1 +- m`` for the ImageEnhance ops, computed in Python floats as the official code does) and
    ``apply [B, 2]``."""
    device = device or generator.device
    table = official_cifar10_arguments(tuple(image_size))

    def arg(name, k, sign):
        if k is None or name not in table:
            return 0.0
        m = table[name][k]
        if name in ("Color", "Contrast", "Sharpness", "Brightness"):
            return 1 + m * sign
        return m * sign if name in OFFICIAL_SIGNED else m

    op_idx = torch.tensor([[TV_OPS.index(n) for n, _, _ in sub] for sub in CIFAR10_POLICY], device=device)
    prob = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], dtype=torch.float64, device=device)
    pos, neg = (torch.tensor([[arg(n, k, s) for n, _, k in sub] for sub in CIFAR10_POLICY], dtype=torch.float64,
                             device=device) for s in (1, -1))
    policy = torch.randint(len(CIFAR10_POLICY), (batch,), generator=generator, device=device)
    probs = torch.rand(batch, 2, generator=generator, device=device, dtype=torch.float64)
    negative = torch.randint(2, (batch, 2), generator=generator, device=device) == 0
    return {"policy": policy, "op": op_idx[policy], "apply": probs < prob[policy],
            "arg": torch.where(negative, neg[policy], pos[policy])}


def _official_rotate_coeffs(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL ``Image.rotate(angle)`` (expand=False, about the centre): its affine matrix, with PIL's
    rounding of cos and sin to 15 decimals, computed in Python floats for each distinct angle."""
    out = torch.empty(degrees.shape[0], 6, dtype=torch.float64, device=degrees.device)
    for value in degrees.unique().tolist():
        a = -math.radians(value % 360.0)
        cos, sin = round(math.cos(a), 15), round(math.sin(a), 15)
        cx, cy = w / 2.0, h / 2.0
        row = [cos, sin, cos * -cx + sin * -cy + 0.0 + cx, -sin, cos, -sin * -cx + cos * -cy + 0.0 + cy]
        out[degrees == value] = torch.tensor(row, dtype=torch.float64, device=degrees.device)
    return out


def official_cifar10_op(name: str, x: torch.Tensor, arg: torch.Tensor, fill=128) -> torch.Tensor:
    """One op of the official BalPoE ``CIFAR10Policy`` on a uint8 batch, per-sample ``arg`` (float64,
    signed as :func:`sample_autoaugment_cifar10_official` draws it): PIL ``Image.transform`` AFFINE
    with BICUBIC resampling for ShearX/Y (about the image origin, not the centre) and NEAREST for
    TranslateX/Y, ``Image.rotate`` (NEAREST) composited over grey for Rotate, all filled with
    ``fill`` (official: 128); ImageEnhance / ImageOps semantics for the colour and histogram ops
    (the PIL ops of :func:`apply_op` ``style="timm"``)."""
    b, c, h, w = x.shape
    arg = arg.double()
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name in ("ShearX", "ShearY"):
        coeffs = _pil_matrix(one, arg, zero, zero, one, zero) if name == "ShearX" else \
            _pil_matrix(one, zero, zero, arg, one, zero)
        return _pil_affine(x, coeffs, fill, "bicubic")
    if name in ("TranslateX", "TranslateY"):
        coeffs = _pil_matrix(one, zero, arg, zero, one, zero) if name == "TranslateX" else \
            _pil_matrix(one, zero, zero, zero, one, arg)
        return _pil_affine(x, coeffs, fill, "nearest")
    if name == "Rotate":
        return _pil_affine(x, _official_rotate_coeffs(arg, h, w), fill, "nearest")
    return _timm_op(name, x, arg, fill, "nearest")


def autoaugment_cifar10_official(x: torch.Tensor, generator: torch.Generator, *, fill=128) -> torch.Tensor:
    """AutoAugment with the CIFAR-10 policy in the form of the official BalPoE code
    (emasa/BalPoE-CalibratedLT ``dataset/autoaugm.py`` ``CIFAR10Policy``, used by ``cifar_aug_plus``),
    drawn per sample on the device: PIL op semantics (:func:`official_cifar10_op`), rotation always
    +theta, translations of 150/331 * side * k/9 pixels with nearest resampling, bicubic shears,
    solarize thresholds ``linspace(256, 0, 10)``, grey fill 128.  torchvision's form is
    :func:`autoaugment_cifar10`."""
    _check_batch(x)
    s = sample_autoaugment_cifar10_official(x.shape[0], x.shape[-2:], generator, x.device)
    return _apply_slots(x, TV_OPS, s["op"], s["arg"], s["apply"],
                        lambda name, xs, a: official_cifar10_op(name, xs, a, fill))


# --------------------------------------------------------------------------- TrivialAugment Wide

def sample_trivial_augment(batch: int, generator: torch.Generator, device=None,
                           num_bins: int = 31) -> dict[str, torch.Tensor]:
    """Per-sample draws of torchvision ``TrivialAugmentWide``: one op uniformly among
    :data:`WIDE_OPS`, a magnitude bin uniformly among ``num_bins``, and for signed ops a negative
    sign with probability 1/2.  Returns ``op [B, 1]``, ``bin [B, 1]``, ``magnitude [B, 1]``, ``apply``."""
    device = device or generator.device
    mags = wide_magnitudes(num_bins)
    table = torch.stack([mags[n].double() if n in mags else torch.zeros(num_bins, dtype=torch.float64)
                         for n in WIDE_OPS]).to(device)
    signed = torch.tensor([n in _SIGNED for n in WIDE_OPS], device=device)
    op = torch.randint(len(WIDE_OPS), (batch, 1), generator=generator, device=device)
    bins = torch.randint(num_bins, (batch, 1), generator=generator, device=device)
    neg = torch.randint(2, (batch, 1), generator=generator, device=device) == 1
    mag = table[op, bins]
    return {"op": op, "bin": bins, "magnitude": torch.where(signed[op] & neg, -mag, mag),
            "apply": torch.ones_like(op, dtype=torch.bool)}


def trivial_augment_wide(x: torch.Tensor, generator: torch.Generator, *, fill=None,
                         interpolation: str = "nearest") -> torch.Tensor:
    """TrivialAugment (Müller & Hutter 2021), wide magnitudes, drawn per sample; reproduces
    torchvision ``TrivialAugmentWide`` (31 bins, nearest and zero fill by default)."""
    _check_batch(x)
    s = sample_trivial_augment(x.shape[0], generator, x.device)
    interp = _check_interpolation(interpolation)
    return _apply_slots(x, WIDE_OPS, s["op"], s["magnitude"], s["apply"],
                        lambda name, xs, m: _tv_op(name, xs, m, fill, interp))


# --------------------------------------------------------------------------- RandAugment (timm)

class RandAugmentConfig(NamedTuple):
    """Parsed timm RandAugment string ``rand-<section>-...`` (sections ``n``, ``m``, ``mstd``, ``mmax``,
    ``inc``, ``p``, in any order; timm's defaults n=2, m=10, mstd=0, mmax=10, inc=0, p=0.5)."""

    n: int = 2
    m: float = 10.0
    mstd: float = 0.0
    mmax: float = 10.0
    increasing: bool = False
    p: float = 0.5


def parse_randaugment(config: str) -> RandAugmentConfig:
    """Parse a timm ``rand_augment_transform`` config string such as ``"rand-n2-m10-mstd0.5"``.
    ``mstd`` above 100 means uniform magnitudes in [0, m] (as timm).  Anything else raises
    :class:`BalpoeError` naming the string."""
    parts = str(config).split("-")
    if parts[0] != "rand":
        raise BalpoeError(f"bad RandAugment config {config!r}: it must start with 'rand'")
    cast = {"n": int, "m": int, "mstd": float, "mmax": int, "inc": lambda v: bool(int(v)), "p": float}
    field = {"n": "n", "m": "m", "mstd": "mstd", "mmax": "mmax", "inc": "increasing", "p": "p"}
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        try:
            key, val = match.groups()
            values[field[key]] = cast[key](val)
        except (AttributeError, KeyError, ValueError):
            raise BalpoeError(f"bad RandAugment config {config!r}: cannot read section {part!r} "
                              "(expected n<int>, m<int>, mstd<float>, mmax<int>, inc<0|1>, p<float>)") from None
    if values.get("mstd", 0.0) > 100:
        values["mstd"] = math.inf
    if "mmax" in values:
        values["mmax"] = values["mmax"] or 10  # timm: ``magnitude_max or _LEVEL_DENOM``
    cfg = RandAugmentConfig(**values)
    if cfg.n < 0 or not 0.0 <= cfg.p <= 1.0 or cfg.mstd < 0:
        raise BalpoeError(f"bad RandAugment config {config!r}: n must be >= 0, p in [0, 1], mstd >= 0")
    return cfg


def _timm_level(name: str, m: torch.Tensor, neg: torch.Tensor, translate_pct: float) -> torch.Tensor:
    """timm ``LEVEL_TO_ARG`` on float64 magnitudes (``neg`` = timm's ``_randomly_negate`` draw)."""
    lv = m / 10.0
    sign = lambda v: torch.where(neg, -v, v)  # noqa: E731
    table = {"Rotate": lambda: sign(lv * 30.0), "ShearX": lambda: sign(lv * 0.3), "ShearY": lambda: sign(lv * 0.3),
             "TranslateXRel": lambda: sign(lv * translate_pct), "TranslateYRel": lambda: sign(lv * translate_pct),
             "Posterize": lambda: (lv * 4).trunc(), "PosterizeIncreasing": lambda: 4 - (lv * 4).trunc(),
             "Solarize": lambda: (lv * 256).trunc().clamp(max=256),
             "SolarizeIncreasing": lambda: 256 - (lv * 256).trunc().clamp(max=256),
             "SolarizeAdd": lambda: (lv * 110).trunc().clamp(max=128)}
    if name in table:
        return table[name]()
    if name.endswith("Increasing"):  # ColorIncreasing, ContrastIncreasing, ...
        return (1.0 + sign(lv * 0.9)).clamp(min=0.1)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    return torch.zeros_like(m)  # AutoContrast, Equalize, Invert take no argument


def sample_rand_augment(batch: int, generator: torch.Generator, config: str | RandAugmentConfig =
                        "rand-n2-m10-mstd0.5", *, translate_pct: float = 0.45,
                        device=None) -> dict[str, torch.Tensor]:
    """Per-sample draws of timm's RandAugment: ``n`` ops uniformly with replacement, each applied
    when ``U[0,1) <= p``, magnitude ``m + mstd * N(0, 1)`` (uniform in [0, m] for infinite mstd)
    clipped to [0, mmax], a random sign for the signed level functions.  Returns ``op [B, n]``
    (indices into :data:`RAND_OPS` or :data:`RAND_INCREASING_OPS`), ``apply``, ``magnitude`` and
    ``arg`` (float64: what timm's level function passes to the op)."""
    cfg = config if isinstance(config, RandAugmentConfig) else parse_randaugment(config)
    device = device or generator.device
    names = RAND_INCREASING_OPS if cfg.increasing else RAND_OPS
    shape = (batch, cfg.n)
    op = torch.randint(len(names), shape, generator=generator, device=device)
    apply = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) <= cfg.p
    if math.isinf(cfg.mstd):
        mag = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) * cfg.m
    elif cfg.mstd > 0:
        mag = cfg.m + cfg.mstd * torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    else:
        mag = torch.full(shape, float(cfg.m), device=device, dtype=torch.float64)
    mag = mag.clamp(0.0, float(cfg.mmax))
    neg = torch.rand(shape, generator=generator, device=device, dtype=torch.float64) > 0.5
    arg = torch.zeros_like(mag)
    for t, name in enumerate(names):
        arg = torch.where(op == t, _timm_level(name, mag, neg, translate_pct), arg)
    return {"op": op, "apply": apply, "magnitude": mag, "arg": arg}


def rand_augment(x: torch.Tensor, generator: torch.Generator, config: str = "rand-n2-m10-mstd0.5", *,
                 fill=128, translate_pct: float = 0.45, interpolation: str = "bilinear") -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020) as timm's ``rand_augment_transform(config, hparams)``, drawn per
    sample, with PIL op semantics.  ``fill`` is timm's ``img_mean`` hparam (grey 128 by default),
    ``translate_pct`` its ``translate_pct`` (0.45).  timm picks BILINEAR or BICUBIC at random for the
    affine ops; here one fixed ``interpolation`` is used (PIL bilinear by default)."""
    _check_batch(x)
    cfg = parse_randaugment(config)
    s = sample_rand_augment(x.shape[0], generator, cfg, translate_pct=translate_pct, device=x.device)
    interp = _check_interpolation(interpolation)
    names = RAND_INCREASING_OPS if cfg.increasing else RAND_OPS
    return _apply_slots(x, names, s["op"], s["arg"], s["apply"],
                        lambda name, xs, a: _timm_op(name, xs, a, fill, interp))


# --------------------------------------------------------------------------- Cutout and entry point

def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017), one hole per sample: centre (y, x) uniform over the pixels,
    rows ``[y - length//2, y + length//2)`` and the same columns, clipped at the borders, set to 0
    (the reference ``Cutout(n_holes=1, length)`` zeroes the ``ToTensor`` image before ``Normalize``)."""
    _check_batch(x)
    if length <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(h, (b, 1), generator=generator, device=dev)
    cx = torch.randint(w, (b, 1), generator=generator, device=dev)
    half = length // 2
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= (cy - half).clamp(0, h)) & (rows < (cy + half).clamp(0, h))
    in_cols = (cols >= (cx - half).clamp(0, w)) & (cols < (cx + half).clamp(0, w))
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1), 0)


def strong_augment(x: torch.Tensor, policy: str, generator: torch.Generator, *,
                   randaugment: str = "rand-n2-m10-mstd0.5", cutout_length: int = 0,
                   interpolation: str | None = None, fill=None) -> torch.Tensor:
    """One entry point for a loader: ``policy`` in :data:`POLICIES` on a uint8 batch, then Cutout with
    ``cutout_length`` (0 = off).  ``interpolation=None`` keeps each reference's default (nearest for
    the torchvision policies, bilinear for RandAugment; the official CIFAR-10 policy has its own
    per-op resampling); ``fill=None`` each reference's fill (0 for the torchvision policies, 128
    for RandAugment and the official CIFAR-10 policy)."""
    if policy not in POLICIES:
        raise BalpoeError(f"unknown strong augmentation policy {policy!r} (choose from {', '.join(POLICIES)})")
    if policy == "autoaugment_cifar10":
        x = autoaugment_cifar10(x, generator, interpolation=interpolation or "nearest", fill=fill)
    elif policy == "autoaugment_cifar10_official":
        x = autoaugment_cifar10_official(x, generator, fill=128 if fill is None else fill)
    elif policy == "trivialaugment":
        x = trivial_augment_wide(x, generator, interpolation=interpolation or "nearest", fill=fill)
    elif policy == "randaugment":
        x = rand_augment(x, generator, randaugment, interpolation=interpolation or "bilinear",
                         fill=128 if fill is None else fill)
    return cutout(x, cutout_length, generator) if cutout_length else x
