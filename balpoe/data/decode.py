"""Image decoding to uint8 tensors, and the torchvision transforms of the image-file path on them.

:func:`read_rgb` decodes a JPEG file with torchvision's libjpeg-turbo decoder
(:func:`torchvision.io.decode_image` with ``ImageReadMode.RGB``, docs.pytorch.org/vision/
stable/io.html) straight into a ``uint8 [3, H, W]`` tensor: the pixels of
``PIL.Image.open(path).convert("RGB")`` (the same libjpeg-turbo IDCT and fancy upsampling, so
identical with current wheels and within a few levels across libjpeg builds), grey and CMYK files
becoming RGB as PIL's ``convert("RGB")`` makes them (no EXIF rotation).  Every other format (PNG,
WebP, GIF, BMP, TIFF, ...) and any file torchvision refuses goes through PIL; a file neither can read
is a one-line :class:`~balpoe.errors.BalpoeError` naming it.  Every path (:func:`read_rgb`,
:func:`load_pil`, :func:`pil_rgb`) opens the file with PIL first (:func:`open_image`: the header
only) and refuses an image larger than PIL's ``Image.MAX_IMAGE_PIXELS`` before decoding a pixel.  (torchvision 0.29 deprecates its image decoders in
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
import re
import stat
import struct
import warnings
import zlib
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

#: PIL decode errors of a corrupt or unknown file: its plugins raise OSError, SyntaxError, ValueError,
#: EOFError, but on hostile files also IndexError, struct.error, TypeError, ...: any of them is a bad file
_PIL_ERRORS = (Exception,)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def pixel_limit() -> int | None:
    """The most pixels an image file may decode to: PIL's ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by
    default, a 1 GB RGBA image's pixels / 3; None switches the limit off), read when an image is
    opened, so setting it there changes every decode path."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else None


def _too_large(path, pixels: int, size: tuple[int, int] | None = None) -> BalpoeError:
    dims = f"{size[0]} x {size[1]} pixels ({pixels:,})" if size else f"{pixels:,} pixels"
    return BalpoeError(f"image {short_path(str(path), 240)} is {dims}, more than the limit of {pixel_limit():,} "
                       "(PIL's Image.MAX_IMAGE_PIXELS; a decompression bomb?)")


def open_image(source, path: str | Path) -> Image.Image:
    """``PIL.Image.open(source)`` (the header only, nothing decoded yet) with the pixel limit of
    :func:`pixel_limit` applied to the size the header declares, and one-line :class:`BalpoeError`
    naming ``path`` for a file PIL cannot identify or one over the limit (PIL itself only warns up to
    twice its limit; here the limit is the limit, on every decode path)."""
    shown = short_path(str(path), 240)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError as e:
        m = _BOMB_PIXELS.search(str(e))
        if m:
            raise _too_large(path, int(m.group(1))) from None
        raise BalpoeError(f"cannot decode image {shown}: {clip(e)}") from None
    except Image.UnidentifiedImageError:
        raise BalpoeError(f"cannot decode image {shown}: not an image format PIL or torchvision reads, or a corrupt "
                          "header") from None
    except FileNotFoundError:
        raise BalpoeError(f"image not found: {shown}") from None
    except _PIL_ERRORS as e:
        raise BalpoeError(f"cannot decode image {shown}: {clip(e) or type(e).__name__}") from None
    w, h = im.size
    limit = pixel_limit()
    if limit is not None and w * h > limit:
        im.close()
        raise _too_large(path, w * h, (w, h))
    return im


def load_pil(path: str | Path) -> Image.Image:
    """The image file at ``path`` decoded by PIL in its own mode (``load()`` done, file closed),
    with the pixel limit; a missing, unreadable, undecodable or too large file is a one-line
    :class:`BalpoeError` naming it."""
    raw = _read_bytes(os.fspath(path)).numpy().tobytes()
    return _decoded(open_image(io.BytesIO(raw), path), path, raw)


def _undecodable(path, e: Exception) -> BalpoeError:
    return BalpoeError(f"cannot decode image {short_path(str(path), 240)}: {clip(e) or type(e).__name__}")


def _decoded(im: Image.Image, path, raw: bytes) -> Image.Image:
    """``im.load()`` (``raw``: the file's bytes, in memory, so no file stays open), then
    :func:`png_rows_missing` where PIL cannot tell: a PNG whose pixel data end early is an error, as
    every other truncated file is."""
    try:
        im.load()
    except _PIL_ERRORS as e:
        im.close()
        raise _undecodable(path, e) from None
    w, h = im.size
    if im.format == "PNG" and (im.info.get("interlace") or not np.asarray(im.crop((0, h - 1, w, h))).any()):
        missing = png_rows_missing(raw)
        if missing:
            im.close()
            raise BalpoeError(f"cannot decode image {short_path(str(path), 240)}: its PNG pixel data end early "
                              f"({missing:,} of {w * h:,} pixels missing; a truncated file?)")
    return im


