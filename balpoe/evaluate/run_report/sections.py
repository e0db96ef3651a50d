"""The numbers of the run report, section by section: read from the files a run saved, no figures, no HTML.

:func:`report_sections` reads ``recipe.yaml``, ``metrics.jsonl`` (and a stage-2 run's stage-1 log),
``eval.json`` and ``shift_eval.json`` of a run folder.  Each class's many / medium / few group is
``analysis.class_group`` of ``eval.json`` (Liu et al., "Large-Scale Long-Tailed Recognition in an
Open World", CVPR 2019, or the recipe's class-index ranges); an ``eval.json`` written before it was
saved is grouped once by the same rule (:func:`~balpoe.data.groups.group_indices`, without torch) from
its training counts and thresholds.
"""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

import numpy as np

from balpoe.data.groups import GROUP_NAMES, group_indices
from balpoe.errors import BalpoeError
from balpoe.evaluate.curve import summarize_test_curve
from balpoe.runtime.files import MAX_RECIPE_BYTES, parse_json, parse_yaml, read_text
from balpoe.runtime.metrics_log import finite_number, metrics_rows

SHIFT_MODES = ("none", "known", "unlabelled", "labelled")
CALIBRATOR_LABELS = {"none": "no calibration", "ts": "temperature scaling (TS)",
                     "bcts": "bias-corrected TS (BCTS)"}
MAX_CLASS_COUNT = 1e12  # training images of one class a report accepts (a larger count is a damaged file)
MAX_CONFUSION_CELLS = 200  # larger confusion matrices are drawn in blocks of classes
TOP_CONFUSIONS = 20  # beyond 50 classes (no names on the figure): the largest confusions, as a table


# ---------------------------------------------------------------------------------------------
# Reading the run directory


def _arr(values) -> np.ndarray:
    """A list of numbers-or-null as a float array with NaN for the nulls."""
    return np.array([np.nan if finite_number(v) is None else float(v) for v in values], dtype=float)


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist (a link, a directory, a
    malformed, non-strict, too deeply nested or non-UTF-8 file is one line)."""
    if not os.path.lexists(path):
        return None
    obj = parse_json(read_text(path, "run file", follow_links=False), str(path))
    if not isinstance(obj, dict):
        raise BalpoeError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_metrics(path: Path) -> list[dict]:
    return [row for row, _ in metrics_rows(path)]


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


def report_inputs(run_dir: str | Path) -> list[Path]:
    """The files the report reads from ``run_dir`` (an output must not be one of them)."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in ("recipe.yaml", "metrics.jsonl", "eval.json", "shift_eval.json")]


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
    rows2 = _read_metrics(path)
    rows1: list[dict] = []
    source = None
    if recipe.get("stage") == 2:
        s1 = stage1_metrics_path(run_dir, recipe)
        if s1 is not None:
            rows1, source = _read_metrics(s1), str(s1)
    rows = rows1 + rows2
    if not rows:
        return None, f"{path} is empty: no epoch has finished yet."
    keys = ("loss", "lr", "img_per_s", "epoch_time_s", "test_acc", "test_ece")
    data = {k: [finite_number(r.get(k)) for r in rows] for k in keys}
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
    return [finite_number(t) for t in taus]


def _saved_groups(analysis: dict) -> list[int] | None:
    """``analysis.class_group`` (0/1/2 per class) when it is a valid list, else None."""
    member = analysis.get("class_group")
    counts = analysis.get("class_counts")
    if (isinstance(member, list) and isinstance(counts, list) and len(member) == len(counts)
            and all(m in (0, 1, 2) for m in member)):
        return [int(m) for m in member]
    return None


def _class_groups(analysis: dict) -> list[int] | None:
    """Each class's group (0 many, 1 medium, 2 few): ``analysis.class_group`` as ``balpoe eval``
    writes it; for an older ``eval.json`` without it, :func:`~balpoe.data.groups.group_indices` of
    ``class_counts`` with ``many_threshold`` / ``few_threshold``.  None without counts or thresholds."""
    saved = _saved_groups(analysis)
    if saved is not None:
        return saved
    counts = analysis.get("class_counts")
    many_t, few_t = finite_number(analysis.get("many_threshold")), finite_number(analysis.get("few_threshold"))
    if not isinstance(counts, list) or many_t is None or few_t is None:
        return None
    return group_indices(_arr(counts), many_t, few_t).tolist()


