"""One self-contained HTML page that shows what a training run did and how good the model is.

:func:`write_html_report` reads only files a run already saved (no model, no torch) and writes
``RUN_DIR/report.html``: inline CSS, every figure a base64 PNG data URI, no script and no network
access needed to view it.  The page and the sources of its numbers:

* **header**: run name, ``data.dataset``, ``model.backbone``, ``model.num_experts``, the expert taus
  (``analysis.taus`` of ``eval.json``, else ``loss.tau`` of ``recipe.yaml``) and ``stage`` from
  ``RUN_DIR/recipe.yaml``; balanced test accuracy, ECE and NLL from ``RUN_DIR/eval.json``.
* **Training curves**: ``loss``, ``lr``, ``img_per_s`` (and ``test_acc`` / ``test_ece`` when the run
  evaluated during training) of each line of ``RUN_DIR/metrics.jsonl``.  A MiSLAS stage-2 run
  (``stage: 2``) also reads the stage-1 run's ``metrics.jsonl`` next to ``stage2.init_checkpoint``
  and draws its epochs first, with a vertical line where stage 2 starts.
* **Per-class accuracy vs training count**: ``analysis.per_class_acc`` (ensemble and each expert)
  against ``analysis.class_counts``, classes sorted by training count; the many/medium/few
  boundaries come from ``analysis.many_threshold`` / ``analysis.few_threshold``.
* **Many / medium / few**: ``analysis.group_acc`` (else the ``many``/``medium``/``few`` keys of
  ``eval.json``), overall accuracy ``acc`` and ``expert_acc``.  Groups by training count as in
  Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019: many-shot
  (> many_threshold images), few-shot (< few_threshold), medium-shot otherwise.
* **Confusion matrix**: ``analysis.confusion`` (ensemble, rows = true class), row-normalised.
* **Reliability diagrams**: each entry of ``analysis.reliability`` (``none``; ``ts`` and ``bcts``
  after post-hoc calibration), as in Guo et al., "On Calibration of Modern Neural Networks",
  ICML 2017: per-bin accuracy against confidence, the gap to the diagonal shaded.
* **Label shift**: ``curves`` of ``RUN_DIR/shift_eval.json``: accuracy on the forward50 ...
  uniform ... backward50 test distributions (Zhang et al., "Self-Supervised Aggregation of Diverse
  Experts for Test-Agnostic Long-Tailed Recognition", NeurIPS 2022) for each adaptation mode.
* **Recipe** (``recipe.yaml`` verbatim) and **Environment** (``analysis.environment``).

Optional inputs that are missing leave a note in their section saying which command writes them.
:func:`report_sections` returns the numbers behind the page (no images, no HTML) for programs and
tests.  ``balpoe report RUN_DIR`` writes the page; ``balpoe train`` and ``balpoe eval`` write it at the end.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from balpoe.errors import BalpoeError
from balpoe.evaluate.curve import summarize_test_curve
from balpoe.runtime.files import MAX_RECIPE_BYTES, atomic_write, check_output_path, parse_json, parse_yaml, read_text

DPI = 100
GROUPS = ("many", "medium", "few")
SHIFT_MODES = ("none", "known", "unlabelled", "labelled")
CALIBRATOR_LABELS = {"none": "no calibration", "ts": "temperature scaling (TS)",
                     "bcts": "bias-corrected TS (BCTS)"}
SECTIONS = {  # id -> heading, in page order
    "training": "Training curves",
    "per_class": "Per-class accuracy vs training count",
    "groups": "Many / medium / few",
    "confusion": "Confusion matrix",
    "reliability": "Reliability diagrams",
    "shift": "Label shift",
    "recipe": "Recipe",
    "environment": "Environment",
}
MAX_CLASS_COUNT = 1e12  # training images of one class a report accepts (a larger count is a damaged file)
MAX_CONFUSION_CELLS = 200  # larger confusion matrices are drawn in blocks of classes
TOP_CONFUSIONS = 20  # beyond 50 classes (no names on the figure): the largest confusions, as a table
MAX_BARS = 1000  # more classes: the training counts are drawn as one filled outline, not a bar per class
_EXPERT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#7f7f7f")
_ENSEMBLE_COLOUR = "#111111"


# ---------------------------------------------------------------------------------------------
# Reading the run directory


def _num(x) -> float | None:
    """A finite float, or None for null / NaN / anything that is not a number."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _arr(values) -> np.ndarray:
    """A list of numbers-or-null as a float array with NaN for the nulls."""
    return np.array([np.nan if _num(v) is None else float(v) for v in values], dtype=float)


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist (a link, a directory, a
    malformed, non-strict, too deeply nested or non-UTF-8 file is one line)."""
    if not os.path.lexists(path):
        return None
    obj = parse_json(read_text(path, "run file", follow_links=False), str(path))
    if not isinstance(obj, dict):
        raise BalpoeError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_metrics(path: str | Path) -> list[dict]:
    """The per-epoch rows of a ``metrics.jsonl`` (one JSON object a line), one row per epoch in
    epoch order; a resumed run that logged an epoch twice keeps the later row."""
    path = Path(path)
    lines = read_text(path, "metrics file", follow_links=False).splitlines()
    by_epoch: dict[float, dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}, line {lineno}")
        if not isinstance(row, dict):
            raise BalpoeError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        epoch = _num(row.get("epoch"))
        by_epoch[epoch if epoch is not None else float(len(by_epoch) + 1)] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def _read_recipe(run_dir: Path) -> tuple[dict, str]:
    """``RUN_DIR/recipe.yaml`` (never through a link; duplicate keys refused; its size and the values
    its aliases expand to bounded) and its text."""
    path = run_dir / "recipe.yaml"
    if not os.path.lexists(path):
        raise BalpoeError(f"{run_dir} has no recipe.yaml: not a balpoe run directory")
    text = read_text(path, "recipe", max_bytes=MAX_RECIPE_BYTES, follow_links=False)
    recipe = parse_yaml(text, str(path))
    if not isinstance(recipe, dict):
        raise BalpoeError(f"{path}: expected a YAML mapping (the resolved recipe)")
    return recipe, text


def _section(recipe: dict, key: str) -> dict:
    value = recipe.get(key)
    return value if isinstance(value, dict) else {}


def stage1_metrics_path(run_dir: str | Path, recipe: dict) -> Path | None:
    """``metrics.jsonl`` of the stage-1 run a stage-2 recipe starts from, or None.

    ``stage2.init_checkpoint`` is the path the stage-2 run was started with: absolute, or relative
    to the directory it was started from.  Tried in order: that path as it stands (relative to the
    current directory), relative to each parent of ``run_dir``, and a sibling of ``run_dir`` with
    the checkpoint folder's name."""
    if recipe.get("stage") != 2:
        return None
    ckpt = _section(recipe, "stage2").get("init_checkpoint")
    if not isinstance(ckpt, str) or not ckpt:
        return None
    ckpt_dir = Path(ckpt).parent
    run_dir = Path(run_dir).resolve()
    candidates = [ckpt_dir]
    if not ckpt_dir.is_absolute():
        candidates += [parent / ckpt_dir for parent in run_dir.parents]
        candidates.append(run_dir.parent / ckpt_dir.name)
    for folder in candidates:
        path = folder / "metrics.jsonl"
        if path.is_file() and folder.resolve() != run_dir:
            return path
    return None


