#!/usr/bin/env python
# input_pipeline.py -- images per second per CPU core of the image-file input pipeline at ImageNet-LT /
# iNaturalist scale: decode only (PIL vs torchvision), the standard training pipeline (PIL + v1
# transforms vs uint8 tensors + transforms.v2) and the long-regime RandAugment pipeline (PIL vs a
# tensor crop handed to PIL), batched GPU decoding where CUDA is present, and how many CPU cores one
# GPU needs to stay fed.
# How: a cached folder of synthetic ImageNet-like JPEGs (default 2,000 of 500 x 375, quality 90,
# textured so that files are 43-99 kB, mean 75 kB); 1 process, torch.set_num_threads(1), no DataLoader
# workers; every pipeline runs over every image once per round, rounds interleaved, the median round
# reported as images per CPU-second (time.process_time: the per-core rate, robust to other load) and
# per wall-second; pixel agreement of the tensor paths with PIL for identical crop parameters; with
# --workers, CPU time per image through a DataLoader (workers' IPC included).
# Result (2 shared AMD EPYC cores, load average 9.0 -> 8.7; benchmarks/README.md): per core, PIL 482 vs
# read_rgb + tensor_transform 651 img/s (1.35x) for the standard pipeline, 369 vs 407 (1.11x) with
# RandAugment, same random draws; decode alone 1.12x.
# Command (the figures in benchmarks/README.md):
#   python benchmarks/input_pipeline.py --workers 2 --json runs/input_pipeline/results.json
# Command (smoke size, about 10 s): python benchmarks/input_pipeline.py --quick --cache /tmp/ip --json /tmp/ip/r.json
"""Input-pipeline speed for image-file datasets (ImageNet-LT, iNaturalist 2018, Places-LT).

    python benchmarks/input_pipeline.py                          # 2,000 JPEGs, 3 rounds
    python benchmarks/input_pipeline.py --workers 1 2 4          # + DataLoader scaling
    python benchmarks/input_pipeline.py --gpu-rate 2400          # cores per GPU for a measured GPU rate
    python benchmarks/input_pipeline.py --quick                  # 20 small images, 1 round (smoke)

Pipelines (every one from the file path to the float ``[3, 224, 224]`` the model sees):

* **decode**: ``PIL.Image.open(p).convert("RGB")``; ``torchvision.io.decode_jpeg(read_file(p))``;
  ``torchvision.io.decode_image(read_file(p))`` (both ``ImageReadMode.RGB``); the library's
  :func:`balpoe.data.decode.read_rgb`.
* **standard** (the official BalPoE ImageNet-LT / iNaturalist loaders): ``RandomResizedCrop(224)``
  + ``RandomHorizontalFlip`` + ``ColorJitter(0.4, 0.4, 0.4, 0)`` + ``ToTensor`` + ``Normalize``:
  PIL decode + v1 transforms; tensor decode + :func:`balpoe.data.decode.tensor_transform` (the
  v2 twins, every op on uint8, then float); tensor decode + v2 with the jitter on float.
* **randaugment** (the long regime, PaCo / BalPoE ``randncls``): the standard ops + timm's
  ``rand_augment_transform('rand-n2-m10-mstd0.5', {'img_mean': (124, 116, 104), 'translate_pct':
  0.45})`` before ``ToTensor``: PIL decode; tensor decode converted to PIL at full size; tensor
  decode + crop / flip on the tensor, then ``to_pil_image`` of the 224 x 224 crop (the library's
  ``tensor_transform``).
* **gpu** (CUDA only): ``decode_jpeg(list_of_bytes, device="cuda")`` in batches, then per-image
  ``RandomResizedCrop`` + flip on the device, ``uint8 -> float``, ``Normalize``.

Agreement (``--agree N`` images): decoded pixels, the resize alone (PIL ``resize(BILINEAR)`` vs v2
``antialias=True`` on uint8, same crop box), and whole pipelines run from the same torch / Python /
numpy seeds (the random-generator state afterwards must be the same: the same draws), in uint8
levels.  CPU cores per GPU = ``--gpu-rate`` / the per-core rate.  Synthetic images: the content is
not ImageNet's, only the sizes are like it; decode time depends on pixels and file size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from rich.console import Console
from rich.table import Table
from timm.data import rand_augment_transform
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

from balpoe.runtime.device import cpu_name
from balpoe.data.decode import read_rgb, tensor_transform
from balpoe.errors import BalpoeError, run_reporting_errors

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RANDAUGMENT = "rand-n2-m10-mstd0.5"
RA_HPARAMS = {"img_mean": (124, 116, 104), "translate_pct": 0.45}
#: bump when the synthetic images change (the cache is rewritten)
SYNTH_VERSION = 1
DEFAULT_GPU_RATE = 1500.0


# ------------------------------------------------------------------------------------------------
# Synthetic ImageNet-like JPEGs


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A textured RGB image whose JPEG size is like a photograph's: 1/f-like multi-octave noise
    (luminance-dominated), a few flat shapes with edges, a slight blur and film grain of a random
    strength (quality 90, 500 x 375: about 45-100 kB)."""
    out = np.zeros((height, width, 3), np.float32)
    for cells in (3, 6, 12, 24, 48, 96):
        shape = (max(2, cells * height // width), cells)
        lum = rng.normal(size=shape + (1,))
        small = (lum + 0.4 * rng.normal(size=shape + (3,))).astype(np.float32)
        lo, hi = float(small.min()), float(small.max())
        u8 = ((small - lo) / (hi - lo + 1e-6) * 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(u8).resize((width, height), Image.BICUBIC), np.float32)
        out += (up / 255 * (hi - lo) + lo) * (90.0 / cells ** 0.55)
    out += rng.uniform(40, 200, size=3).astype(np.float32)
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        else:
            draw.polygon([(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))],
                         fill=fill)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), np.float32) + 0.25 * (out - out.mean())
    grain = float(rng.uniform(4, 16))
    arr += rng.normal(scale=grain, size=(height, width, 1)).astype(np.float32)
    arr += rng.normal(scale=grain / 2, size=arr.shape).astype(np.float32)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_jpegs(folder: Path, count: int, width: int, height: int, quality: int, seed: int = 0) -> list[Path]:
    """``count`` synthetic JPEGs in ``folder`` (``img_00000.jpg``, ...), reused when ``manifest.json``
    says they were written with the same settings; returns their paths."""
    folder = Path(folder)
    want = {"version": SYNTH_VERSION, "count": count, "width": width, "height": height, "quality": quality,
            "seed": seed}
    paths = [folder / f"img_{i:05d}.jpg" for i in range(count)]
    manifest = folder / "manifest.json"
    try:
        if json.loads(manifest.read_text()) == want and all(p.is_file() for p in paths):
            return paths
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for p in paths:
        synthetic_photo(rng, width, height).save(p, "JPEG", quality=quality)
    manifest.write_text(json.dumps(want))
    return paths


