"""Hostile data files: every one is a one-line answer, never code execution, a crash or a traceback.

A corpus built here (CIFAR pickles that try to run code or to allocate without bound, truncated and
malformed PNG / JPEG / WebP files, decompression bombs declared in image headers, list files with
labels that are not class numbers, a symlink loop in a class folder) goes through the command line
in process (``balpoe.cli.main``): exit code 2 (or the documented warning), exactly one ``error:``
line on stderr, no ``Traceback``, no payload marker file, nothing created in ``--out``.  The cases
that need a process of their own run in a subprocess: decoding files that crash native decoders
(a crash would be a negative return code) and the report of 8,142 classes under a memory limit.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from formats import write_cifar, write_fashion_mnist
from PIL import Image, features

from balpoe import recipe_from_dict, train
from balpoe.cli import main
from balpoe.data import cifar
from balpoe.data.cifar import load_cifar
from balpoe.data.decode import load_pil, png_rows_missing, read_rgb
from balpoe.data.image_folder import folder_split
from balpoe.errors import BalpoeError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2, stderr exactly one ``error:`` line (containing ``needles``), no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _empty(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------
# CIFAR pickles

class _Payload:
    """Unpickling this runs ``touch MARKER`` (the classic ``__reduce__`` payload)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class _OpenPayload:
    """Unpickling this calls ``open(MARKER, 'w')``: the file appears without any shell."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _dumps(obj, protocol: int = 2) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def _batch(**kw) -> dict:
    d = {b"batch_label": b"training batch 1 of 5", b"labels": [0, 1], b"data": np.zeros((2, 3072), np.uint8),
         b"filenames": [b"a.png", b"b.png"]}
    d.update({k.encode(): v for k, v in kw.items()})
    return d


def _genuine_uint8_pickle() -> bytes:
    return _dumps(_batch())


def _nested(depth: int) -> bytes:
    """A pickled batch whose labels are ``depth`` lists nested in each other."""
    head = _dumps(_batch(labels=None))
    i = head.index(b"labels") + len(b"labels")
    j = head.index(b"N", i)  # the None that follows the key (after its memo put)
    return head[:j] + b"]" * depth + b"a" * (depth - 1) + head[j + 1:]


def _dtype_flags() -> bytes:
    """A uint8 array whose dtype state claims Python objects inside (flags 0x3f)."""
    raw = _genuine_uint8_pickle()
    tail = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    assert tail in raw
    return raw.replace(tail, b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ft", 1)


#: name -> (file of cifar-10-batches-py to replace, its bytes given the marker path, the message part)
CIFAR_CASES = {
    "reduce_os_system_in_data": ("data_batch_1", lambda m: _dumps({b"data": _Payload(m), b"labels": []}),
                                 "refused the Python global posix.system"),
    "reduce_in_meta": ("batches.meta", lambda m: _dumps({b"label_names": _Payload(m)}), "posix.system"),
    "reduce_in_a_label": ("data_batch_1", lambda m: _dumps(_batch(labels=[0, _Payload(m)])), "posix.system"),
    "builtins_open": ("data_batch_1", lambda m: _dumps({b"data": _OpenPayload(m)}), "refused the Python global"),
    "protocol_5_stack_global": ("data_batch_1", lambda m: _dumps({b"data": _Payload(m)}, 5), "posix.system"),
    "protocol_0_inst": ("data_batch_1", lambda m: b"(S'touch " + str(m).encode() + b"'\nios\nsystem\n.",
                        "os.system"),
    "copyreg_extension": ("data_batch_1", lambda m: b"\x80\x02\x82\x01.", "CIFAR file"),
    "persistent_id": ("data_batch_1", lambda m: b"\x80\x02X\x01\x00\x00\x00aQ.", "refused a persistent id"),
    "ndarray_called_with_a_huge_shape": ("data_batch_1", lambda m: b"\x80\x02cnumpy\nndarray\n"
                                         b"J\xa0\x86\x01\x00J\xa0\x86\x01\x00\x86\x85R.", "CIFAR file"),
    "object_array": ("data_batch_1", lambda m: _dumps(_batch(data=np.array([1, "x"], dtype=object))),
                     "not a plain number type"),
    "dtype_flags_claim_objects": ("data_batch_1", lambda m: _dtype_flags(), "never pickles"),
    "huge_memo_index": ("data_batch_1", lambda m: b"\x80\x02K\x01r\xff\xff\xff\x7f.", "expected a pickled dict"),
    "nested_100k_deep": ("data_batch_1", lambda m: _nested(100_000), "list of integers"),
    "truncated": ("data_batch_1", lambda m: _genuine_uint8_pickle()[:300], "CIFAR file"),
    "not_a_pickle": ("data_batch_1", lambda m: b"GIF89a not a pickle at all", "CIFAR file"),
    "empty_file": ("test_batch", lambda m: b"", "CIFAR file"),
    "a_list_not_a_dict": ("data_batch_1", lambda m: _dumps([1, 2]), "expected a pickled dict, got list"),
    "integer_keys": ("data_batch_1", lambda m: _dumps({1: 2}), "not a string"),
    "missing_data_key": ("data_batch_1", lambda m: _dumps({b"labels": []}), "missing key b'data'"),
    "labels_out_of_range": ("data_batch_1", lambda m: _dumps(_batch(labels=[0, 10])), "label 10 (image 1)"),
    "labels_negative": ("data_batch_1", lambda m: _dumps(_batch(labels=[-1, 0])), "outside 0..9"),
    "labels_huge": ("data_batch_1", lambda m: _dumps(_batch(labels=[10 ** 30, 0])), "outside 0..9"),
    "labels_floats": ("data_batch_1", lambda m: _dumps(_batch(labels=[0.0, 1.0])), "holds a float"),
    "labels_bools": ("data_batch_1", lambda m: _dumps(_batch(labels=[True, False])), "holds a bool"),
    "labels_count_mismatch": ("data_batch_1", lambda m: _dumps(_batch(labels=[0])), "2 images but 1 labels"),
    "data_wrong_shape": ("data_batch_1", lambda m: _dumps(_batch(data=np.zeros((2, 100), np.uint8))),
                         "uint8 [N, 3072]"),
    "data_float": ("data_batch_1", lambda m: _dumps(_batch(data=np.zeros((2, 3072), np.float32))), "float32"),
    "data_a_list": ("data_batch_1", lambda m: _dumps(_batch(data=[[0] * 3072] * 2)), "got list"),
    "names_not_utf8": ("batches.meta", lambda m: _dumps({b"label_names": [b"\xff\xfe"] * 10}), "not UTF-8"),
    "names_wrong_count": ("batches.meta", lambda m: _dumps({b"label_names": [b"a"] * 3}), "got 3 class names"),
    "name_too_long": ("batches.meta", lambda m: _dumps({b"label_names": [b"a" * 5000] * 10}), "at most 1000"),
}


def _hostile_cifar(root: Path, case: str, marker: Path) -> Path:
    """A genuine CIFAR-10 folder under ``root`` with one file replaced by the hostile one."""
    write_cifar(root, 10, 2, 1)
    name, content, _ = CIFAR_CASES[case]
    (root / "cifar-10-batches-py" / name).write_bytes(content(marker))
    return root


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    p = tmp_path / "hostile.yaml"
    p.write_text(yaml.safe_dump({
        "name": "hostile", "data": {"dataset": "fashion_mnist", "imb_factor": 2, "num_workers": 0, "image_size": 8},
        "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [4, 8, 8]}},
        "loss": {"tau": [0.5, 1.5]},
        "optim": {"lr": 0.05, "batch_size": 8, "epochs": 1, "warmup_epochs": 0},
        "train": {"eval_batch_size": 8}}))
    return p


@pytest.mark.parametrize("case", sorted(CIFAR_CASES))
def test_hostile_cifar_file_in_training(case, tmp_path, recipe_file, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    root = _hostile_cifar(tmp_path / "evil", case, marker)
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", recipe_file, "--set", "data.dataset=cifar10", "--set", f"data.root={root}",
                      "--out", out, "--no-progress")
    line = _one_error(rc, err, CIFAR_CASES[case][2], CIFAR_CASES[case][0])
    assert not marker.exists(), "the pickle ran code"
    assert _empty(out)
    assert len(line) < 600


def test_file_larger_than_any_cifar_file(tmp_path, recipe_file, capsys, monkeypatch):
    write_cifar(tmp_path / "big", 10, 2, 1)
    monkeypatch.setattr(cifar, "MAX_FILE_BYTES", 1000)
    rc, _, err = _cli(capsys, "train", recipe_file, "--set", "data.dataset=cifar10", "--set",
                      f"data.root={tmp_path / 'big'}", "--out", tmp_path / "out", "--no-progress")
    _one_error(rc, err, "larger than 1,000 bytes, which no CIFAR file is", "data_batch_1")


def _gz(header: tuple[int, ...], zeros: int) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(struct.pack(f">{len(header)}I", *header))
        chunk = bytes(2 ** 20)
        for _ in range(zeros // len(chunk)):
            f.write(chunk)
        f.write(bytes(zeros % len(chunk)))
    return buf.getvalue()


IDX_CASES = {  # gzipped IDX files (Fashion-MNIST): what a small file may claim or expand to
    "header_declares_1e9_bytes": (_gz((2051, 100000, 100, 100), 1000), "says 1,000,000,000 data bytes, more than"),
    "header_dims_overflow_int64": (_gz((2051, 2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1), 0),
                                   "more than the 268,435,456"),
    "stream_expands_past_header": (_gz((2051, 60000, 28, 28), 64 * 2 ** 20), "has more than 47040001 data bytes"),
}


@pytest.mark.parametrize("case", sorted(IDX_CASES))
def test_hostile_fashion_mnist_file(case, tmp_path, recipe_file, capsys):
    root = write_fashion_mnist(tmp_path / "fm", 2, 1)
    (root / "train-images-idx3-ubyte.gz").write_bytes(IDX_CASES[case][0])
    rc, _, err = _cli(capsys, "train", recipe_file, "--set", f"data.root={root}", "--out", tmp_path / "out",
                      "--no-progress")
    _one_error(rc, err, IDX_CASES[case][1], "train-images-idx3-ubyte.gz")
    assert len(IDX_CASES[case][0]) < 100_000


# --- genuine files still load, bit for bit ---------------------------------------------------

def _py2_pickle(obj) -> bytes:
    """``obj`` (dict / list / bytes / int / uint8 ndarray) pickled as Python 2's cPickle wrote the
    real CIFAR files (protocol 2: SHORT_BINSTRING / BINSTRING strings, numpy.core.multiarray
    ._reconstruct, numpy.ndarray, numpy.dtype)."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

    def enc(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, bytes):
            return s(o)
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8
        shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in o.shape) + b"t"
        dtype = b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01" + shape + dtype
                + b"\x89" + s(o.tobytes()) + b"tb")
    return b"\x80\x02" + enc(obj) + b"."