# ---------------------------------------------------------------------------------------------
# The numbers of each section


def _check_len(values, n: int, what: str, path: Path, per: str = "class") -> list:
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise BalpoeError(f"{path}: {what} must be a list of {n} values (one per {per}), got {got}")
    return values


def _training(run_dir: Path, recipe: dict) -> tuple[dict | None, str | None]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, (f"No metrics.jsonl in {run_dir}: `balpoe train` writes one line per epoch there "
                      "(the run may not have finished its first epoch).")
    rows2 = read_metrics(path)
    rows1: list[dict] = []
    source = None
    if recipe.get("stage") == 2:
        s1 = stage1_metrics_path(run_dir, recipe)
        if s1 is not None:
            rows1, source = read_metrics(s1), str(s1)
    rows = rows1 + rows2
    if not rows:
        return None, f"{path} is empty: no epoch has finished yet."
    keys = ("loss", "lr", "img_per_s", "epoch_time_s", "test_acc", "test_ece")
    data = {k: [_num(r.get(k)) for r in rows] for k in keys}
    data["epoch"] = list(range(1, len(rows) + 1))
    data["n_stage1"] = len(rows1)
    data["n_stage2"] = len(rows2) if recipe.get("stage") == 2 else 0
    data["stage1_source"] = source
    data["boundary"] = len(rows1) + 0.5 if rows1 and rows2 else None
    if recipe.get("stage") == 2 and rows1:
        caption = f"{len(rows1)} stage-1 + {len(rows2)} stage-2 epochs (stage 1 from {source})"
    elif recipe.get("stage") == 2:
        ckpt = _section(recipe, "stage2").get("init_checkpoint")
        caption = (f"{len(rows2)} stage-2 epochs; the stage-1 metrics.jsonl next to {ckpt} was not found, "
                   "so stage 1 is not shown")
    else:
        caption = f"{len(rows)} epochs"
    seconds = [t for t in data["epoch_time_s"] if t is not None]
    if seconds:
        caption += f"; training time {sum(seconds):.2f} s"
    data["caption"] = caption
    data["test_curve"] = summarize_test_curve(rows2)  # this run's epochs only
    return data, None


def _taus(recipe: dict, analysis: dict) -> list[float] | None:
    taus = analysis.get("taus")
    if not isinstance(taus, list):
        taus = _section(recipe, "loss").get("tau")
    if not isinstance(taus, list):
        return None
    return [_num(t) for t in taus]


def _groups(ev: dict, analysis: dict, taus: list | None) -> dict:
    ga = analysis.get("group_acc") if isinstance(analysis.get("group_acc"), dict) else {}
    ens = ga.get("ensemble") if isinstance(ga.get("ensemble"), dict) else ev
    experts = ga.get("experts") if isinstance(ga.get("experts"), list) else []
    expert_acc = ev.get("expert_acc") if isinstance(ev.get("expert_acc"), list) else []
    rows = [{"model": "ensemble", "tau": None, **{g: _num(ens.get(g)) for g in GROUPS}, "all": _num(ev.get("acc"))}]
    for k in range(max(len(experts), len(expert_acc))):
        g = experts[k] if k < len(experts) and isinstance(experts[k], dict) else {}
        rows.append({"model": f"expert {k + 1}", "tau": taus[k] if taus and k < len(taus) else None,
                     **{name: _num(g.get(name)) for name in GROUPS},
                     "all": _num(expert_acc[k]) if k < len(expert_acc) else None})
    n_classes = None
    counts = analysis.get("class_counts")
    member = _class_group(analysis)
    if member is not None:
        n_classes = {name: member.count(k) for k, name in enumerate(("many", "medium", "few"))}
    elif isinstance(counts, list):
        c = _arr(counts)
        many_t, few_t = _num(analysis.get("many_threshold")), _num(analysis.get("few_threshold"))
        if many_t is not None and few_t is not None:
            many, few = c > many_t, c < few_t
            n_classes = {"many": int(many.sum()), "medium": int((~many & ~few).sum()), "few": int(few.sum())}
    ranges = analysis.get("group_ranges")
    ranges = [int(v) for v in ranges] if isinstance(ranges, list) and len(ranges) == 2 and member is not None else None
    return {"rows": rows, "n_classes": n_classes, "ranges": ranges,
            "many_threshold": None if ranges else _num(analysis.get("many_threshold")),
            "few_threshold": None if ranges else _num(analysis.get("few_threshold"))}


def _class_group(analysis: dict) -> list[int] | None:
    """``analysis.class_group`` (0/1/2 per class) when it is a valid list, else None."""
    member = analysis.get("class_group")
    counts = analysis.get("class_counts")
    if (isinstance(member, list) and isinstance(counts, list) and len(member) == len(counts)
            and all(m in (0, 1, 2) for m in member)):
        return [int(m) for m in member]
    return None


def _per_class(analysis: dict, taus: list | None, path: Path) -> dict:
    counts = analysis["class_counts"]
    n = len(counts)
    names = analysis.get("class_names")
    names = [str(x) for x in _check_len(names, n, "analysis.class_names", path)] if names is not None \
        else [str(i) for i in range(n)]
    pca = analysis.get("per_class_acc") if isinstance(analysis.get("per_class_acc"), dict) else {}
    ens = _arr(_check_len(pca.get("ensemble"), n, "analysis.per_class_acc.ensemble", path))
    experts_in = pca.get("experts") or []
    if not isinstance(experts_in, list):
        raise BalpoeError(f"{path}: analysis.per_class_acc.experts must be a list (one list per expert)")
    experts = [_arr(_check_len(e, n, f"analysis.per_class_acc.experts[{k}]", path))
               for k, e in enumerate(experts_in)]
    c = _arr(counts)
    if np.any(np.abs(np.nan_to_num(c)) > MAX_CLASS_COUNT):
        raise BalpoeError(f"{path}: analysis.class_counts holds a count beyond {MAX_CLASS_COUNT:.0e} (damaged file)")
    order = np.argsort(-np.nan_to_num(c, nan=-1.0), kind="stable")
    many_t, few_t = _num(analysis.get("many_threshold")), _num(analysis.get("few_threshold"))
    cs = c[order]
    n_many = int((cs > many_t).sum()) if many_t is not None else None
    n_few = int((cs < few_t).sum()) if few_t is not None else None
    member = _class_group(analysis)
    groups = None
    if member is not None:  # class-index ranges (data.groups: ranges) or the count rule, as evaluated
        groups = [("many", "medium", "few")[member[i]] for i in order]
        n_many, n_few = groups.count("many"), groups.count("few")
    return {"order": order.tolist(), "names": [names[i] for i in order], "counts": cs.tolist(),
            "ensemble": ens[order].tolist(), "experts": [e[order].tolist() for e in experts],
            "taus": taus, "n_many": n_many, "n_few": n_few, "many_threshold": many_t, "few_threshold": few_t,
            "groups": groups}