# ------------------------------------------------------------------------------------------------
# Pipelines


def pil_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def standard_v1(size: int = 224) -> T.Compose:
    """The official BalPoE ImageNet-LT / iNaturalist training transform (torchvision v1, PIL)."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                      T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def randaugment_v1(size: int = 224) -> T.Compose:
    """The long-regime transform: the standard ops + timm RandAugment before ``ToTensor``."""
    ops = standard_v1(size).transforms
    return T.Compose(ops[:3] + [rand_augment_transform(RANDAUGMENT, dict(RA_HPARAMS))] + ops[3:])


def standard_v2_float_jitter(size: int = 224) -> v2.Compose:
    """``transforms.v2``: crop and flip on uint8, then to float and the jitter on float (the
    alternative to the library's all-uint8 ``tensor_transform``)."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0),
                       v2.Normalize(MEAN, STD)])


class Case(NamedTuple):
    group: str
    name: str
    fn: Callable
    baseline: bool = False


def cases(size: int) -> list[Case]:
    std_v1, ra_v1 = standard_v1(size), randaugment_v1(size)
    std_tensor, ra_tensor, std_f = tensor_transform(std_v1), tensor_transform(ra_v1), standard_v2_float_jitter(size)
    rgb = ImageReadMode.RGB
    return [
        Case("decode", "PIL open + convert('RGB')", pil_rgb, True),
        Case("decode", "torchvision decode_jpeg(read_file)", lambda p: decode_jpeg(read_file(str(p)), mode=rgb)),
        Case("decode", "torchvision decode_image(read_file)", lambda p: decode_image(read_file(str(p)), mode=rgb)),
        Case("decode", "balpoe read_rgb", read_rgb),
        Case("standard", "PIL + v1 transforms", lambda p: std_v1(pil_rgb(p)), True),
        Case("standard", "read_rgb + v2 twins on uint8 (balpoe tensor_transform)", lambda p: std_tensor(read_rgb(p))),
        Case("standard", "read_rgb + v2, crop on uint8, jitter on float", lambda p: std_f(read_rgb(p))),
        Case("randaugment", "PIL + v1 + RandAugment", lambda p: ra_v1(pil_rgb(p)), True),
        Case("randaugment", "read_rgb -> PIL at full size + v1 + RandAugment",
             lambda p: ra_v1(F2.to_pil_image(read_rgb(p)))),
        Case("randaugment", "read_rgb + crop/flip on tensor -> PIL + RandAugment (balpoe tensor_transform)",
             lambda p: ra_tensor(read_rgb(p))),
    ]


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def time_cases(all_cases: list[Case], paths: list[Path], rounds: int) -> dict[str, dict]:
    """Each case over every path, ``rounds`` times, interleaved; per case the median round's images
    per CPU-second and per wall-second."""
    for c in all_cases:  # warm-up: page cache, lazy initialisation, allocator
        for p in paths[:3]:
            c.fn(p)
    res: dict[str, dict] = {c.name: {"group": c.group, "cpu_s": [], "wall_s": []} for c in all_cases}
    for r in range(rounds):
        for c in all_cases:
            seed_all(r)
            c0, w0 = time.process_time(), time.perf_counter()
            for p in paths:
                c.fn(p)
            res[c.name]["cpu_s"].append(time.process_time() - c0)
            res[c.name]["wall_s"].append(time.perf_counter() - w0)
    n = len(paths)
    for c in all_cases:
        d = res[c.name]
        d["images"] = n
        d["per_core_img_s"] = n / statistics.median(d["cpu_s"])
        d["wall_img_s"] = n / statistics.median(d["wall_s"])
        d["ms_per_image_cpu"] = 1000 / d["per_core_img_s"]
        d["baseline"] = c.baseline
    for group in {c.group for c in all_cases}:
        base = next(c for c in all_cases if c.group == group and c.baseline)
        for c in all_cases:
            if c.group == group:
                res[c.name]["speedup_vs_pil"] = res[c.name]["per_core_img_s"] / res[base.name]["per_core_img_s"]
    return res