#: PNG colour type -> samples per pixel (PNG specification, ISO/IEC 15948, table 11.1)
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 passes: (first column, first row, column step, row step) (ISO/IEC 15948, 8.2)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_rows_missing(raw: bytes) -> int:
    """How many pixels of a PNG file its compressed data do not reach: 0 for a complete file.

    PIL (and libpng) decode a PNG whose zlib stream ends *cleanly* before the last row without a
    word, the missing rows black.  The filtered data a PNG must inflate to is fixed by its header:
    ``height x (1 + ceil(width x bits per pixel / 8))`` bytes, summed over the seven Adam7 passes of
    an interlaced file (ISO/IEC 15948, 7.2 and 8.2); this inflates the ``IDAT`` chunks (at most that
    many bytes) and counts the pixels of the rows that are short.  Only called when PIL's result could
    hide it (an interlaced file, or a last row that decoded all zero), so a complete file is inflated
    once.  A file this cannot parse returns 0: PIL has already decoded it."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or len(raw) < 33:
        return 0
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", raw[16:29])
    bits = depth * _PNG_SAMPLES.get(colour, 0)
    if not bits:
        return 0
    passes = [(width, height)] if not interlace else [
        (max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)) for x0, y0, dx, dy in _ADAM7]
    rows = [(cols, 1 + (cols * bits + 7) // 8) for cols, nrows in passes if cols for _ in range(nrows)]
    need = sum(size for _, size in rows)
    stream, pos = bytearray(), 8
    while pos + 8 <= len(raw):
        (length,), kind = struct.unpack(">I", raw[pos:pos + 4]), raw[pos + 4:pos + 8]
        if kind == b"IDAT":
            stream += raw[pos + 8:pos + 8 + length]
        elif kind == b"IEND":
            break
        pos += 12 + length
    try:
        got = len(zlib.decompressobj().decompress(bytes(stream), need))
    except zlib.error:
        return 0
    missing = 0
    for cols, size in rows:
        missing += cols if got < size else 0
        got -= size
    return missing


def _read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (read in place, no copy); a missing or unreadable file is a
    one-line error naming it."""
    try:  # non-blocking open: a FIFO named like an image must not hang the reader
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb", closefd=True) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BalpoeError(f"cannot read image {short_path(path, 240)}: not a regular file")
            data = torch.empty(st.st_size, dtype=torch.uint8)
            got = f.readinto(data.numpy()) if st.st_size else 0
    except FileNotFoundError:
        raise BalpoeError(f"image not found: {short_path(path, 240)}") from None
    except OSError as e:
        why = clip(e.strerror or type(e).__name__)
        raise BalpoeError(f"cannot read image {short_path(path, 240)}: {why}") from None
    return data[:got]


def _rgb_tensor(im: Image.Image, path, raw: bytes) -> torch.Tensor:
    """``im.convert("RGB")`` (decoded by :func:`_decoded`) as a ``uint8 [3, H, W]`` tensor (a
    permuted ``H x W x 3`` array: the memory layout torchvision's decoders return and its uint8
    resize reads fastest)."""
    _decoded(im, path, raw)
    try:
        with im:
            rgb = np.array(im.convert("RGB"))
    except _PIL_ERRORS as e:
        raise _undecodable(path, e) from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def pil_rgb(data: bytes | torch.Tensor, path: str | Path = "<bytes>") -> torch.Tensor:
    """``PIL.Image.open(...).convert("RGB")`` of encoded bytes as a ``uint8 [3, H, W]`` tensor, with
    the pixel limit (:func:`open_image`); a file PIL cannot decode is a one-line :class:`BalpoeError`
    naming ``path``."""
    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else data
    return _rgb_tensor(open_image(io.BytesIO(raw), path), path, raw)


def read_rgb(path: str | Path) -> torch.Tensor:
    """The image file at ``path`` as a ``uint8 [3, H, W]`` RGB tensor, the pixels of
    ``PIL.Image.open(path).convert("RGB")``.

    PIL reads the header first (:func:`open_image`: the format, and the size against the pixel
    limit, before anything is decoded).  JPEG files are then decoded by torchvision (libjpeg-turbo:
    1.12x PIL's images per core on 500 x 375 JPEGs, and the uint8 tensor it returns lets the crop
    and resize run on tensors, ``benchmarks/input_pipeline.py``); every other format, and JPEGs
    torchvision refuses, by PIL.  PNG files stay with PIL on purpose: torchvision 0.29's libpng
    decoder ends the whole process (SIGSEGV) on a PNG whose row data are corrupt (fewer rows than
    the header declares, a bad CRC, filter byte or zlib stream), where PIL raises (and a zlib
    stream that ends cleanly before the last row, which PIL decodes black without a word, is found
    by :func:`png_rows_missing`), and PIL's PNG
    decoding is 0.78x torchvision's speed (500 x 375 RGB, one core), a small part of a training
    step.  A missing,
    unreadable, undecodable or too large file raises a one-line :class:`BalpoeError` naming it."""
    path = os.fspath(path)
    data = _read_bytes(path)
    raw = data.numpy().tobytes()
    im = open_image(io.BytesIO(raw), path)
    if decode_image is not None and im.format == "JPEG":
        im.close()
        try:
            with warnings.catch_warnings():  # torchvision 0.29's deprecation notice, once per image otherwise
                warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
                img = decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # corrupt for libjpeg: PIL decides, and names the problem
            img = None
        if img is not None and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3:
            return img
        return pil_rgb(raw, path)
    return _rgb_tensor(im, path, raw)


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