def _dense_counts(m, n: int, path: Path) -> np.ndarray:
    """``analysis.confusion`` (a ``n x n`` list of lists; nulls count 0) as a float array."""
    if not isinstance(m, list) or len(m) != n or any(not isinstance(r, list) or len(r) != n for r in m):
        raise BalpoeError(f"{path}: analysis.confusion must be a {n} x {n} list of lists")
    try:
        counts = np.array(m, dtype=float)  # one C pass; a null becomes NaN
    except (TypeError, ValueError):
        counts = np.array([_arr(r) for r in m])
    return np.nan_to_num(counts, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _entries(entries, n: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``analysis.confusion_entries`` (``[true, predicted, count]`` cells) as three arrays."""
    what = f"{path}: analysis.confusion_entries must be a list of [true class, predicted class, count] with classes " \
           f"in 0..{n - 1}"
    if not isinstance(entries, list):
        raise BalpoeError(what)
    try:
        a = np.array(entries, dtype=np.int64).reshape(-1, 3)
    except (TypeError, ValueError, OverflowError):
        raise BalpoeError(what) from None
    if len(a) != len(entries) or (len(a) and (a[:, :2].min() < 0 or a[:, :2].max() >= n or a[:, 2].min() < 0)):
        raise BalpoeError(what)
    return a[:, 0], a[:, 1], a[:, 2].astype(float)


def _top_confusions(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, totals: np.ndarray, per_class: dict,
                    k: int = TOP_CONFUSIONS) -> list[dict]:
    """The ``k`` largest off-diagonal cells (labels), as rows of the report's table."""
    off = rows != cols
    rows, cols, counts = rows[off], cols[off], counts[off]
    top = np.lexsort((cols, rows, -counts))[:k]
    rank = np.empty(len(per_class["order"]), dtype=np.int64)
    rank[np.asarray(per_class["order"], dtype=np.int64)] = np.arange(len(rank))
    names = per_class["names"]
    return [{"true": names[rank[i]], "predicted": names[rank[j]], "count": float(c),
             "fraction": float(c / totals[i]) if totals[i] > 0 else None}
            for i, j, c in zip(rows[top].tolist(), cols[top].tolist(), counts[top].tolist()) if c > 0]


def _confusion(analysis: dict, per_class: dict, path: Path) -> dict:
    """The confusion matrix in training-count order: every cell for up to :data:`MAX_CONFUSION_CELLS`
    classes; beyond, only blocks of consecutive classes (``cells``) and the largest confusions
    (``top``), computed without any ``K x K`` copy (from ``confusion_entries``, the nonzero cells
    ``balpoe eval`` writes for many classes, without a ``K x K`` array at all)."""
    n = len(per_class["order"])
    order = np.array(per_class["order"], dtype=int)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    sparse = analysis.get("confusion") is None
    if sparse:
        i, j, c = _entries(analysis.get("confusion_entries"), n, path)
        totals = np.bincount(i, weights=c, minlength=n)
    else:
        dense = _dense_counts(analysis.pop("confusion"), n, path)  # the lists are freed once converted
        totals = dense.sum(1)
    block = max(1, math.ceil(n / MAX_CONFUSION_CELLS))
    nb = math.ceil(n / block)
    out = {"order": order.tolist(), "names": per_class["names"], "block": block, "counts": None, "normalised": None,
           "bounds": [b for b in (per_class["n_many"], None if per_class["n_few"] is None else n - per_class["n_few"])
                      if b is not None and 0 < b < n]}
    if block == 1:
        if sparse:
            dense = np.zeros((n, n))
            np.add.at(dense, (i, j), c)
        counts = dense[order][:, order]
        t = totals[order][:, None]
        norm = np.divide(counts, t, out=np.zeros_like(counts), where=t > 0)
        out.update(counts=counts.tolist(), normalised=norm.tolist(), cells=norm.tolist())
        if n > 50:
            r, q = np.nonzero(dense)
            out["top"] = _top_confusions(r, q, dense[r, q], totals, per_class)
        return out
    # more classes than a figure has pixels for: cells of `block` consecutive classes (count order)
    summed = np.zeros((nb, nb))
    if sparse:
        np.add.at(summed, (rank[i] // block, rank[j] // block), c)
        out["top"] = _top_confusions(i, j, c, totals, per_class)
    else:
        col_block = rank // block
        cand_r, cand_c, cand_n = [], [], []
        for b in range(nb):
            rows = order[b * block:(b + 1) * block]
            part = dense[rows]
            summed[b] = np.bincount(col_block, weights=part.sum(0), minlength=nb)
            part[np.arange(len(rows)), rows] = 0  # the diagonal is no confusion (a copy: dense is untouched)
            k = min(TOP_CONFUSIONS, n)
            best = np.argpartition(part, n - k, axis=1)[:, n - k:]
            cand_r.append(np.repeat(rows, k))
            cand_c.append(best.ravel())
            cand_n.append(np.take_along_axis(part, best, 1).ravel())
        out["top"] = _top_confusions(np.concatenate(cand_r), np.concatenate(cand_c), np.concatenate(cand_n), totals,
                                     per_class)
    row_sums = summed.sum(1, keepdims=True)
    out["cells"] = np.divide(summed, row_sums, out=np.zeros_like(summed), where=row_sums > 0).tolist()
    return out


def _reliability_entry(entry, name: str, path: Path) -> dict:
    if not isinstance(entry, dict):
        raise BalpoeError(f"{path}: analysis.reliability.{name} must be an object")
    edges = entry.get("edges") or []
    if not isinstance(edges, list):
        raise BalpoeError(f"{path}: analysis.reliability.{name}.edges must be a list of bin edges")
    edges = _arr(edges)
    nb = len(edges) - 1
    if nb < 1:
        raise BalpoeError(f"{path}: analysis.reliability.{name}.edges needs at least 2 values")
    cols = {}
    for key in ("count", "accuracy", "confidence"):
        cols[key] = _arr(_check_len(entry.get(key), nb, f"analysis.reliability.{name}.{key}", path, "bin"))
    # per-bin accuracy/confidence are fractions; accept percentages too
    for key in ("accuracy", "confidence"):
        if np.nanmax(np.append(cols[key], 0.0)) > 1.0 + 1e-6:
            cols[key] = cols[key] / 100.0
    return {"label": CALIBRATOR_LABELS.get(name, name), "edges": edges.tolist(),
            **{k: v.tolist() for k, v in cols.items()},
            "ece": _num(entry.get("ece")), "mce": _num(entry.get("mce")), "temperature": _num(entry.get("temperature"))}


def _shift(shift: dict, path: Path) -> dict | None:
    curves = shift.get("curves")
    if not isinstance(curves, dict) or not isinstance(curves.get("distributions"), list):
        return None
    dists = [str(d) for d in curves["distributions"]]
    modes_in = curves.get("modes") if isinstance(curves.get("modes"), dict) else {}
    labels = curves.get("labels") if isinstance(curves.get("labels"), dict) else {}
    order = [m for m in SHIFT_MODES if m in modes_in] + [m for m in modes_in if m not in SHIFT_MODES]
    modes = {}
    for m in order:
        values = modes_in[m]
        if not isinstance(values, list) or len(values) != len(dists):
            raise BalpoeError(f"{path}: curves.modes.{m} must be a list of {len(dists)} values "
                              "(one per entry of curves.distributions)")
        modes[m] = {"label": str(labels.get(m, m)), "values": [_num(v) for v in values]}
    return {"distributions": dists, "modes": modes} if modes else None


def report_sections(run_dir: str | Path) -> dict:
    """The numbers behind the report, section by section, without images or HTML.

    Keys: ``run_dir``, ``recipe`` (dict), ``recipe_text``, ``header``, ``training``, ``per_class``,
    ``groups``, ``confusion``, ``reliability`` (calibrator -> bins), ``shift``, ``shift_table``,
    ``environment``; a section whose input is missing is None and ``notes[section]`` says what
    to run to get it.  Per-class data and the confusion matrix are in training-count order
    (``per_class["order"]`` maps back to labels).  Accuracies and ECE are in percent.
    """
    run_dir = Path(run_dir)
    recipe, recipe_text = _read_recipe(run_dir)
    eval_path, shift_path = run_dir / "eval.json", run_dir / "shift_eval.json"
    ev = _read_json(eval_path)
    shift = _read_json(shift_path)
    analysis = ev.get("analysis") if ev is not None and isinstance(ev.get("analysis"), dict) else {}
    data, model, loss = _section(recipe, "data"), _section(recipe, "model"), _section(recipe, "loss")
    taus = _taus(recipe, analysis)
    checkpoint = ev.get("checkpoint") if ev is not None and isinstance(ev.get("checkpoint"), str) else None
    ckpt_arg = checkpoint or str(run_dir / "last.pt")
    notes: dict[str, str] = {}
    out: dict = {"run_dir": str(run_dir), "recipe": recipe, "recipe_text": recipe_text, "notes": notes}

    n_experts = model.get("num_experts")
    if ev is not None and isinstance(ev.get("expert_acc"), list):
        n_experts = len(ev["expert_acc"])
    out["header"] = {
        "name": str(recipe.get("name", run_dir.name)), "dataset": data.get("dataset"),
        "backbone": model.get("backbone"), "num_experts": n_experts, "taus": taus,
        "tau_range": None if taus else (loss.get("tau_min"), loss.get("tau_max")),
        "stage": recipe.get("stage", 1), "seed": recipe.get("seed"),
        "acc": _num(ev.get("acc")) if ev else None, "ece": _num(ev.get("ece")) if ev else None,
        "nll": _num(ev.get("nll")) if ev else None, "n_test": ev.get("n") if ev else None,
        "epoch": ev.get("epoch") if ev else None, "checkpoint": checkpoint,
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }

    out["training"], note = _training(run_dir, recipe)
    if note:
        notes["training"] = note

    eval_cmd = f"run `balpoe eval {ckpt_arg}` to write {eval_path}"
    old_eval = (f"{eval_path} has no per-class analysis (it was written by an older balpoe): "
                f"re-run `balpoe eval {ckpt_arg}`")
    missing = eval_cmd if ev is None else old_eval
    has_counts = isinstance(analysis.get("class_counts"), list) and len(analysis["class_counts"]) > 0
    if has_counts and isinstance(analysis.get("per_class_acc"), dict):
        out["per_class"] = _per_class(analysis, taus, eval_path)
    else:
        out["per_class"] = None
        notes["per_class"] = f"No per-class accuracies: {missing}."

    if ev is not None:
        out["groups"] = _groups(ev, analysis, taus)
    else:
        out["groups"] = None
        notes["groups"] = f"No evaluation yet: {eval_cmd}."

    if out["per_class"] is not None and (analysis.get("confusion") is not None
                                         or analysis.get("confusion_entries") is not None):
        out["confusion"] = _confusion(analysis, out["per_class"], eval_path)
    else:
        out["confusion"] = None
        notes["confusion"] = f"No confusion matrix: {missing}."

    rel = analysis.get("reliability")
    if isinstance(rel, dict) and rel:
        names = [n for n in CALIBRATOR_LABELS if n in rel] + [n for n in rel if n not in CALIBRATOR_LABELS]
        out["reliability"] = {n: _reliability_entry(rel[n], n, eval_path) for n in names}
        if not any(n in rel for n in ("ts", "bcts")):
            notes["reliability"] = ("Only the uncalibrated diagram: eval.json has no post-hoc calibrated "
                                    "entries (ts, bcts).")
    else:
        out["reliability"] = None
        notes["reliability"] = f"No reliability diagrams: {missing}."
    note = analysis.get("calibration_note")
    out["calibration_note"] = str(note) if note is not None else None

    shift_cmd = f"run `balpoe eval {ckpt_arg} --test-dists all --adapt unlabelled` for label-shift results"
    out["shift"], out["shift_table"] = None, None
    if shift is None:
        notes["shift"] = f"No shift_eval.json in {run_dir}: {shift_cmd}."
    else:
        out["shift"] = _shift(shift, shift_path)
        if out["shift"] is None:
            notes["shift"] = (f"{shift_path} has no accuracy curves across forward50 ... backward50: "
                              f"{shift_cmd}.")
            dists = shift.get("distributions")
            if isinstance(dists, dict) and dists:
                out["shift_table"] = {str(k): {"acc": _num(v.get("acc")) if isinstance(v, dict) else None,
                                               "ece": _num(v.get("ece")) if isinstance(v, dict) else None}
                                      for k, v in dists.items()}

    env = analysis.get("environment")
    if isinstance(env, dict) and env:
        out["environment"] = {str(k): str(v) for k, v in env.items()}
    else:
        out["environment"] = None
        notes["environment"] = f"No environment recorded: {missing}."
    return out


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas; no pyplot state)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _tex(text: str) -> str:
    """Text for matplotlib with '$' shown literally (no mathtext)."""
    return str(text).replace("$", r"\$")


def _tau_label(k: int, taus: list | None) -> str:
    tau = taus[k] if taus and k < len(taus) else None
    return f"expert {k + 1} (τ = {tau:g})" if tau is not None else f"expert {k + 1}"


def _nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def training_figure(tr: dict) -> bytes:
    """Loss, learning rate and throughput per epoch (and test accuracy / ECE when logged)."""
    panels = [("loss", "training loss", None), ("lr", "learning rate", None),
              ("img_per_s", "throughput (images / s)", None)]
    for key, title in (("test_acc", "test balanced accuracy (%)"), ("test_ece", "test ECE (%)")):
        if any(v is not None for v in tr[key]):
            panels.append((key, title, None))
    n = len(panels)
    rows, cols = (1, n) if n <= 3 else (2, math.ceil(n / 2))
    fig = _figure(11, 3.3 * rows)
    x = np.array(tr["epoch"], dtype=float)
    many_epochs = len(x) > 40
    for i, (key, title, _) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        y = _nan(tr[key])
        ok = ~np.isnan(y)
        ax.plot(x[ok], y[ok], color="#1f77b4", lw=1.6, marker=None if many_epochs else "o", ms=3.5)
        if key == "lr":
            pos = y[ok & (y > 0)]
            if len(pos) and pos.max() / pos.min() >= 10 and pos.size == ok.sum():
                ax.set_yscale("log")
        if tr["boundary"] is not None:
            ax.axvline(tr["boundary"], color="#888888", ls="--", lw=1)
            ax.text(tr["boundary"], 0.97, " stage 2", transform=ax.get_xaxis_transform(), ha="left", va="top",
                    fontsize=9, color="#444444")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (stage 1, then stage 2)" if tr["boundary"] is not None else "epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5 - 0.02 * len(x), len(x) + 0.5 + 0.02 * len(x))  # the same epochs in every panel
    return _png(fig)


def smoothing_window(n_classes: int) -> int | None:
    """Classes per moving-average window of the per-class figure (None: every class drawn as is)."""
    return None if n_classes <= 30 else max(5, int(round(n_classes / 20)) | 1)


def per_class_figure(pc: dict) -> bytes:
    """Per-class test accuracy of the ensemble and of each expert, classes sorted by training count
    (grey bars, log scale on the right axis), with the many/medium/few boundaries; for more than 30
    classes, dots for single classes and lines for a moving average over :func:`smoothing_window`."""
    c = len(pc["order"])
    x = np.arange(c)
    counts = np.array(pc["counts"], dtype=float)
    fig = _figure(11, 4.8)
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    pos = counts[counts > 0]
    log = len(pos) and pos.max() / pos.min() >= 10
    if c <= MAX_BARS:
        ax2.bar(x, counts, width=0.8 if c <= 100 else 1.0, color="#d5d9de", linewidth=0, label="training images")
    else:  # one patch instead of one per class
        ax2.stairs(counts, np.arange(c + 1) - 0.5, baseline=pos.min() / 2 if log else 0, fill=True, color="#d5d9de",
                   linewidth=0, label="training images")
    if log:
        ax2.set_yscale("log")
        ax2.set_ylim(pos.min() / 2, pos.max() * 3)  # bars stay below the group names
    else:
        ax2.set_ylim(0, max(1.0, counts.max() * 1.15))
    ax2.set_ylabel("training images (grey bars)", fontsize=9, color="#5b6670")
    ax2.tick_params(labelsize=8, colors="#5b6670")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)

    window = smoothing_window(c)
    smooth = window is not None

    def draw(values, colour, label, lw, marker):
        y = np.array(values, dtype=float)
        if not smooth:
            ax.plot(x, y, color=colour, lw=lw, marker=marker, ms=5 if marker == "s" else 4, label=label)
            return
        ax.plot(x, y, ls="none", marker=".", ms=2.5, color=colour, alpha=0.35)
        ok = ~np.isnan(y)
        kernel = np.ones(window)
        num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
        den = np.convolve(ok.astype(float), kernel, mode="same")
        ax.plot(x, np.divide(num, den, out=np.full(c, np.nan), where=den > 0), color=colour, lw=lw, label=label)

    for k, values in enumerate(pc["experts"]):
        draw(values, _EXPERT_COLOURS[k % len(_EXPERT_COLOURS)], _tau_label(k, pc["taus"]), 1.3, "o")
    draw(pc["ensemble"], _ENSEMBLE_COLOUR, "ensemble", 2.6, "s")

    bounds = []
    if pc["n_many"] is not None and 0 < pc["n_many"] < c:
        bounds.append(pc["n_many"] - 0.5)
    if pc["n_few"] is not None and 0 < pc["n_few"] < c and c - pc["n_few"] > (pc["n_many"] or 0):
        bounds.append(c - pc["n_few"] - 0.5)
    for b in bounds:
        ax.axvline(b, color="#555555", ls="--", lw=1.1)
    edges = [-0.5, *bounds, c - 0.5]
    n_many, n_few = pc["n_many"] or 0, pc["n_few"] or 0
    names = [g for g, n in zip(GROUPS, (n_many, c - n_many - n_few, n_few)) if n > 0]
    if len(names) == len(edges) - 1:
        for g, lo, hi in zip(names, edges[:-1], edges[1:]):
            ax.text((lo + hi) / 2, 0.965, g, transform=ax.get_xaxis_transform(), ha="center", va="top",
                    fontsize=10, fontweight="bold", color="#333333")
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.set_xlim(-0.6, c - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=8)
    if c <= 30:
        ax.set_xticks(x)
        fits = max(len(n) for n in pc["names"]) * 7 < 1000 / c  # ~7 px per character at 9 pt
        ax.set_xticklabels([_tex(n) for n in pc["names"]], rotation=0 if fits else 30,
                           ha="center" if fits else "right", rotation_mode="anchor", fontsize=9 if c <= 15 else 7.5)
        ax.set_xlabel("class (most frequent first)", fontsize=9)
    else:
        ax.set_xlabel("class rank by training count (0 = most frequent)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(handles + h2, labels + l2, loc="outside upper center", ncol=min(len(labels) + 1, 5), fontsize=9,
               frameon=False)
    return _png(fig)


def groups_figure(groups: dict) -> bytes:
    """Grouped bars: many / medium / few / all accuracy of the ensemble and each expert."""
    cats = [*GROUPS, "all"]
    rows = groups["rows"]
    fig = _figure(11, 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(cats))
    order = rows[1:] + rows[:1]  # experts first, the ensemble rightmost in each group
    for i, row in enumerate(order):
        k = rows.index(row) - 1
        colour = _ENSEMBLE_COLOUR if k < 0 else _EXPERT_COLOURS[k % len(_EXPERT_COLOURS)]
        label = "ensemble" if k < 0 else _tau_label(k, [r["tau"] for r in rows[1:]])
        vals = _nan([row[c] for c in cats])
        bars = ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(vals), width * 0.92, color=colour, label=label,
                      alpha=0.9 if k >= 0 else 1.0)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in vals], fontsize=7.5, padding=1.5)
    n = groups.get("n_classes")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c}\n({_classes(n[c])})" if n and c in n else c for c in cats],
                       fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    fig.legend(loc="outside upper center", ncol=min(len(rows), 5), fontsize=9, frameon=False)
    return _png(fig)


