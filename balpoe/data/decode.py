"""Image decoding to uint8 tensors, and the torchvision transforms of the image-file path on them.

:func:`read_rgb` decodes a JPEG or 8-bit PNG file with torchvision's libjpeg-turbo / libpng
decoders (:func:`torchvision.io.decode_image` with ``ImageReadMode.RGB``, docs.pytorch.org/vision/
stable/io.html) straight into a ``uint8 [3, H, W]`` tensor: the pixels of
``PIL.Image.open(path).convert("RGB")`` (identical for PNG; for JPEG the same libjpeg-turbo IDCT and
fancy upsampling, so identical with current wheels and within a few levels across libjpeg builds),
grey, grey + alpha, palette, RGBA and CMYK files becoming RGB as PIL's ``convert("RGB")`` makes them
(alpha dropped, not composited; no EXIF rotation).  Every other format (16-bit PNG, WebP, GIF, BMP,
TIFF, ...) and any file torchvision refuses goes through PIL; a file neither can read is a one-line
:class:`~balpoe.errors.BalpoeError` naming it.  (torchvision 0.29 deprecates its image decoders in
favour of TorchCodec >= 0.16 and warns with a ``DeprecationWarning``; they are used in this one
place, and where they are gone PIL decodes every file: the same pixels, slower.)

:func:`tensor_transform` turns a torchvision v1 ``Compose`` written for PIL images (the official
BalPoE loaders' ``RandomResizedCrop`` -> flip -> ``ColorJitter`` -> [policy] -> ``ToTensor`` ->
``Normalize``, and the test-time ``Resize`` -> ``CenterCrop``) into one that takes the uint8 tensors
of :func:`read_rgb` and draws the same random parameters from torch's generator:
``torchvision.transforms.v2`` ``RandomResizedCrop`` / ``RandomHorizontalFlip`` / ``ColorJitter``
sample exactly as their v1 twins (same calls, same order), and bilinear resizing of uint8 tensors
with ``antialias=True`` is PIL's separable antialiased filter (docs.pytorch.org/vision/stable/
transforms.html, "antialias"), equal to PIL's ``resize(BILINEAR)`` up to rounding.  Ops with no
tensor twin of the same distribution (RandAugment / AutoAugment on PIL images, non-bilinear
resizing, anything unknown) stay PIL ops: the crop and flip run on the tensor first, so the PIL
ops see the small crop, never the full-size image.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

try:  # deprecated in torchvision 0.29 in favour of TorchCodec (>= 0.16); without it, PIL decodes everything
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - a torchvision without the image extension
    ImageReadMode = decode_image = None

from balpoe.errors import BalpoeError, clip, short_path

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: offset of the bit depth in a PNG file (8-byte signature, IHDR length, type, width, height)
_PNG_BIT_DEPTH = 24
#: PIL decode errors of a corrupt or unknown file (UnidentifiedImageError and truncation are OSErrors)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (read in place, no copy); a missing or unreadable file is a
    one-line error naming it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = torch.empty(size, dtype=torch.uint8)
            got = f.readinto(data.numpy()) if size else 0
    except FileNotFoundError:
        raise BalpoeError(f"image not found: {short_path(path, 240)}") from None
    except OSError as e:
        why = clip(e.strerror or type(e).__name__)
        raise BalpoeError(f"cannot read image {short_path(path, 240)}: {why}") from None
    return data[:got]


def _tensor_decodable(head: bytes) -> bool:
    """JPEG, or PNG of at most 8 bits per sample: the formats whose torchvision decode is PIL's
    ``convert("RGB")`` pixel for pixel (16-bit PNGs come back as uint16 from torchvision, which PIL
    converts to 8 bits its own way)."""
    if head.startswith(_JPEG_MAGIC):
        return True
    return head.startswith(_PNG_MAGIC) and len(head) > _PNG_BIT_DEPTH and head[_PNG_BIT_DEPTH] <= 8


def pil_rgb(data: bytes | torch.Tensor, path: str | Path = "<bytes>") -> torch.Tensor:
    """``PIL.Image.open(...).convert("RGB")`` of encoded bytes as a ``uint8 [3, H, W]`` tensor (a
    permuted ``H x W x 3`` array: the memory layout torchvision's decoders return and its uint8
    resize reads fastest); a file PIL cannot decode is a one-line :class:`BalpoeError` naming
    ``path``."""
    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else data
    try:
        with Image.open(io.BytesIO(raw)) as im:
            rgb = np.array(im.convert("RGB"))
    except Image.UnidentifiedImageError:
        raise BalpoeError(f"cannot decode image {short_path(str(path), 240)}: not an image format PIL or "
                          "torchvision reads, or a corrupt header") from None
    except _PIL_ERRORS as e:
        raise BalpoeError(f"cannot decode image {short_path(str(path), 240)}: {clip(e) or type(e).__name__}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)  # channels-last strides, like decode_image's output


def read_rgb(path: str | Path) -> torch.Tensor:
    """The image file at ``path`` as a ``uint8 [3, H, W]`` RGB tensor, the pixels of
    ``PIL.Image.open(path).convert("RGB")``.

    JPEG and 8-bit PNG files are decoded by torchvision (libjpeg-turbo / libpng: 1.12x PIL's
    images per core on 500 x 375 JPEGs, and the uint8 tensor it returns lets the crop and resize
    run on tensors, ``benchmarks/input_pipeline.py``); other formats, and files torchvision refuses,
    by PIL.  A missing, unreadable or undecodable file raises a one-line :class:`BalpoeError`
    naming it."""
    path = os.fspath(path)
    data = _read_bytes(path)
    if decode_image is not None and _tensor_decodable(data[:_PNG_BIT_DEPTH + 1].numpy().tobytes()):
        try:
            with warnings.catch_warnings():  # torchvision 0.29's deprecation notice, once per image otherwise
                warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
                img = decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # corrupt for libjpeg / libpng: PIL decides, and names the problem
            img = None
        if img is not None and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3:
            return img
    return pil_rgb(data, path)


def _tensor_op(op) -> object | None:
    """The ``transforms.v2`` twin of a v1 op for uint8 / float image tensors that draws the same
    parameters from torch's generator and computes the same pixels up to rounding, or None."""
    bilinear = T.InterpolationMode.BILINEAR
    if isinstance(op, T.RandomResizedCrop) and op.interpolation == bilinear:
        return v2.RandomResizedCrop(op.size, scale=op.scale, ratio=op.ratio, interpolation=bilinear, antialias=True)
    if isinstance(op, T.RandomHorizontalFlip):
        return v2.RandomHorizontalFlip(op.p)
    if isinstance(op, T.Resize) and op.interpolation == bilinear:
        return v2.Resize(op.size, interpolation=bilinear, max_size=op.max_size, antialias=True)
    if isinstance(op, T.CenterCrop):
        return v2.CenterCrop(op.size)
    if isinstance(op, T.ColorJitter):
        return v2.ColorJitter(op.brightness, op.contrast, op.saturation, op.hue)
    return None