def test_genuine_cifar_files_load_bit_identically(tmp_path):
    """Files in the CIFAR layout written by Python 3 (``tests/formats.py``), and by Python 2 as the
    real archives were, give exactly what an unrestricted ``pickle.load`` gives."""
    root = write_cifar(tmp_path / "py3", 10, 3, 2, seed=7)
    folder = root / "cifar-10-batches-py"
    for train_split, files in ((True, [f"data_batch_{i}" for i in range(1, 6)]), (False, ["test_batch"])):
        x, y, names = load_cifar(root, 10, train=train_split)
        ref = [pickle.load(open(folder / f, "rb"), encoding="bytes") for f in files]
        assert np.array_equal(x, np.concatenate([r[b"data"] for r in ref]).reshape(-1, 3, 32, 32))
        assert y.dtype == np.int64 and y.tolist() == sum((r[b"labels"] for r in ref), [])
    meta = pickle.load(open(folder / "batches.meta", "rb"), encoding="bytes")
    assert names == [n.decode() for n in meta[b"label_names"]]

    py2 = tmp_path / "py2" / "cifar-10-batches-py"
    py2.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for f in ("test_batch",):
        d = {b"batch_label": b"testing batch 1 of 1", b"labels": rng.integers(0, 10, 7).tolist(),
             b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * 7}
        (py2 / f).write_bytes(_py2_pickle(d))
        batches.append(d)
    (py2 / "batches.meta").write_bytes(_py2_pickle({b"label_names": [b"c%d" % i for i in range(10)],
                                                   b"num_vis": 3072, b"num_cases_per_batch": 10000}))
    assert pickle.loads((py2 / "test_batch").read_bytes(), encoding="bytes")[b"labels"] == batches[0][b"labels"]
    x, y, names = load_cifar(tmp_path / "py2", 10, train=False)
    assert np.array_equal(x.reshape(7, -1), batches[0][b"data"]) and y.tolist() == batches[0][b"labels"]
    assert names == [f"c{i}" for i in range(10)]


