"""``balpoe predict CKPT IMAGE_OR_FOLDER ...``: top-k classes of image files.

Each image goes through the checkpoint's test transform (:class:`~balpoe.serve.serving.Preprocess`)
and the ensemble; the logits are the *balanced* ensemble logits ``f̄ - lambda_m log pi_train``
(:func:`~balpoe.losses.priors.balance_logits`), optionally adjusted to a target label
distribution with the test-time tau selector (:class:`~balpoe.shift.selector.TauSelector`):

* ``prior``: a known target prior q (class weights, ``dirichlet:...`` or a weight file): ``+ log q``;
* ``adapt="unlabelled"``: q is estimated from all the given images together (calibrated on the
  checkpoint's labelled source data when its data can be built here, as ``balpoe eval --adapt
  unlabelled`` does; uncalibrated otherwise, with a warning).

An image that cannot be read is a warning naming it (its row gets an ``error``); the others are
still predicted.  No image readable at all is a one-line error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.markup import escape
from rich.table import Table

from balpoe.errors import BalpoeError, check_choice
from balpoe.runtime.checkpoint import atomic_write_text, json_text
from balpoe.runtime.files import check_output_path
from balpoe.runtime.console import console
from balpoe.runtime.device import resolve_device
from balpoe.serve.build import calibration_source, load_served
from balpoe.serve.serving import ServingModule, collect_images, load_image, prior_offset, resolve_prior
from balpoe.shift.selector import CALIBRATIONS, TauSelector, get_estimator

#: adaptation modes of :func:`predict` (besides None)
ADAPT = ("unlabelled",)
#: image rows shown in the console table (all of them go to the JSONL file)
MAX_TABLE_ROWS = 50
#: classes shown in the table of an estimated prior
PRIOR_TABLE_ROWS = 10


def _forward(module: ServingModule, transform, paths: list[Path], batch_size: int, device: torch.device):
    """Logits of the readable images (float32 ``[N_ok, K]`` on the CPU) and, per path, the row
    index into them or the error message (a warning names each unreadable file)."""
    logits: list[torch.Tensor] = []
    status: list[int | str] = []
    batch: list[torch.Tensor] = []
    n_ok = 0

    def flush():
        if batch:
            with torch.inference_mode():
                logits.append(module(torch.stack(batch).to(device)).float().cpu())
            batch.clear()

    for path in paths:
        try:
            x = load_image(path, transform)
        except BalpoeError as e:
            warnings.warn(f"{e}; skipped", UserWarning, stacklevel=3)
            status.append(str(e))
            continue
        batch.append(x)
        status.append(n_ok)
        n_ok += 1
        if len(batch) == batch_size:
            flush()
    flush()
    return (torch.cat(logits) if logits else None), status


def _check_options(prior, adapt, topk: int, batch_size: int) -> None:
    if adapt is not None and adapt not in ADAPT:
        raise BalpoeError(f"adaptation must be one of {', '.join(ADAPT)} (or None); got {adapt!r}")
    if adapt is not None and prior is not None:
        raise BalpoeError("a target prior and unlabelled adaptation exclude each other: give one of them")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise BalpoeError(f"top-k must be a positive integer, got {topk!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BalpoeError(f"batch size must be a positive integer, got {batch_size!r}")


def predict(checkpoint: str | Path, inputs: str | Path | Sequence[str | Path], *, prior=None,
            adapt: str | None = None, topk: int = 5, device: str = "auto", batch_size: int = 64,
            out: str | Path | None = None, estimator: str = "1d", calibration: str = "bcts",
            quiet: bool = False, overwrite: bool = True) -> dict[str, Any]:
    """Top-k classes of image files (module docstring).

    Args:
        checkpoint: a ``.pt`` checkpoint or ``.safetensors`` weights file.
        inputs: image files and/or folders (every image inside, recursively, sorted).
        prior: ``None`` / ``"uniform"`` (balanced logits), class weights (``"w1,...,wK"``, a
            sequence or tensor), ``"dirichlet:<profile>:<concentration>:<seed>"`` or the path of a
            weight file (text: one weight per class; JSON: a list, or class name -> weight).
        adapt: ``"unlabelled"``: estimate the target prior from all the readable images first.
        topk, device, batch_size: classes per image; ``auto`` / ``cpu`` / ``cuda[:N]``; images per
            forward pass.
        out: JSON-lines file with one row per image (``None``: none written); ``overwrite=False``
            refuses an existing one (:class:`~balpoe.errors.OutputExists`).
        estimator, calibration: of the unlabelled estimate (:data:`~balpoe.shift.selector.ESTIMATORS`,
            ``bcts`` / ``ts`` / ``none``), as in :func:`~balpoe.shift.build.evaluate_shift`.

    Returns ``{"rows": [...], "prior": {...}, ...}``: per image ``path``, ``labels``,
    ``probabilities``, ``class_ids`` (top-k, most probable first) or ``error``; ``prior`` says how
    the logits were adjusted (``mode`` balanced / known / unlabelled) and, for the last two, the
    target prior (``probabilities``) and tau'."""
    _check_options(prior, adapt, topk, batch_size)
    get_estimator(estimator)
    check_choice("calibration", calibration, CALIBRATIONS)
    paths = collect_images(inputs)
    dev = resolve_device(device, what="device")
    served = load_served(checkpoint, dev)
    counts, names = served.class_counts, served.class_names
    q = resolve_prior(prior, counts, names)
    inputs = [checkpoint, *paths] + ([prior] if isinstance(prior, (str, Path)) else [])
    out_path = check_output_path(out, "predictions file", inputs=inputs, overwrite=overwrite) if out is not None \
        else None
    module = ServingModule(served.model, served.preprocess.mean, served.preprocess.std,
                           prior_offset(counts, served.lam_model)).to(dev).eval()

    balanced, status = _forward(module, served.preprocess.transform(), paths, batch_size, dev)
    n_failed = sum(isinstance(s, str) for s in status)
    if balanced is None:
        raise BalpoeError(f"no input image could be read ({len(paths)} tried)")

    info: dict[str, Any] = {"mode": "balanced", "spec": None if prior is None else str(prior),
                            "logit_prior_exponent": served.lam_model}
    logits = balanced.double()
    if q is not None:
        res = TauSelector(counts, calibration="none").known(logits, q)
        logits = res.logits
        info.update(mode="known", probabilities=[float(v) for v in res.prior], tau=float(res.tau))
    elif adapt == "unlabelled":
        src, reason = calibration_source(served, dev, quiet=quiet) if calibration != "none" else (None, "")
        if src is None and calibration != "none":
            warnings.warn(f"no labelled source data to calibrate the prior estimate on ({reason}); estimating it "
                          "from uncalibrated logits", UserWarning, stacklevel=2)
        selector = TauSelector(counts, calibration=calibration if src is not None else "none",
                               estimator=estimator)
        if src is not None:
            selector.fit_source(src.logits.cpu(), src.labels.cpu(), source_prior=src.prior)
        res = selector.unlabelled(logits)
        logits = res.logits.double()
        info.update(mode="unlabelled", probabilities=[float(v) for v in res.prior], tau=float(res.tau),
                    temperature=float(res.temperature), calibration=selector.calibration,
                    estimator=res.info.get("estimator"), n_images=int(balanced.shape[0]),
                    source=None if src is None else {"kind": src.kind, "n": int(src.labels.numel()),
                                                     "note": src.note})

    probs = torch.softmax(logits, 1)
    k = min(topk, len(names))
    top_p, top_i = probs.topk(k, dim=1)
    rows: list[dict[str, Any]] = []
    for path, s in zip(paths, status):
        if isinstance(s, str):
            rows.append({"path": str(path), "error": s})
        else:
            ids = [int(i) for i in top_i[s]]
            rows.append({"path": str(path), "labels": [names[i] for i in ids],
                         "probabilities": [float(p) for p in top_p[s]], "class_ids": ids})

    result = {"checkpoint": str(checkpoint), "n_images": len(paths), "n_predicted": len(paths) - n_failed,
              "n_failed": n_failed, "topk": k, "class_names": names, "prior": info, "rows": rows,
              "out": None if out_path is None else str(out_path)}
    if out_path is not None:
        atomic_write_text("".join(json_text(r, indent=None) + "\n" for r in rows), out_path)
    if not quiet:
        _print(result, served)
    return result