def _geometric(op) -> bool:
    return not isinstance(op, T.ColorJitter) and _tensor_op(op) is not None


def tensor_transform(transform: Callable) -> T.Compose:
    """``transform`` (a v1 ``Compose``, or one op, written for PIL RGB images) for the uint8
    ``[3, H, W]`` tensors of :func:`read_rgb`, with the same random parameters and the same result
    up to rounding.

    * Every op before ``ToTensor`` has a tensor twin (:func:`_tensor_op`; the standard pipeline
      ``RandomResizedCrop`` -> flip -> ``ColorJitter``, and ``Resize`` -> ``CenterCrop``): all of
      them run on the uint8 tensor and ``ToTensor`` becomes ``ToDtype(float32, scale=True)``.  The
      jitter stays on uint8 on purpose: torchvision's uint8 kernels round to uint8 after each
      factor like PIL's ``ImageEnhance`` does (within 0.2 levels of PIL on average), where a float
      jitter would drop PIL's truncation bias (about 1 level on average, ``benchmarks/input_pipeline.py``).
    * Otherwise (RandAugment / AutoAugment, which need PIL images): the leading crop / flip / resize
      ops run on the tensor, then ``ToPILImage`` and the rest of ``transform`` unchanged.

    Ops after ``ToTensor`` (``Normalize``, Cutout) work on float tensors already and are kept.  A
    transform that already takes tensors (one with a ``ToDtype`` or ``ToPILImage``, e.g. this
    function's own result) is returned unchanged, so converting twice is harmless."""
    ops = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    if any(isinstance(op, (v2.ToDtype, v2.ToPILImage)) for op in ops):
        return transform if isinstance(transform, T.Compose) else T.Compose(ops)
    k = next((i for i, op in enumerate(ops) if isinstance(op, T.ToTensor)), len(ops))
    if k < len(ops) and all(_tensor_op(op) is not None for op in ops[:k]):
        return T.Compose([_tensor_op(op) for op in ops[:k]] + [v2.ToDtype(torch.float32, scale=True)] + ops[k + 1:])
    j = next((i for i, op in enumerate(ops) if not _geometric(op)), len(ops))
    return T.Compose([_tensor_op(op) for op in ops[:j]] + [v2.ToPILImage()] + ops[j:])