# --- a checkpoint's stored recipe does not choose where data come from silently -------------

@pytest.fixture(scope="module")
def cifar_ckpt(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 model trained with ``data.root`` null (its data in ./data), plus its
    safetensors export: the layout of a model file shipped with a data folder beside it."""
    home = tmp_path_factory.mktemp("trained")
    write_cifar(home / "data", 10, 4, 2)
    cwd = os.getcwd()
    os.chdir(home)
    try:
        recipe = recipe_from_dict({
            "name": "tiny", "seed": 1, "data": {"dataset": "cifar10", "imb_factor": 2},
            "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [4, 8, 8]}},
            "loss": {"tau": [0.5, 1.5]}, "optim": {"lr": 0.05, "batch_size": 16, "epochs": 1, "warmup_epochs": 0},
            "train": {"eval_batch_size": 16}})
        train(recipe, home / "run", show_progress=False, report=False)
        assert main(["export", str(home / "run" / "last.pt"), "--format", "safetensors",
                     "--out", str(home / "model.safetensors")]) == 0
    finally:
        os.chdir(cwd)
    return home


@pytest.mark.parametrize("model", ["model.safetensors", "run/last.pt"])
def test_eval_of_a_model_shipped_with_a_hostile_data_folder(model, cifar_ckpt, tmp_path, monkeypatch, capsys):
    """``balpoe eval model.safetensors`` next to a ``data/cifar-10-batches-py`` whose batch runs code
    (the stored recipe's data.root is null: ./data): refused in one line, and the output says the
    data location came from the file, not from the user."""
    marker = tmp_path / "PAYLOAD_RAN"
    _hostile_cifar(tmp_path / "data", "reduce_os_system_in_data", marker)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval_out" / "eval.json"
    rc, _, err = _cli(capsys, "eval", cifar_ckpt / model, "--out", out, "--no-report")
    line = _one_error(rc, err, "refused the Python global posix.system", "data/cifar-10-batches-py/data_batch_1")
    assert line.endswith(f"(data.root as stored in the recipe of checkpoint '{cifar_ckpt / model}', not given here)")
    assert not marker.exists() and not out.exists()


def test_eval_with_a_data_root_given_to_a_hostile_folder(cifar_ckpt, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    root = _hostile_cifar(tmp_path / "evil", "protocol_5_stack_global", marker)
    rc, _, err = _cli(capsys, "eval", cifar_ckpt / "run" / "last.pt", "--set", f"data.root={root}",
                      "--out", tmp_path / "e.json", "--no-report")
    line = _one_error(rc, err, "posix.system", str(root))
    assert not marker.exists() and not (tmp_path / "e.json").exists()
    assert "as stored" not in line


def test_eval_of_a_genuine_folder_still_works_and_says_where(cifar_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(cifar_ckpt)
    rc, _, err = _cli(capsys, "eval", "model.safetensors", "--out", tmp_path / "e.json", "--no-report")
    assert rc == 0, err
    assert ("data: cifar10 from data.root null (the dataset's default place, ./data for CIFAR); data.root as stored "
            "in the recipe of checkpoint 'model.safetensors', not given here (override data.root to read from "
            "elsewhere)\n") in err
    rc, _, err = _cli(capsys, "eval", "model.safetensors", "--set", "data.root=data", "--out", tmp_path / "e.json",
                      "--no-report")
    assert rc == 0 and "data: cifar10 from data.root 'data' (given here)\n" in err
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 20


# ------------------------------------------------------------------------------------------------
# Image files

SIG = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(w: int = 16, h: int = 16, rows: int | None = None, depth: int = 8, colour: int = 2, interlace: int = 0,
         raw: bytes | None = None, crc: int | None = None, plte: bool = False, idat: bool = True) -> bytes:
    """A PNG built chunk by chunk: ``rows`` of the ``h`` rows its header declares (RGB, filter 0)."""
    channels = {0: 1, 2: 3, 3: 1, 6: 4}[colour]
    row = b"\x00" + bytes(range(256)) * (w * channels * depth // 8 // 256 + 1)
    row = row[:1 + (w * channels * depth + 7) // 8]
    data = raw if raw is not None else row * (h if rows is None else rows)
    return (SIG + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))
            + (_chunk(b"PLTE", bytes(6)) if plte else b"")
            + (_chunk(b"IDAT", zlib.compress(data), crc) if idat else b"") + _chunk(b"IEND", b""))


def _encoded(fmt: str, size=(24, 20), **kw) -> bytes:
    a = (np.add.outer(np.arange(size[1]), np.arange(size[0]))[:, :, None] * np.array([3, 5, 7]) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _gif_bomb() -> bytes:
    """A 16x16 GIF whose screen descriptor declares 30000 x 30000 pixels."""
    data = bytearray(_encoded("GIF", (16, 16)))
    data[6:10] = struct.pack("<HH", 30000, 30000)
    return bytes(data)


def _jpeg_bomb(w: int = 15000, h: int = 15000) -> bytes:
    """A small JPEG whose SOF header declares ``w`` x ``h`` pixels (the scan data are a 16x16 image's)."""
    data = bytearray(_encoded("JPEG", (16, 16), quality=50))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _black_last_row_png() -> bytes:
    a = np.full((6, 5, 3), 90, np.uint8)
    a[-1] = 0
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


#: name -> (bytes, what reading it gives: "error" (one line naming the file), "decoded", "too_large")
IMAGE_CASES = {
    "png_69_bytes_one_of_16_rows": (_png(rows=1), "error"),
    "png_15_of_16_rows": (_png(rows=15), "error"),
    "png_complete_last_row_black": (_black_last_row_png(), "decoded"),
    "png_no_rows": (_png(rows=0), "error"),
    "png_bad_idat_crc": (_png(crc=1), "decoded"),
    "png_bad_filter_byte": (_png(raw=b"\x09" * (16 * 49)), "error"),
    "png_broken_zlib": (SIG + _chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
                        + _chunk(b"IDAT", b"\x78\x9c" + bytes(range(200))) + _chunk(b"IEND", b""), "error"),
    "png_interlaced_short": (_png(interlace=1, raw=b"\x00" * 40), "error"),
    "png_16_bit_short": (_png(depth=16, colour=0, raw=b"\x00" * 10), "error"),
    "png_rgba_short": (_png(colour=6, raw=b"\x00" * 10), "error"),
    "png_no_idat": (_png(idat=False), "error"),
    "png_palette_without_plte": (_png(colour=3, rows=16), "decoded"),
    "png_signature_only": (SIG, "error"),
    "png_truncated_in_idat": (_noise_png()[:len(_noise_png()) // 2], "error"),
    "png_header_bomb_20000x20000": (_png(20000, 20000, raw=b""), "too_large"),
    "png_header_bomb_10000x10000": (_png(10000, 10000, raw=b""), "too_large"),
    "png_width_2_31": (_png(2 ** 31 - 1, 1, raw=b""), "too_large"),
    "jpeg_half": (_encoded("JPEG")[:len(_encoded("JPEG")) // 2], "decoded_or_error"),
    "jpeg_header_only": (_encoded("JPEG")[:200], "error"),
    "jpeg_soi_only": (b"\xff\xd8\xff", "error"),
    "jpeg_bomb_15000x15000": (_jpeg_bomb(), "too_large"),
    "gif_bomb": (_gif_bomb(), "too_large"),
    "empty": (b"", "error"),
    "text": (b"hello, not an image", "error"),
}
if features.check("webp"):
    IMAGE_CASES["webp_half"] = (_encoded("WEBP")[:len(_encoded("WEBP")) // 2], "error")
    IMAGE_CASES["webp_header_only"] = (_encoded("WEBP")[:30], "error")


_DECODE_ALL = textwrap.dedent('''
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from balpoe.data.decode import read_rgb, load_pil
    from balpoe.errors import BalpoeError
    out = {}
    for path in sys.argv[1:]:
        for name, read in (("tensor", read_rgb), ("pil", load_pil)):
            try:
                read(path)
                out[path + "|" + name] = "decoded"
            except BalpoeError as e:
                out[path + "|" + name] = "error: " + str(e)
    print(json.dumps(out))
''')


def test_hostile_images_decode_to_one_line_in_a_subprocess(tmp_path):
    """Every file of the corpus through both decode paths (``data.decode: tensor`` / ``pil``, the
    latter also what ``balpoe predict`` uses) in one child process: it must not crash (torchvision's
    libpng decoder ends the process with SIGSEGV on several of them), and each file is either
    decoded or a one-line error naming it (the bombs naming their size)."""
    paths = []
    for name, (data, _) in IMAGE_CASES.items():
        p = tmp_path / f"{name}.{name.split('_')[0].replace('empty', 'png').replace('text', 'jpg')}"
        p.write_bytes(data)
        paths.append(p)
    r = subprocess.run([sys.executable, "-c", _DECODE_ALL, *map(str, paths)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # a negative code is a crash signal
    assert "Traceback" not in r.stderr
    got = json.loads(r.stdout)
    for p, (name, (_, expect)) in zip(paths, IMAGE_CASES.items()):
        for how in ("tensor", "pil"):
            res = got[f"{p}|{how}"]
            if expect == "decoded":
                assert res == "decoded", (name, how, res)
            elif expect == "decoded_or_error":
                assert res == "decoded" or str(p) in res, (name, how, res)
            else:
                assert res.startswith("error: ") and str(p) in res and "\n" not in res, (name, how, res)
            if expect == "too_large":
                assert f"more than the limit of {Image.MAX_IMAGE_PIXELS:,} (PIL's Image.MAX_IMAGE_PIXELS" in res, res
    # PIL alone only warns between its limit and twice that: here 100 M pixels are refused too
    assert "is 10000 x 10000 pixels (100,000,000)" in got[f"{tmp_path / 'png_header_bomb_10000x10000.png'}|tensor"]
    assert "is 225,000,000 pixels" in got[f"{tmp_path / 'jpeg_bomb_15000x15000.jpeg'}|tensor"]


def _adam7_png(a: np.ndarray, passes: int = 7) -> bytes:
    """An interlaced 8-bit grey PNG of ``a`` holding the first ``passes`` Adam7 passes (ISO/IEC 15948,
    8.2), its zlib stream complete either way."""
    starts = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    data = b"".join(b"\x00" + a[y, x0::dx].tobytes() for x0, y0, dx, dy in starts[:passes]
                    for y in range(y0, a.shape[0], dy) if a[y, x0::dx].size)
    return (SIG + _chunk(b"IHDR", struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 0, 0, 0, 1))
            + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (9, 13), (16, 16)])
def test_png_rows_missing_counts_the_pixels_a_clean_stream_does_not_reach(size, tmp_path):
    """A PNG whose zlib stream ends cleanly early decodes in PIL with black rows and no word; the
    stream length the header fixes finds it, interlaced or not, and a complete file is untouched."""
    h, w = size
    a = (np.arange(h * w).reshape(h, w) % 200 + 20).astype(np.uint8)
    assert png_rows_missing(_adam7_png(a)) == 0
    p = tmp_path / "a.png"
    p.write_bytes(_adam7_png(a))
    assert torch.equal(read_rgb(p), torch.from_numpy(a).expand(3, h, w))  # our Adam7 writer is PIL's reader's
    # without pass 7 (the odd rows, every column), which PIL would leave black: h // 2 rows of w pixels
    if h > 1:
        p.write_bytes(_adam7_png(a, passes=6))
        assert png_rows_missing(p.read_bytes()) == (h // 2) * w
        with pytest.raises(BalpoeError, match=f"its PNG pixel data end early \\({(h // 2) * w:,} of {h * w:,} pixels"):
            read_rgb(p)
    # not interlaced, the last k rows short: k rows of w pixels
    for k in range(1, h):
        assert png_rows_missing(_png(w, h, rows=h - k, depth=8, colour=0)) == k * w


def test_pixel_limit_is_pils_value_on_every_path(tmp_path, monkeypatch):
    """One limit: PIL's ``Image.MAX_IMAGE_PIXELS``, read when a file is opened (here lowered)."""
    p = tmp_path / "x.jpg"
    p.write_bytes(_encoded("JPEG", (40, 30)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for how in ("tensor", "pil"):
        with pytest.raises(BalpoeError, match=r"is 40 x 30 pixels \(1,200\), more than the limit of 1,000"):
            read_rgb(p) if how == "tensor" else load_pil(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    assert tuple(read_rgb(p).shape) == (3, 30, 40)


def _folder(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.parametrize("case,workers", [("png_no_rows", 0), ("png_no_rows", 2), ("png_bad_filter_byte", 0),
                                          ("jpeg_bomb_15000x15000", 0), ("png_header_bomb_20000x20000", 2),
                                          ("jpeg_header_only", 0)])
def test_hostile_image_in_a_training_folder(case, workers, tmp_path, recipe_file, capsys):
    """One bad image among good ones: one line naming it, also from DataLoader worker processes
    (no "Original Traceback"); the run stops (exit 2) rather than train on a different data set."""
    root = _folder(tmp_path / "train", {"a": 6, "b": 4})
    bad = root / "b" / "zz_bad.png"
    bad.write_bytes(IMAGE_CASES[case][0])
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", recipe_file, "--set", "data.dataset=image_folder", "--set",
                      f"data.train_root={root}", "--set", "data.test_fraction=0.3", "--set",
                      f"data.num_workers={workers}", "--set", "data.decode=tensor", "--out", out, "--no-progress")
    line = _one_error(rc, err, str(bad))
    assert "Original Traceback" not in err and "DataLoader worker" not in line
    if "bomb" in case:
        assert "more than the limit" in line


@pytest.mark.parametrize("case", ["png_15_of_16_rows", "png_bad_filter_byte", "jpeg_header_only"])
def test_damaged_test_image_is_found_before_training(case, tmp_path, recipe_file, capsys):
    """A test image whose header is valid but whose pixel data are damaged: one line naming it before
    the run folder exists (the test split is decoded in full first), not after the training."""
    root = _folder(tmp_path / "train", {"a": 6, "b": 4})
    test = _folder(tmp_path / "test", {"a": 3, "b": 3}, seed=2)
    bad = test / "b" / "1_bad.png"
    bad.write_bytes(IMAGE_CASES[case][0])
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", recipe_file, "--set", "data.dataset=image_folder", "--set",
                      f"data.train_root={root}", "--set", f"data.test_root={test}", "--set", "data.num_workers=0",
                      "--set", "data.in_memory=false", "--out", out, "--no-progress")
    _one_error(rc, err, str(bad))
    assert not out.exists()


@pytest.fixture(scope="module")
def folder_ckpt(tmp_path_factory) -> Path:
    """A tiny model trained on an 8x8 image folder (two classes)."""
    home = tmp_path_factory.mktemp("folder_model")
    root = _folder(home / "train", {"a": 6, "b": 4})
    recipe = recipe_from_dict({
        "name": "folder", "seed": 0,
        "data": {"dataset": "image_folder", "train_root": str(root), "test_fraction": 0.3, "num_workers": 0,
                 "image_size": 8},
        "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1", "kwargs": {"widths": [4, 8, 8]}},
        "loss": {"tau": [0.5, 1.5]}, "optim": {"lr": 0.05, "batch_size": 4, "epochs": 1, "warmup_epochs": 0},
        "train": {"eval_batch_size": 4}})
    train(recipe, home / "run", show_progress=False, report=False)
    return home / "run" / "last.pt"


@pytest.mark.parametrize("case", ["png_broken_zlib", "gif_bomb"])
def test_hostile_image_in_eval(case, folder_ckpt, tmp_path, capsys):
    test = _folder(tmp_path / "test", {"a": 2, "b": 2}, seed=3)
    bad = test / "a" / "bad.png"
    bad.write_bytes(IMAGE_CASES[case][0])
    out = tmp_path / "o" / "eval.json"
    rc, _, err = _cli(capsys, "eval", folder_ckpt, "--set", "data.test_fraction=0", "--set",
                      f"data.test_root={test}", "--out", out, "--no-report")
    _one_error(rc, err, str(bad))
    assert not out.exists()


def test_hostile_images_in_predict_are_one_warning_each(folder_ckpt, tmp_path, capsys):
    """``balpoe predict`` serves any files it is given: each unreadable one is one warning line (its
    row gets the error), the others are predicted; only bad files: one error line."""
    names = ["png_no_rows", "png_bad_filter_byte", "jpeg_bomb_15000x15000", "png_header_bomb_20000x20000", "text"]
    folder = _folder(tmp_path / "in", {"x": 2})
    for n in names:
        (folder / "x" / f"{n}.png").write_bytes(IMAGE_CASES[n][0])
    out = tmp_path / "p.jsonl"
    rc, _, err = _cli(capsys, "predict", folder_ckpt, folder, "--out", out, "--device", "cpu")
    assert rc == 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(lines) == len(names) and "error:" not in err, err
    for n in names:
        assert sum(f"{n}.png" in line for line in lines) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum("error" in r for r in rows) == len(names) and len(rows) == len(names) + 2
    assert any("more than the limit" in r.get("error", "") for r in rows)

    only_bad = tmp_path / "bad.png"
    only_bad.write_bytes(IMAGE_CASES["png_no_rows"][0])
    rc, _, err = _cli(capsys, "predict", folder_ckpt, only_bad, "--out", tmp_path / "q.jsonl")
    assert rc == 2 and err.strip().splitlines()[-1] == "error: no input image could be read (1 tried)"
    assert not (tmp_path / "q.jsonl").exists()


def test_fifo_named_like_an_image_does_not_hang(tmp_path):
    """A FIFO opened for reading would wait for a writer for ever: it is not a regular file."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(BalpoeError, match="not a regular file"):
        read_rgb(fifo)
    root = _folder(tmp_path / "f", {"a": 2})
    os.mkfifo(root / "a" / "pipe.png")
    assert len(folder_split(root, "data.train_root").paths) == 2


# ------------------------------------------------------------------------------------------------
# List files and folders

LIST_CASES = {
    "label_1e9": ("a/0.jpg 1000000000", ":1: label '1000000000' is not a class number below 1,000,000"),
    "label_23_digits": ("a/0.jpg 12345678901234567890123", ":1: label '12345678901234567890123' is not a class"),
    "label_superscript_two": ("a/0.jpg \u00b2", ":1: expected '<relative/path> <label>' with the label in digits"),
    "label_arabic_indic_three": ("a/0.jpg \u0663", ":1: expected"),
    "label_negative": ("a/0.jpg -1", ":1: expected"),
    "label_float": ("a/0.jpg 1.0", ":1: expected"),
    "no_label": ("a/0.jpg", ":1: expected"),
}


@pytest.mark.parametrize("case", sorted(LIST_CASES))
def test_hostile_list_file_labels(case, tmp_path, recipe_file, capsys):
    root = _folder(tmp_path / "img", {"a": 2})
    lst = tmp_path / "train.txt"
    text, expect = LIST_CASES[case]
    lst.write_text("a/1.png 0\n\n" + text + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "train", recipe_file, "--set", "data.dataset=image_list", "--set", f"data.root={root}",
                      "--set", f"data.train_list={lst}", "--set", "data.test_fraction=0.5", "--out", out,
                      "--no-progress")
    _one_error(rc, err, f"{lst}{expect.replace(':1:', ':3:')}")
    assert _empty(out)


def test_symlink_loop_in_a_class_folder_counts_each_image_once(tmp_path, recipe_file, capsys):
    root = _folder(tmp_path / "train", {"a": 4, "b": 3})
    os.symlink("..", root / "a" / "up")        # a loop: a/up/a/up/...
    os.symlink(".", root / "b" / "self")       # a loop to itself
    os.symlink(str(root / "b"), root / "a" / "b_again")  # another class's folder: followed once
    split = folder_split(root, "data.train_root")
    assert np.bincount(split.labels).tolist() == [4 + 3, 3]
    assert len({os.path.realpath(p) for p in split.paths if "/a/" in str(p)}) == 7


# ------------------------------------------------------------------------------------------------
# The run report at iNaturalist's number of classes

_REPORT_UNDER_LIMIT = textwrap.dedent('''
    import resource, sys
    from balpoe.cli import main
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    extra = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))
    sys.exit(main(["report", sys.argv[1]]))
''')


def test_report_of_8142_classes_within_a_memory_limit(tmp_path):
    """``balpoe report`` on an 8,142-class run (iNaturalist 2018) in a child process whose address
    space may grow by 1 GiB past what importing balpoe (and torch) took: the confusion matrix is
    read from its nonzero cells (``confusion_entries``) and drawn in blocks with a table of the
    largest confusions; the training counts are one outline, not 8,142 bars."""
    K, rng = 8142, np.random.default_rng(0)
    labels = np.repeat(np.arange(K), 3)
    pred = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, K, len(labels)))
    pred[:5] = 17  # class 0's three images and two of class 1's go to class 17: the top confusions
    cells, n = np.unique(labels * K + pred, return_counts=True)
    acc = rng.uniform(0, 100, size=(3, K)).round(1).tolist()
    analysis = {"class_names": [f"species_{i:05d}" for i in range(K)],
                "class_counts": np.maximum(2, np.round(1000 * 0.002 ** (np.arange(K) / (K - 1)))).astype(int).tolist(),
                "many_threshold": 100, "few_threshold": 20, "taus": [0, 2],
                "per_class_acc": {"ensemble": acc[0], "experts": acc[1:]}, "confusion": None,
                "confusion_entries": [[int(c) // K, int(c) % K, int(m)] for c, m in zip(cells, n)]}
    run = tmp_path / "inat"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"acc": 60.0, "ece": 3.0, "nll": 1.5, "n": len(labels),
                                               "expert_acc": [55.0, 58.0], "analysis": analysis}, indent=2))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "inat", "data": {"dataset": "inat"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0, "lr": 0.1, "img_per_s": 9.0}) + "\n")
    r = subprocess.run([sys.executable, "-c", _REPORT_UNDER_LIMIT, str(run), str(2 ** 30)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    page = (run / "report.html").read_text()
    assert "species_00000</td><td>species_00017</td><td class=\"num\">3</td><td class=\"num\">100.0" in page
    assert "The 20 most frequent confusions" in page and "block of 41 consecutive classes" in page
    assert page.count("<td>species_") >= K  # the folded per-class table keeps every class


def test_report_reads_dense_and_sparse_confusions_alike(tmp_path):
    """The dense matrix (older eval.json files, and up to 1000 classes) and its nonzero cells give
    the same blocks and the same top confusions."""
    from balpoe.evaluate.run_report import report_sections
    K, rng = 450, np.random.default_rng(1)
    m = rng.poisson(0.05, size=(K, K)) + np.eye(K, dtype=int) * 5
    i, j = np.nonzero(m)
    base = {"class_names": [f"c{k}" for k in range(K)], "class_counts": rng.integers(1, 500, K).tolist(),
            "many_threshold": 100, "few_threshold": 20,
            "per_class_acc": {"ensemble": [50.0] * K, "experts": []}}
    sections = []
    entries = [[a, b, int(m[a, b])] for a, b in zip(i.tolist(), j.tolist())]
    for name, extra in (("dense", {"confusion": m.tolist()}),
                        ("sparse", {"confusion": None, "confusion_entries": entries})):
        run = tmp_path / name
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({"acc": 50.0, "analysis": {**base, **extra}}))
        (run / "recipe.yaml").write_text("name: r\n")
        sections.append(report_sections(run)["confusion"])
    dense, sparse = sections
    assert dense["block"] == sparse["block"] == 3
    assert np.allclose(dense["cells"], sparse["cells"]) and dense["top"] == sparse["top"]
    off = m - np.diag(np.diag(m))
    assert dense["top"][0]["count"] == off.max()