def confusion_figure(cm: dict) -> bytes:
    """Row-normalised confusion matrix, classes in training-count order (blocks of classes when
    there are more than :data:`MAX_CONFUSION_CELLS`)."""
    c = len(cm["order"])
    named, numbers = c <= 50, c <= 20
    fig = _figure(*((6.8, 6.0) if c <= 10 else (8.2, 7.4) if named else (7.6, 6.6)))
    ax = fig.add_subplot()
    norm = Normalize(0, 1) if named else PowerNorm(0.5, 0, 1)
    im = ax.imshow(np.array(cm["cells"]), cmap="Blues", norm=norm, interpolation="nearest",
                   extent=(-0.5, c - 0.5, c - 0.5, -0.5))
    if numbers:
        m = np.array(cm["normalised"], dtype=float)
        counts = np.array(cm["counts"])
        size = 9 if c <= 10 else 6.5
        for i in range(c):
            for j in range(c):
                if counts[i, j] > 0:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=size,
                            color="white" if m[i, j] > 0.55 else "#1d232a")
    if named:
        ticks = np.arange(c)
        labels = [_tex(n) for n in cm["names"]]
        fs = 9 if c <= 15 else 7 if c <= 30 else 5.5
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=fs)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=fs)
        ax.set_xlabel("predicted class", fontsize=10)
        ax.set_ylabel("true class", fontsize=10)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("predicted class (rank by training count, most frequent left)", fontsize=10)
        ax.set_ylabel("true class (rank by training count, most frequent top)", fontsize=10)
        for b in cm["bounds"]:  # many / medium / few boundaries
            ax.axvline(b - 0.5, color="#d62728", lw=0.8, ls="--", alpha=0.7)
            ax.axhline(b - 0.5, color="#d62728", lw=0.8, ls="--", alpha=0.7)
    label = "fraction of the true class" + ("" if named else " (square-root colour scale)")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(label, fontsize=9)
    cb.ax.tick_params(labelsize=8)
    return _png(fig)