# ------------------------------------------------------------------------------------------------
# Pixel agreement


def _levels(x: torch.Tensor) -> torch.Tensor:
    """A normalised float image back in uint8 levels (0..255 scale)."""
    return x * torch.tensor(STD).view(3, 1, 1) * 255


def _stats(diffs: list[torch.Tensor]) -> dict:
    d = torch.cat([x.flatten().double() for x in diffs])
    return {"mean_abs": float(d.mean()), "p99_abs": float(d.quantile(0.99)) if d.numel() <= 16_000_000 else None,
            "max_abs": float(d.max()), "share_nonzero": float((d > 0.5).double().mean())}


def agreement(paths: list[Path], size: int, seed: int = 0) -> dict:
    """Tensor paths vs PIL on the same images, in uint8 levels.

    * ``decode``: ``read_rgb`` vs PIL ``convert("RGB")``;
    * ``resize``: the same ``RandomResizedCrop`` box, PIL ``crop().resize(BILINEAR)`` vs v2
      ``resized_crop`` on uint8 with ``antialias=True`` (same source pixels);
    * ``standard_*`` / ``randaugment``: the whole pipelines from the same seeds; ``same_draws`` is
      whether torch's generator state afterwards is the same (the same number of draws in the same
      order: the same crop box, flip and jitter factors)."""
    std_v1, ra_v1 = standard_v1(size), randaugment_v1(size)
    std_tensor, ra_tensor, std_f = tensor_transform(std_v1), tensor_transform(ra_v1), standard_v2_float_jitter(size)
    out: dict = {"images": len(paths)}
    dec, rsz, full_f, full_u8, ra = [], [], [], [], []
    same = {"standard_uint8_jitter": True, "standard_float_jitter": True, "randaugment": True}
    for i, p in enumerate(paths):
        pil, t = pil_rgb(p), read_rgb(p)
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        dec.append((t.int() - ref.int()).abs())
        seed_all(seed + i)
        top, left, h, w = T.RandomResizedCrop.get_params(pil, (0.08, 1.0), (3 / 4, 4 / 3))
        a = torch.from_numpy(np.array(pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)))
        b = F2.resized_crop(t, top, left, h, w, [size, size], antialias=True).permute(1, 2, 0)
        rsz.append((a.int() - b.int()).abs())
        for name, tf, bucket in (("standard_uint8_jitter", std_tensor, full_u8),
                                 ("standard_float_jitter", std_f, full_f), ("randaugment", ra_tensor, ra)):
            ref_tf = ra_v1 if name == "randaugment" else std_v1
            seed_all(seed + i)
            x = ref_tf(pil)
            state = torch.get_rng_state()
            seed_all(seed + i)
            y = tf(t)
            same[name] &= bool(torch.equal(state, torch.get_rng_state()))
            bucket.append((_levels(x) - _levels(y)).abs())
    out["decode"] = _stats(dec)
    out["resize"] = _stats(rsz)
    for name, bucket in (("standard_uint8_jitter", full_u8), ("standard_float_jitter", full_f), ("randaugment", ra)):
        out[name] = {**_stats(bucket), "same_draws": same[name]}
    return out


