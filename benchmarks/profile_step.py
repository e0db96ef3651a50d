# profile_step.py -- where the time of a training step goes: the torch.profiler summary behind
# `speed.py --profile N` (top ops/kernels, time by category, GPU busy fraction, launches per step).
# How: N training steps timed plainly, then the same N steps under torch.profiler; the summary is
# computed from the profiler's key averages.
# Command: python benchmarks/speed.py --synthetic --profile 30 --trace trace.json.gz
"""Profile a few training steps with ``torch.profiler``: where the time of a step goes.

Used by ``speed.py --profile N``.  :func:`profile_steps` runs ``run(N)`` (N training steps)
once untimed-by-the-profiler (the plain wall time of those steps) and once under the profiler,
then summarises:

* **top ops/kernels**: on CUDA the device kernels (and memcpy/memset) by self device time; on
  CPU the operators by self CPU time.  ``pct`` is the share of the summed self time of all
  events of that kind, so the rows' percentages add up to at most 100;
* **where time goes**: the same time grouped by kernel/op-name pattern (convolution/matmul,
  batch norm, optimizer, triton-fused, memcpy/memset, other) -- a name heuristic, not a trace;
* on CUDA, **GPU busy fraction** = summed kernel time / wall time of the profiled steps (also
  against the unprofiled wall time of the same steps), **kernels per step** and CUDA
  **launch calls per step** (``cudaLaunchKernel``-like runtime calls and ``cudaGraphLaunch``).  A
  low busy fraction with many launches per step means the step is latency (launch) bound: the GPU
  waits for the host to launch small kernels.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

#: (category, lower-case name fragments); the first match wins, so the order matters.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("triton (compiled, fused)", ("triton",)),
    ("memcpy / memset", ("memcpy", "memset", "aten::copy_", "aten::_to_copy")),
    ("optimizer (SGD, foreach)", ("multi_tensor", "foreach", "sgd")),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "bn_bwd", "bn_fwd")),
    ("convolution / matmul", ("conv", "gemm", "cutlass", "xmma", "wgmma", "sm80_", "sm90_", "cudnn", "addmm",
                              "aten::mm", "aten::bmm", "winograd", "implicit", "dgrad", "wgrad", "fprop")),
)
OTHER = "elementwise / reduction / other"
LAUNCH_NAMES = ("cudalaunchkernel", "culaunchkernel", "cudalaunchcooperativekernel")
GRAPH_LAUNCH_NAMES = ("cudagraphlaunch", "cugraphlaunch")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def category(name: str) -> str:
    """The :data:`CATEGORIES` bucket of a kernel/op name (a name-pattern heuristic)."""
    low = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return label
    return OTHER


def _is_device_event(evt) -> bool:
    return getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA


def _self_device_us(evt) -> float:
    value = getattr(evt, "self_device_time_total", None)
    if value is None:  # torch < 2.4
        value = getattr(evt, "self_cuda_time_total", 0)
    return float(value)


def profile_steps(run: Callable[[int], None], steps: int, device: torch.device, top: int = 15,
                  trace: str | Path | None = None) -> dict:
    """Time ``run(steps)`` plainly, then profile it; returns the summary dict described above.

    ``trace``: also write a chrome trace there (``.gz``: gzip-compressed)."""
    if steps < 1:
        raise ValueError("profile at least one step")
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    plain_s = time.perf_counter() - start

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        run(steps)
        _sync(device)
        profiled_s = time.perf_counter() - start
    if trace is not None:
        _export_trace(prof, Path(trace))

    return summarise_events(prof.key_averages(), steps, device.type == "cuda", plain_s, profiled_s, top,
                            str(trace) if trace is not None else None)


def summarise_events(events, steps: int, on_cuda: bool, plain_s: float, profiled_s: float, top: int = 15,
                     trace: str | None = None) -> dict:
    """The summary of ``profile_steps`` from ``key_averages()``-like events (``key``, ``count``,
    ``device_type``, ``self_cpu_time_total``, ``self_device_time_total``; times in microseconds)."""
    rows, launches, graph_launches, kernels = [], 0, 0, 0
    for evt in events:
        name, low = evt.key, evt.key.lower()
        if on_cuda:
            if any(n in low for n in LAUNCH_NAMES):
                launches += evt.count
            elif any(n in low for n in GRAPH_LAUNCH_NAMES):
                graph_launches += evt.count
            if not _is_device_event(evt):
                continue
            us = _self_device_us(evt)
            if not ("memcpy" in low or "memset" in low):
                kernels += evt.count
        else:
            us = float(evt.self_cpu_time_total)
        if us > 0:
            rows.append({"name": name[:200], "calls": int(evt.count), "total_ms": us / 1e3,
                         "category": category(name)})
    total_ms = sum(r["total_ms"] for r in rows)
    rows.sort(key=lambda r: r["total_ms"], reverse=True)
    for r in rows:
        r["pct"] = 100.0 * r["total_ms"] / total_ms
    by_category: dict[str, float] = {}
    for r in rows:
        by_category[r["category"]] = by_category.get(r["category"], 0.0) + r["total_ms"]
    categories = [{"category": c, "total_ms": ms, "pct": 100.0 * ms / total_ms}
                  for c, ms in sorted(by_category.items(), key=lambda kv: kv[1], reverse=True)]

    def frac(ms: float, seconds: float) -> float:
        return ms / (1e3 * seconds) if seconds > 0 else float("nan")

    result = {
        "steps": steps, "device": "cuda" if on_cuda else "cpu",
        "time_kind": "self device (kernel) time" if on_cuda else "self CPU time",
        "wall_ms_per_step": 1e3 * plain_s / steps, "profiled_wall_ms_per_step": 1e3 * profiled_s / steps,
        "total_ms": total_ms, "top": rows[:top], "categories": categories, "trace": trace,
    }
    if on_cuda:
        result.update({
            "kernel_ms_per_step": total_ms / steps,
            "gpu_busy_fraction": frac(total_ms, profiled_s),
            "gpu_busy_fraction_unprofiled_wall": frac(total_ms, plain_s),
            "kernels_per_step": kernels / steps,
            "launch_calls_per_step": launches / steps,
            "graph_launches_per_step": graph_launches / steps,
        })
    else:
        result["op_cpu_fraction"] = frac(total_ms, profiled_s)
    return result


def _export_trace(prof, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return
    plain = path.with_suffix("")
    prof.export_chrome_trace(str(plain))
    with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()


def print_profile(p: dict, console, title: str = "") -> None:
    """Rich tables: the top ops/kernels and the time by category, then the step figures."""
    from rich.table import Table
    on_cuda = p["device"] == "cuda"
    what = "kernels" if on_cuda else "ops"
    table = Table(title=f"{title}top {len(p['top'])} {what} by {p['time_kind']} over {p['steps']} steps")
    for col in ("#", "name", "calls", "total ms", "% of profiled"):
        table.add_column(col, justify="left" if col == "name" else "right", overflow="fold")
    for i, r in enumerate(p["top"], 1):
        name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
        table.add_row(str(i), name, f"{r['calls']:,}", f"{r['total_ms']:.2f}", f"{r['pct']:.1f}")
    console.print(table)
    cats = Table(title=f"where the {p['time_kind']} goes (by {what[:-1]}-name pattern)")
    for col in ("category", "total ms", "%", "ms/step"):
        cats.add_column(col, justify="left" if col == "category" else "right")
    for c in p["categories"]:
        cats.add_row(c["category"], f"{c['total_ms']:.2f}", f"{c['pct']:.1f}", f"{c['total_ms'] / p['steps']:.3f}")
    console.print(cats)
    line = (f"step wall time: {p['wall_ms_per_step']:.2f} ms (profiled: {p['profiled_wall_ms_per_step']:.2f} ms); "
            f"{p['time_kind']}: {p['total_ms'] / p['steps']:.2f} ms/step")
    console.print(line)
    if on_cuda:
        busy = p["gpu_busy_fraction"]
        console.print(f"GPU busy fraction (kernel time / profiled wall): {busy:.1%} "
                      f"(/ unprofiled wall: {p['gpu_busy_fraction_unprofiled_wall']:.1%}); "
                      f"kernels/step: {p['kernels_per_step']:.0f}; "
                      f"launch calls/step: {p['launch_calls_per_step']:.0f}"
                      f"; cudaGraphLaunch/step: {p['graph_launches_per_step']:.1f}")
        gap = p["wall_ms_per_step"] - p["kernel_ms_per_step"]
        console.print(f"GPU idle per step (unprofiled wall - kernel time): {gap:.2f} ms"
                      + (" -> latency/launch bound: the GPU waits for the host" if busy < 0.6 else ""))
    else:
        console.print(f"op self-CPU time / profiled wall: {p['op_cpu_fraction']:.1%}")
    if p.get("trace"):
        console.print(f"chrome trace: {p['trace']}")