def reliability_figure(rel: dict) -> bytes:
    """One reliability diagram per calibrator (Guo et al., ICML 2017): per-bin accuracy bars, the
    gap to the bin's mean confidence shaded, the diagonal of perfect calibration."""
    n = len(rel)
    fig = _figure(max(4.4, 3.65 * n), 4.1)
    for i, (name, r) in enumerate(rel.items()):
        ax = fig.add_subplot(1, n, i + 1)
        edges = np.array(r["edges"], dtype=float)
        lefts, widths = edges[:-1], np.diff(edges)
        acc, conf = _nan(r["accuracy"]), _nan(r["confidence"])
        ok = ~np.isnan(acc) & ~np.isnan(conf)
        ax.bar(lefts[ok], acc[ok], widths[ok], align="edge", color="#3b6fb6", edgecolor="#1d232a", lw=0.6,
               label="accuracy")
        ax.bar(lefts[ok], np.abs(conf - acc)[ok], widths[ok], bottom=np.minimum(acc, conf)[ok], align="edge",
               color="#d9534f", alpha=0.35, edgecolor="#d9534f", lw=0.6, hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], ls="--", color="#666666", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        title = r["label"]
        if r["temperature"] is not None:
            title += f", T = {r['temperature']:.2f}"
        ece = f"ECE {r['ece']:.2f}%" if r["ece"] is not None else "ECE n/a"
        mce = f", MCE {r['mce']:.2f}%" if r["mce"] is not None else ""
        ax.set_title(f"{_tex(title)}\n{ece}{mce}", fontsize=9.5)
        ax.set_xlabel("confidence", fontsize=9)
        if i == 0:
            ax.set_ylabel("accuracy", fontsize=9)
            ax.legend(loc="upper left", fontsize=8)
        ax.tick_params(labelsize=8)
    return _png(fig)