# ------------------------------------------------------------------------------------------------
# DataLoader scaling and GPU decoding


class PathDataset(torch.utils.data.Dataset):
    def __init__(self, paths, fn):
        self.paths, self.fn = list(paths), fn

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.fn(self.paths[i])


def _one_thread(_):
    torch.set_num_threads(1)


def loader_rates(all_cases: list[Case], paths: list[Path], workers: list[int], batch_size: int) -> list[dict]:
    """Images per wall-second through a ``DataLoader`` with N workers (1 thread each) for the PIL and
    the library's tensor pipelines (after the first batch), and CPU seconds of the main process + the
    reaped workers for all the images (worker start-up, collation and the shared-memory hand-off
    included)."""
    rows = []
    picks = [c for c in all_cases if c.group in ("standard", "randaugment") and (c.baseline or "balpoe" in c.name)]
    for c in picks:
        for n in workers:
            seed_all(0)
            loader = torch.utils.data.DataLoader(PathDataset(paths, c.fn), batch_size=batch_size, shuffle=False,
                                                 num_workers=n, worker_init_fn=_one_thread if n else None)
            ru0, c0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
            it = iter(loader)
            next(it)  # worker start-up and the first batch are not timed
            w0, count = time.perf_counter(), 0
            for x in it:
                count += len(x)
            wall = time.perf_counter() - w0
            del it
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = time.process_time() - c0 + (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            rows.append({"group": c.group, "pipeline": c.name, "workers": n, "images_timed": count,
                         "wall_img_s": count / wall if count and wall > 0 else float("nan"), "cpu_s_all_images": cpu,
                         "cpu_ms_per_image": 1000 * cpu / len(paths)})
    return rows


def gpu_pipeline(datas: list[torch.Tensor], device: str, batch_size: int, size: int,
                 crops: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Batched ``decode_jpeg(list, device=...)``; with ``crops``, per-image ``RandomResizedCrop``
    (v1 ``get_params``: the same box distribution) + flip on the device, stacked, to float,
    normalised.  Returns the last batch (the decoded list without ``crops``)."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    x = None
    for i in range(0, len(datas), batch_size):
        imgs = decode_jpeg(datas[i:i + batch_size], mode=ImageReadMode.RGB, device=device)
        if not crops:
            x = imgs
            continue
        out = torch.empty(len(imgs), 3, size, size, dtype=torch.uint8, device=device)
        for k, img in enumerate(imgs):
            top, left, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
            crop = F2.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            out[k] = crop.flip(-1) if torch.rand(1) < 0.5 else crop
        x = out.float().div_(255).sub_(mean).div_(std)
    return x


def gpu_rates(paths: list[Path], batch_size: int, size: int, rounds: int) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "torch.cuda.is_available() is False"}
    datas = [read_file(str(p)) for p in paths]
    res: dict = {"device": torch.cuda.get_device_name(), "batch_size": batch_size, "images": len(datas)}
    for name, crops in (("decode_only", False), ("decode_crop_flip_normalize", True)):
        gpu_pipeline(datas[:batch_size], "cuda", batch_size, size, crops)  # nvjpeg initialisation, allocator
        torch.cuda.synchronize()
        walls = []
        for r in range(rounds):
            seed_all(r)
            torch.cuda.synchronize()
            w0 = time.perf_counter()
            gpu_pipeline(datas, "cuda", batch_size, size, crops)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - w0)
        res[name] = {"img_s": len(datas) / statistics.median(walls), "wall_s": walls}
    return res