def _print(result: dict, served) -> None:
    info = result["prior"]
    what = {"balanced": "balanced logits (uniform prior)",
            "known": f"prior {info['spec']} (tau' {info.get('tau', 0):.2f})",
            "unlabelled": f"prior estimated from the images (tau' {info.get('tau', 0):.2f})"}[info["mode"]]
    table = Table(title=escape(f"{served.recipe.name}: {result['n_predicted']} of {result['n_images']} images, "
                               f"{what}"))
    table.add_column("image", overflow="fold")
    table.add_column("top-1", style="bold")
    table.add_column("p", justify="right")
    table.add_column(f"next {result['topk'] - 1}" if result["topk"] > 1 else "", overflow="fold")
    for row in result["rows"][:MAX_TABLE_ROWS]:
        if "error" in row:
            table.add_row(escape(row["path"]), "[red]unreadable[/red]", "", "")
            continue
        rest = ", ".join(f"{escape(n)} {p:.3f}" for n, p in zip(row["labels"][1:], row["probabilities"][1:]))
        table.add_row(escape(row["path"]), escape(row["labels"][0]), f"{row['probabilities'][0]:.3f}", rest)
    console.print(table)
    if len(result["rows"]) > MAX_TABLE_ROWS:
        console.print(f"... {len(result['rows']) - MAX_TABLE_ROWS} more rows"
                      + (f" in {escape(result['out'])}" if result["out"] else ""))
    if info["mode"] == "unlabelled":
        console.print(_prior_table(info, served))
    if result["out"]:
        console.print(f"saved {escape(result['out'])}")


def _prior_table(info: dict, served) -> Table:
    q = torch.tensor(info["probabilities"])
    train = served.class_counts.double() / served.class_counts.sum()
    cal = info["calibration"] if info["calibration"] != "none" else "uncalibrated"
    src = f" on the {info['source']['kind'].replace('_', ' ')}" if info.get("source") else ""
    console.print(f"estimated label distribution of the {info['n_images']} images: tau' {info['tau']:.2f} "
                  f"({cal}{src}); uniform is {1 / len(q):.3f} per class", markup=False)
    table = Table(title="estimated prior")
    table.add_column("class")
    table.add_column("estimated", justify="right")
    table.add_column("training", justify="right")
    for i in q.argsort(descending=True)[:PRIOR_TABLE_ROWS].tolist():
        table.add_row(escape(served.class_names[i]), f"{float(q[i]):.3f}", f"{float(train[i]):.3f}")
    return table