def shift_figure(sh: dict) -> bytes:
    """Accuracy on each test label distribution (categorical x, in the file's order) per mode."""
    dists = sh["distributions"]
    x = np.arange(len(dists))
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    styles = {"none": ("#555555", "o", "--"), "known": ("#2ca02c", "^", "-"), "unlabelled": ("#1f77b4", "s", "-"),
              "labelled": ("#ff7f0e", "D", "-")}
    for i, (mode, m) in enumerate(sh["modes"].items()):
        colour, marker, ls = styles.get(mode, (_EXPERT_COLOURS[(i + 4) % len(_EXPERT_COLOURS)], "v", "-"))
        ax.plot(x, _nan(m["values"]), color=colour, marker=marker, ls=ls, lw=1.8, ms=5, label=_tex(m["label"]))
    if "uniform" in dists:
        ax.axvline(dists.index("uniform"), color="#aaaaaa", ls=":", lw=1)
    ax.set_xticks(x)
    ax.set_xticklabels([_tex(d) for d in dists], rotation=30 if len(dists) > 8 else 0,
                       ha="right" if len(dists) > 8 else "center", rotation_mode="anchor", fontsize=9)
    ax.set_ylabel("test accuracy (%)", fontsize=9)
    ax.set_xlabel("test label distribution (forward: like training, head-heavy; backward: tail-heavy)",
                  fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    fig.legend(loc="outside upper center", ncol=min(len(sh["modes"]), 4), fontsize=9, frameon=False)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { margin: 0; background: #eef0f3; color: #1d232a;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; background: #ffffff; }
h1 { font-size: 26px; margin: 0 0 2px; word-break: break-word; }
h2 { font-size: 20px; margin: 34px 0 4px; padding-top: 14px; border-top: 1px solid #dde1e6; }
.sub { color: #5b6670; margin: 0 0 10px; }
p.explain { color: #4a5561; margin: 0 0 12px; }
p.note { background: #fff8e1; border-left: 4px solid #f0b429; padding: 8px 12px; margin: 8px 0; }
nav { font-size: 14px; margin: 8px 0 4px; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 6px; }
.card { border: 1px solid #dde1e6; border-radius: 6px; padding: 6px 12px; flex: 1 1 auto; }
.card .k { font-size: 12px; color: #5b6670; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 18px; font-weight: 600; }
figure { margin: 8px 0 16px; }
img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #5b6670; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; font-size: 14px; }
th, td { border: 1px solid #dde1e6; padding: 4px 10px; vertical-align: top; }
th { background: #f0f2f5; text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; }
tr.ens td { font-weight: 600; }
pre { background: #f6f8fa; border: 1px solid #dde1e6; padding: 12px; overflow-x: auto; font-size: 13px;
  line-height: 1.4; }
code { background: #f0f2f5; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
.wide { overflow-x: auto; }
details { margin: 4px 0 12px; }
summary { cursor: pointer; color: #1f5fa8; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x, digits: int = 2, suffix: str = "") -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def _img(png: bytes, alt: str) -> str:
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{_e(alt)}">'


def _figure_html(png: bytes, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{_img(png, alt)}{cap}</figure>"


def _note(text: str) -> str:
    """A note with `command` spans shown as code (the text is escaped first)."""
    parts = _e(text).split("`")
    return '<p class="note">' + "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)) + "</p>"


def _table(head: list[str], rows: list[list[str]], num_from: int = 1, row_classes: list[str] | None = None) -> str:
    """An HTML table; ``head`` and ``rows`` are already-escaped cell HTML; columns from ``num_from``
    are right-aligned numbers."""
    th = "".join(f'<th class="num">{h}</th>' if i >= num_from else f"<th>{h}</th>" for i, h in enumerate(head))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        tds = "".join(f'<td class="num">{c}</td>' if i >= num_from else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    return f'<div class="wide"><table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _header_html(s: dict) -> str:
    h = s["header"]
    taus = ", ".join("?" if t is None else f"{t:g}" for t in h["taus"]) if h["taus"] else None
    if taus is None and h["tau_range"] and any(v is not None for v in h["tau_range"]):
        taus = f"{h['tau_range'][0]} … {h['tau_range'][1]}"
    cards = [("dataset", h["dataset"]), ("backbone", h["backbone"]), ("experts", h["num_experts"]),
             ("taus", taus), ("stage", h["stage"]), ("balanced acc", _f(h["acc"], suffix="%")),
             ("ECE", _f(h["ece"], suffix="%")), ("NLL", _f(h["nll"]))]
    cards_html = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">'
                         f'{_e("–" if v is None else v)}</div></div>' for k, v in cards)
    evaluated = ""
    if h["acc"] is not None:
        bits = []
        if h["checkpoint"]:
            bits.append(f"checkpoint <code>{_e(h['checkpoint'])}</code>")
        if h["epoch"] is not None:
            bits.append(f"epoch {_e(h['epoch'])}")
        if h["n_test"] is not None:
            bits.append(f"{_e(h['n_test'])} balanced test images")
        evaluated = (" Evaluated: " + ", ".join(bits) + "." if bits else "")
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS.items())
    return (f"<header><h1>{_e(h['name'])}</h1>"
            f'<p class="sub">balpoe run <code>{_e(s["run_dir"])}</code>; report made {_e(h["generated"])}.'
            f"{evaluated}</p>"
            f'<div class="cards">{cards_html}</div><nav>{nav}</nav></header>')


def _section_html(sid: str, explain: str, body: str, notes: dict) -> str:
    note = _note(notes[sid]) if sid in notes else ""
    return (f'<section id="{sid}"><h2>{_e(SECTIONS[sid])}</h2><p class="explain">{explain}</p>'
            f"{note}{body}</section>")


def _groups_html(g: dict) -> str:
    n = g["n_classes"]
    mt, ft = g["many_threshold"], g["few_threshold"]
    rules = {"many": f"&gt; {mt:g} images" if mt is not None else None,
             "few": f"&lt; {ft:g} images" if ft is not None else None,
             "medium": f"{ft:g}–{mt:g} images" if mt is not None and ft is not None else None}
    if g.get("ranges"):  # data.groups: ranges (the official MiSLAS class-index ranges)
        a, b = g["ranges"]
        rules = {"many": f"labels 0–{a - 1}", "medium": f"labels {a}–{b - 1}", "few": f"labels ≥ {b}"}
    head = ["model", "τ"]
    for c in GROUPS:
        extra = ", ".join(x for x in (rules[c] if rules[c] else None,
                                      _classes(n[c]) if n else None) if x)
        head.append(f"{c}" + (f"<br><small>{extra}</small>" if extra else ""))
    head.append("all")
    rows = [[_e(r["model"]), "" if r["tau"] is None else _e(f"{r['tau']:g}"),
             *(_f(r[c]) for c in (*GROUPS, "all"))] for r in g["rows"]]
    return _table(head, rows, num_from=1, row_classes=["ens"] + [""] * (len(rows) - 1))


def _best_epoch_html(curve: dict, header: dict) -> str:
    """The best epoch on the test set (``train.eval_every``), labelled as what it is: a selection on
    the test set itself, for comparison with the official logs; the page's headline stays the last epoch."""
    groups = ", ".join(f"{g} {_f(curve['best'].get(g))}" for g in GROUPS if curve["best"].get(g) is not None)
    last = header.get("acc") if header.get("acc") is not None else curve["last_acc"]
    return (f'<p class="explain">{_e(curve["label"][0].upper() + curve["label"][1:])}: epoch '
            f"{_e(curve['best_epoch'])}, balanced accuracy {_f(curve['best_acc'], suffix='%')}"
            + (f" ({_e(groups)})" if groups else "")
            + f". Selected on the test images themselves, so it over-states what the run would score on new data; "
            f"the headline is the last epoch ({_e(curve['last_epoch'])}: {_f(last, suffix='%')}), "
            f"{len(curve['epochs'])} test evaluations in all.</p>")


def _classes(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def _group_of(count: float, pc: dict, rank: int | None = None) -> str:
    if pc.get("groups") is not None and rank is not None:
        return pc["groups"][rank]
    if pc["many_threshold"] is not None and count > pc["many_threshold"]:
        return "many"
    if pc["few_threshold"] is not None and count < pc["few_threshold"]:
        return "few"
    return "medium"


def _per_class_table(pc: dict) -> str:
    """The numbers of the per-class figure, folded (a ``<details>`` element: no script needed)."""
    experts = [_tau_label(k, pc["taus"]) for k in range(len(pc["experts"]))]
    head = ["rank", "label", "class", "training images", "group", "ensemble", *(_e(x) for x in experts)]
    rows = [[str(r), str(label), _e(name), _e(f"{count:g}"), _group_of(count, pc, r), _f(pc["ensemble"][r]),
             *(_f(e[r]) for e in pc["experts"])]
            for r, (label, name, count) in enumerate(zip(pc["order"], pc["names"], pc["counts"]))]
    table = _table(head, rows, num_from=5)
    return (f"<details><summary>Per-class table ({len(rows)} classes, accuracy in %)</summary>{table}</details>")


def build_html(s: dict) -> str:
    """The report page for the sections of :func:`report_sections`."""
    notes = s["notes"]
    parts = [_header_html(s)]

    tr = s["training"]
    body = _figure_html(training_figure(tr), "training curves", _e(tr["caption"])) if tr else ""
    if tr and tr.get("test_curve"):
        body += _best_epoch_html(tr["test_curve"], s["header"])
    parts.append(_section_html(
        "training", "Per-epoch training loss, learning rate at the start of the epoch and training throughput, "
        "from <code>metrics.jsonl</code>" + ("; a MiSLAS stage-2 run shows its stage-1 epochs first." if
                                             s["recipe"].get("stage") == 2 else "."), body, notes))

    pc = s["per_class"]
    body = ""
    if pc:
        window = smoothing_window(len(pc["order"]))
        caption = f"{len(pc['order'])} classes; dashed lines: many/medium and medium/few boundaries"
        if window:
            caption += f"; dots: single classes, lines: moving average over {window} classes"
        body = _figure_html(per_class_figure(pc), "per-class accuracy vs training count", caption + ".")
        body += _per_class_table(pc)
    parts.append(_section_html(
        "per_class", "Test accuracy of each class for the ensemble and each expert, classes sorted by their number "
        "of training images (grey bars): experts with larger τ trade head-class for tail-class accuracy.",
        body, notes))

    g = s["groups"]
    body = ""
    if g:
        body = _groups_html(g) + _figure_html(groups_figure(g), "many / medium / few accuracy")
    parts.append(_section_html(
        "groups", "Balanced test accuracy (%) over the classes of each training-frequency group "
        "(many-shot, medium-shot, few-shot, Liu et al. 2019) and over all classes.", body, notes))

    cm = s["confusion"]
    body = ""
    if cm:
        c = len(cm["order"])
        if c <= 20:
            caption = (f"{c} classes, most frequent first; cell numbers: fraction of the true class predicted as "
                       "the column class.")
        else:
            caption = f"{c} classes, most frequent first"
            if cm["block"] > 1:
                caption += (f"; each cell is a block of {cm['block']} consecutive classes (the fraction of the block's "
                            "test images predicted as one of the column block's classes)")
            if c > 50:
                caption += "; red dashed lines: many/medium and medium/few boundaries; square-root colour scale"
            caption += "."
        body = _figure_html(confusion_figure(cm), "confusion matrix", _e(caption))
        if cm.get("top"):
            rows = [[_e(t["true"]), _e(t["predicted"]), _e(f"{t['count']:g}"),
                     _f(None if t["fraction"] is None else 100 * t["fraction"], 1)] for t in cm["top"]]
            body += (f"<p class=\"explain\">The {len(rows)} most frequent confusions:</p>"
                     + _table(["true class", "predicted as", "test images", "% of the true class"], rows, num_from=2))
    parts.append(_section_html(
        "confusion", "Ensemble predictions on the test set: row = true class, column = predicted class, each row "
        "divided by its number of test images.", body, notes))

    rel = s["reliability"]
    body = ""
    if rel:
        rows = [[_e(r["label"]), "" if r["temperature"] is None else _f(r["temperature"]), _f(r["ece"]),
                 _f(r["mce"]), _e(int(np.nansum(_nan(r["count"]))))] for r in rel.values()]
        body = _figure_html(reliability_figure(rel), "reliability diagrams")
        body += _table(["calibration", "T", "ECE (%)", "MCE (%)", "images"], rows)
        if s.get("calibration_note"):
            body += f'<p class="explain">{_e(s["calibration_note"])}</p>'
    parts.append(_section_html(
        "reliability", "Accuracy against confidence in 15 equal-width confidence bins (Guo et al. 2017): bars on "
        "the diagonal are perfectly calibrated; ECE is the count-weighted mean gap.", body, notes))

    sh = s["shift"]
    body = ""
    if sh:
        rows = [[_e(d), *(_f(m["values"][i]) for m in sh["modes"].values())]
                for i, d in enumerate(sh["distributions"])]
        body = _figure_html(shift_figure(sh), "accuracy under test label shift")
        body += _table(["distribution", *(_e(m["label"]) for m in sh["modes"].values())], rows)
    elif s.get("shift_table"):
        rows = [[_e(k), _f(v["acc"]), _f(v["ece"])] for k, v in s["shift_table"].items()]
        body = _table(["distribution", "acc (%)", "ECE (%)"], rows)
    parts.append(_section_html(
        "shift", "Test accuracy (%) when the test label distribution differs from the balanced one, without and "
        "with test-time adaptation of the ensemble.", body, notes))

    parts.append(_section_html("recipe", "The resolved recipe the run was trained with (<code>recipe.yaml</code>).",
                               f"<pre>{_e(s['recipe_text'])}</pre>", notes))

    env = s["environment"]
    body = _table(["component", "version / value"], [[_e(k), _e(v)] for k, v in env.items()], num_from=2) if env else ""
    parts.append(_section_html("environment", "Software and device the evaluation ran with.", body, notes))

    title = f"{s['header']['name']}: balpoe report"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


def write_html_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of ``run_dir`` to ``out`` (default
    ``RUN_DIR/report.html``) and return its path.  Raises :class:`BalpoeError` when ``run_dir``
    has no ``recipe.yaml`` or a file it reads is malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BalpoeError(f"{run_dir} does not exist or is not a directory: not a balpoe run directory")
    path = Path(out) if out is not None else run_dir / "report.html"
    check_output_path(path, "report output", inputs=report_inputs(run_dir), own_run=run_dir, writes=["report.html"],
                      create=False)
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "axes.unicode_minus": False,
                                "hatch.linewidth": 0.6}):
        page = build_html(report_sections(run_dir))
    atomic_write(path, lambda f: f.write(page.encode("utf-8")))
    return path


def report_inputs(run_dir: str | Path) -> list[Path]:
    """The files :func:`write_html_report` reads from ``run_dir`` (an output must not be one of them)."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in ("recipe.yaml", "metrics.jsonl", "eval.json", "shift_eval.json")]


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def find_chromium() -> str | None:
    """The headless Chromium executable (Debian package ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` and a fresh profile folder (no network access needed)."""
    exe = find_chromium()
    if exe is None:
        raise BalpoeError("a screenshot of the report needs headless Chromium: apt-get install -y chromium")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


def screenshot(html: str | Path, png: str | Path, width: int = 1200, height: int = 12000) -> Path:
    """A PNG of the page ``html`` as Chromium shows it ``width`` pixels wide; the empty page below the
    content is cut off (the window is ``height`` pixels tall)."""
    check_output_path(png, "screenshot", inputs=[html])
    html, png = Path(html).resolve(), Path(png)
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        r = chromium([f"--window-size={width},{height}", f"--screenshot={shot}", html.as_uri()], Path(tmp) / "profile")
        if not shot.is_file():
            raise BalpoeError(f"Chromium wrote no screenshot of '{html}' ({r.stderr.strip().splitlines()[-1:]})")
        with Image.open(shot) as img:
            rgb = np.asarray(img.convert("RGB"))
    background = rgb[-1, rgb.shape[1] // 2].astype(int)  # the page colour below the content
    rows = np.where((np.abs(rgb.astype(int) - background) > 8).any(axis=(1, 2)))[0]
    bottom = int(rows[-1]) + 24 if len(rows) else rgb.shape[0]
    atomic_write(png, lambda f: Image.fromarray(rgb[:min(bottom, rgb.shape[0])]).save(f, format="PNG", optimize=True))
    return png


__all__ = ["write_html_report", "report_inputs", "screenshot", "find_chromium", "chromium", "report_sections", "build_html", "read_metrics", "stage1_metrics_path"]