# ------------------------------------------------------------------------------------------------
# Report


def cores_needed(rates: dict[str, dict], gpu_rate: float, loader_rows: list[dict]) -> dict[str, dict]:
    """CPU cores to feed ``gpu_rate`` images/s: from the per-core rate of the pipeline alone, and
    (where measured) from the CPU time per image through a DataLoader with the most workers
    measured (worker processes, collation and the shared-memory hand-off included)."""
    out = {}
    for name, d in rates.items():
        if d["group"] == "decode":
            continue
        out[name] = {"pipeline_only": gpu_rate / d["per_core_img_s"]}
        rows = [r for r in loader_rows if r["pipeline"] == name and r["workers"] > 0]
        if rows:
            r = max(rows, key=lambda r: r["workers"])
            out[name].update(with_dataloader=gpu_rate * r["cpu_ms_per_image"] / 1000, dataloader_workers=r["workers"])
    return out


def report(console: Console, res: dict) -> None:
    meta = res["meta"]
    console.print(f"[bold]Input pipeline, per CPU core[/bold]: {meta['images']} synthetic JPEGs {meta['width']}x"
                  f"{meta['height']} q{meta['quality']} (mean {meta['mean_kb']:.0f} kB, {meta['min_kb']:.0f}-"
                  f"{meta['max_kb']:.0f}), {meta['rounds']} rounds (median), 1 process, 1 thread; {meta['cpu']} "
                  f"({meta['nproc']} cores), load average {meta['loadavg_start'][0]:.2f} -> "
                  f"{meta['loadavg_end'][0]:.2f} (1 min)")
    t = Table(title="images/s per core (CPU time) and per wall-second")
    for col in ("group", "pipeline", "img/s per core", "ms/img (CPU)", "wall img/s", "x PIL"):
        t.add_column(col, justify="left" if col in ("group", "pipeline") else "right")
    for name, d in res["rates"].items():
        t.add_row(d["group"], name, f"{d['per_core_img_s']:.0f}", f"{d['ms_per_image_cpu']:.2f}",
                  f"{d['wall_img_s']:.0f}", f"{d['speedup_vs_pil']:.2f}")
    console.print(t)
    ag = res.get("agreement")
    if ag:
        t = Table(title=f"tensor path vs PIL, uint8 levels ({ag['images']} images, same crop box / seeds)")
        for col in ("what", "mean |diff|", "p99", "max", "pixels differing", "same draws"):
            t.add_column(col, justify="left" if col == "what" else "right")
        for k in ("decode", "resize", "standard_uint8_jitter", "standard_float_jitter", "randaugment"):
            d = ag[k]
            t.add_row(k, f"{d['mean_abs']:.3f}", "-" if d["p99_abs"] is None else f"{d['p99_abs']:.2f}",
                      f"{d['max_abs']:.2f}", f"{100 * d['share_nonzero']:.1f}%", str(d.get("same_draws", "-")))
        console.print(t)
    if res.get("dataloader"):
        t = Table(title="DataLoader (wall img/s; shared machine: scaling is bounded by the free cores)")
        for col in ("pipeline", "workers", "wall img/s", "CPU s (all procs)", "CPU ms/img"):
            t.add_column(col, justify="left" if col == "pipeline" else "right")
        for r in res["dataloader"]:
            t.add_row(r["pipeline"], str(r["workers"]), f"{r['wall_img_s']:.0f}", f"{r['cpu_s_all_images']:.1f}",
                      f"{r['cpu_ms_per_image']:.2f}")
        console.print(t)
    g = res["gpu"]
    if "skipped" in g:
        console.print(f"GPU decoding: skipped ({g['skipped']})")
    else:
        console.print(f"GPU decoding on {g['device']} (batch {g['batch_size']}): decode only "
                      f"{g['decode_only']['img_s']:.0f} img/s; decode + crop/flip + normalise "
                      f"{g['decode_crop_flip_normalize']['img_s']:.0f} img/s")
    t = Table(title=f"CPU cores one GPU needs at {res['gpu_rate']:.0f} img/s (--gpu-rate; an assumption unless "
                    "measured with benchmarks/speed.py)")
    for col in ("pipeline", "cores (pipeline only)", "cores (with DataLoader)"):
        t.add_column(col, justify="left" if col == "pipeline" else "right")
    for name, n in res["cores_per_gpu"].items():
        dl = f"{n['with_dataloader']:.1f} ({n['dataloader_workers']} workers)" if "with_dataloader" in n else "-"
        t.add_row(name, f"{n['pipeline_only']:.1f}", dl)
    console.print(t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache", default=str(REPO / "runs/input_pipeline/jpegs"),
                    help="folder of the synthetic JPEGs (written once, reused)")
    ap.add_argument("--count", type=int, default=2000, help="synthetic images (all are timed)")
    ap.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--crop", type=int, default=224, help="training crop size")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per pipeline (median reported)")
    ap.add_argument("--only", nargs="+", choices=("decode", "standard", "randaugment"),
                    default=("decode", "standard", "randaugment"))
    ap.add_argument("--agree", type=int, default=100, help="images of the pixel-agreement check (0: skip)")
    ap.add_argument("--workers", type=int, nargs="*", default=[],
                    help="also time a DataLoader with these worker counts (e.g. 1 2 4)")
    ap.add_argument("--batch-size", type=int, default=64, help="DataLoader / GPU decode batch size")
    ap.add_argument("--no-gpu", action="store_true", help="skip the CUDA decode even where CUDA is available")
    ap.add_argument("--gpu-rate", type=float, default=DEFAULT_GPU_RATE,
                    help="training images/s of ONE GPU to feed. The default is an ASSUMPTION (a ResNet-50 BalPoE "
                         "step on an H100 in bf16); replace it with the img/s benchmarks/speed.py measures for your "
                         "recipe and GPU")
    ap.add_argument("--quick", action="store_true",
                    help="smoke size: 20 images of 160x120, crop 64, 1 round, 8 agreement images, batches of 4 "
                         "(default cache runs/input_pipeline/jpegs_quick)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.count, args.size, args.crop, args.rounds, args.agree = 20, (160, 120), 64, 1, min(args.agree, 8)
        args.batch_size = min(args.batch_size, 4)
        if args.cache == ap.get_default("cache"):
            args.cache = str(REPO / "runs/input_pipeline/jpegs_quick")
    if args.count < 1 or args.rounds < 1:
        raise BalpoeError("--count and --rounds must be at least 1")
    torch.set_num_threads(1)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    load0 = os.getloadavg()
    paths = write_jpegs(Path(args.cache), args.count, args.size[0], args.size[1], args.quality)
    kb = np.array([p.stat().st_size for p in paths]) / 1000
    all_cases = [c for c in cases(args.crop) if c.group in args.only]
    rates = time_cases(all_cases, paths, args.rounds)
    res: dict = {"meta": {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "images": len(paths), "width": args.size[0], "height": args.size[1], "quality": args.quality,
        "mean_kb": float(kb.mean()), "min_kb": float(kb.min()), "max_kb": float(kb.max()), "crop": args.crop,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "cpu": cpu_name(), "nproc": os.cpu_count(),
        "loadavg_start": list(load0), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "pillow": PIL.__version__,
        "synthetic": "SYNTHETIC textured images: ImageNet-like sizes, not ImageNet content"},
        "rates": rates, "gpu_rate": args.gpu_rate, "gpu_rate_is_assumption": args.gpu_rate == DEFAULT_GPU_RATE}
    if args.agree:
        res["agreement"] = agreement(paths[:args.agree], args.crop)
    res["dataloader"] = loader_rates(all_cases, paths, args.workers, args.batch_size) if args.workers else []
    res["gpu"] = {"skipped": "--no-gpu"} if args.no_gpu else gpu_rates(paths, args.batch_size, args.crop, args.rounds)
    res["cores_per_gpu"] = cores_needed(rates, args.gpu_rate, res["dataloader"])
    res["meta"]["loadavg_end"] = list(os.getloadavg())
    report(console, res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
        console.print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    run_reporting_errors(main)