def _groups(ev: dict, analysis: dict, taus: list | None, member: list[int] | None) -> dict:
    ga = analysis.get("group_acc") if isinstance(analysis.get("group_acc"), dict) else {}
    ens = ga.get("ensemble") if isinstance(ga.get("ensemble"), dict) else ev
    experts = ga.get("experts") if isinstance(ga.get("experts"), list) else []
    expert_acc = ev.get("expert_acc") if isinstance(ev.get("expert_acc"), list) else []
    rows = [{"model": "ensemble", "tau": None, **{g: finite_number(ens.get(g)) for g in GROUP_NAMES}, "all": finite_number(ev.get("acc"))}]
    for k in range(max(len(experts), len(expert_acc))):
        g = experts[k] if k < len(experts) and isinstance(experts[k], dict) else {}
        rows.append({"model": f"expert {k + 1}", "tau": taus[k] if taus and k < len(taus) else None,
                     **{name: finite_number(g.get(name)) for name in GROUP_NAMES},
                     "all": finite_number(expert_acc[k]) if k < len(expert_acc) else None})
    n_classes = None if member is None else {name: member.count(k) for k, name in enumerate(GROUP_NAMES)}
    ranges = analysis.get("group_ranges")
    ranges = ([int(v) for v in ranges] if isinstance(ranges, list) and len(ranges) == 2
              and _saved_groups(analysis) is not None else None)
    return {"rows": rows, "n_classes": n_classes, "ranges": ranges,
            "many_threshold": None if ranges else finite_number(analysis.get("many_threshold")),
            "few_threshold": None if ranges else finite_number(analysis.get("few_threshold"))}


def _per_class(analysis: dict, taus: list | None, member: list[int] | None, path: Path) -> dict:
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
    # class-index ranges (data.groups: ranges) or the count rule, as evaluated: in training-count order
    groups = None if member is None else [GROUP_NAMES[member[i]] for i in order]
    return {"order": order.tolist(), "names": [names[i] for i in order], "counts": c[order].tolist(),
            "ensemble": ens[order].tolist(), "experts": [e[order].tolist() for e in experts], "taus": taus,
            "n_many": None if groups is None else groups.count("many"),
            "n_few": None if groups is None else groups.count("few"),
            "many_threshold": finite_number(analysis.get("many_threshold")), "few_threshold": finite_number(analysis.get("few_threshold")),
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
            "ece": finite_number(entry.get("ece")), "mce": finite_number(entry.get("mce")), "temperature": finite_number(entry.get("temperature"))}


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
        modes[m] = {"label": str(labels.get(m, m)), "values": [finite_number(v) for v in values]}
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
        "acc": finite_number(ev.get("acc")) if ev else None, "ece": finite_number(ev.get("ece")) if ev else None,
        "nll": finite_number(ev.get("nll")) if ev else None, "n_test": ev.get("n") if ev else None,
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
    member = _class_groups(analysis)
    if has_counts and isinstance(analysis.get("per_class_acc"), dict):
        out["per_class"] = _per_class(analysis, taus, member, eval_path)
    else:
        out["per_class"] = None
        notes["per_class"] = f"No per-class accuracies: {missing}."

    if ev is not None:
        out["groups"] = _groups(ev, analysis, taus, member)
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
                out["shift_table"] = {str(k): {"acc": finite_number(v.get("acc")) if isinstance(v, dict) else None,
                                               "ece": finite_number(v.get("ece")) if isinstance(v, dict) else None}
                                      for k, v in dists.items()}

    env = analysis.get("environment")
    if isinstance(env, dict) and env:
        out["environment"] = {str(k): str(v) for k, v in env.items()}
    else:
        out["environment"] = None
        notes["environment"] = f"No environment recorded: {missing}."
    return out
