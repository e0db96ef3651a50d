"""The run report's page: inline CSS, one stanza per section (:data:`PAGE`: heading, what it shows,
its figures and tables) and the file it is written to.

Every figure is a base64 PNG data URI: the page needs no script and no network access.  Text from the
run's files is escaped.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np

from balpoe.data.groups import GROUP_NAMES
from balpoe.errors import BalpoeError
from balpoe.evaluate.run_report.figures import (classes_text, confusion_figure, groups_figure, per_class_figure,
                                                reliability_figure, shift_figure, smoothing_window, tau_label,
                                                training_figure)
from balpoe.evaluate.run_report.sections import report_inputs, report_sections
from balpoe.runtime.metrics_log import finite_number
from balpoe.runtime.files import atomic_write, check_output_path

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
    v = finite_number(x)
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
    for c in GROUP_NAMES:
        extra = ", ".join(x for x in (rules[c] if rules[c] else None,
                                      classes_text(n[c]) if n else None) if x)
        head.append(f"{c}" + (f"<br><small>{extra}</small>" if extra else ""))
    head.append("all")
    rows = [[_e(r["model"]), "" if r["tau"] is None else _e(f"{r['tau']:g}"),
             *(_f(r[c]) for c in (*GROUP_NAMES, "all"))] for r in g["rows"]]
    return _table(head, rows, num_from=1, row_classes=["ens"] + [""] * (len(rows) - 1))


def _best_epoch_html(curve: dict, header: dict) -> str:
    """The best epoch on the test set (``train.eval_every``), labelled as what it is: a selection on
    the test set itself, for comparison with the official logs; the page's headline stays the last epoch."""
    groups = ", ".join(f"{g} {_f(curve['best'].get(g))}" for g in GROUP_NAMES if curve["best"].get(g) is not None)
    last = header.get("acc") if header.get("acc") is not None else curve["last_acc"]
    return (f'<p class="explain">{_e(curve["label"][0].upper() + curve["label"][1:])}: epoch '
            f"{_e(curve['best_epoch'])}, balanced accuracy {_f(curve['best_acc'], suffix='%')}"
            + (f" ({_e(groups)})" if groups else "")
            + f". Selected on the test images themselves, so it over-states what the run would score on new data; "
            f"the headline is the last epoch ({_e(curve['last_epoch'])}: {_f(last, suffix='%')}), "
            f"{len(curve['epochs'])} test evaluations in all.</p>")


def _per_class_table(pc: dict) -> str:
    """The numbers of the per-class figure, folded (a ``<details>`` element: no script needed)."""
    experts = [tau_label(k, pc["taus"]) for k in range(len(pc["experts"]))]
    head = ["rank", "label", "class", "training images", "group", "ensemble", *(_e(x) for x in experts)]
    groups = pc["groups"] or ["–"] * len(pc["order"])
    rows = [[str(r), str(label), _e(name), _e(f"{count:g}"), groups[r], _f(pc["ensemble"][r]),
             *(_f(e[r]) for e in pc["experts"])]
            for r, (label, name, count) in enumerate(zip(pc["order"], pc["names"], pc["counts"]))]
    table = _table(head, rows, num_from=5)
    return (f"<details><summary>Per-class table ({len(rows)} classes, accuracy in %)</summary>{table}</details>")


def _training_body(s: dict) -> str:
    tr = s["training"]
    if not tr:
        return ""
    body = _figure_html(training_figure(tr), "training curves", _e(tr["caption"]))
    if tr.get("test_curve"):
        body += _best_epoch_html(tr["test_curve"], s["header"])
    return body


def _per_class_body(s: dict) -> str:
    pc = s["per_class"]
    if not pc:
        return ""
    window = smoothing_window(len(pc["order"]))
    caption = f"{len(pc['order'])} classes; dashed lines: many/medium and medium/few boundaries"
    if window:
        caption += f"; dots: single classes, lines: moving average over {window} classes"
    return _figure_html(per_class_figure(pc), "per-class accuracy vs training count", caption + ".") \
        + _per_class_table(pc)


def _groups_body(s: dict) -> str:
    g = s["groups"]
    return _groups_html(g) + _figure_html(groups_figure(g), "many / medium / few accuracy") if g else ""


def _confusion_body(s: dict) -> str:
    cm = s["confusion"]
    if not cm:
        return ""
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
    return body


def _reliability_body(s: dict) -> str:
    rel = s["reliability"]
    if not rel:
        return ""
    rows = [[_e(r["label"]), "" if r["temperature"] is None else _f(r["temperature"]), _f(r["ece"]),
             _f(r["mce"]), _e(int(np.nansum(r["count"])))] for r in rel.values()]
    body = _figure_html(reliability_figure(rel), "reliability diagrams")
    body += _table(["calibration", "T", "ECE (%)", "MCE (%)", "images"], rows)
    if s.get("calibration_note"):
        body += f'<p class="explain">{_e(s["calibration_note"])}</p>'
    return body


def _shift_body(s: dict) -> str:
    sh = s["shift"]
    if sh:
        rows = [[_e(d), *(_f(m["values"][i]) for m in sh["modes"].values())]
                for i, d in enumerate(sh["distributions"])]
        return _figure_html(shift_figure(sh), "accuracy under test label shift") \
            + _table(["distribution", *(_e(m["label"]) for m in sh["modes"].values())], rows)
    if s.get("shift_table"):
        rows = [[_e(k), _f(v["acc"]), _f(v["ece"])] for k, v in s["shift_table"].items()]
        return _table(["distribution", "acc (%)", "ECE (%)"], rows)
    return ""


def _environment_body(s: dict) -> str:
    env = s["environment"]
    return _table(["component", "version / value"], [[_e(k), _e(v)] for k, v in env.items()], num_from=2) if env else ""


@dataclass(frozen=True)
class Section:
    """One section of the page: its anchor, heading, what it shows (HTML; a function of the sections'
    numbers where it depends on the run) and its figures and tables."""
    id: str
    title: str
    explain: str | Callable[[dict], str]
    body: Callable[[dict], str]


#: the page's sections, in page order
PAGE = (
    Section("training", "Training curves",
            lambda s: "Per-epoch training loss, learning rate at the start of the epoch and training throughput, "
            "from <code>metrics.jsonl</code>" + ("; a MiSLAS stage-2 run shows its stage-1 epochs first."
                                                 if s["recipe"].get("stage") == 2 else "."), _training_body),
    Section("per_class", "Per-class accuracy vs training count",
            "Test accuracy of each class for the ensemble and each expert, classes sorted by their number of training "
            "images (grey bars): experts with larger τ trade head-class for tail-class accuracy.", _per_class_body),
    Section("groups", "Many / medium / few",
            "Balanced test accuracy (%) over the classes of each training-frequency group (many-shot, medium-shot, "
            "few-shot, Liu et al. 2019) and over all classes.", _groups_body),
    Section("confusion", "Confusion matrix",
            "Ensemble predictions on the test set: row = true class, column = predicted class, each row divided by "
            "its number of test images.", _confusion_body),
    Section("reliability", "Reliability diagrams",
            "Accuracy against confidence in 15 equal-width confidence bins (Guo et al. 2017): bars on the diagonal "
            "are perfectly calibrated; ECE is the count-weighted mean gap.", _reliability_body),
    Section("shift", "Label shift",
            "Test accuracy (%) when the test label distribution differs from the balanced one, without and with "
            "test-time adaptation of the ensemble.", _shift_body),
    Section("recipe", "Recipe", "The resolved recipe the run was trained with (<code>recipe.yaml</code>).",
            lambda s: f"<pre>{_e(s['recipe_text'])}</pre>"),
    Section("environment", "Environment", "Software and device the evaluation ran with.", _environment_body),
)
#: section id -> heading, in page order
SECTIONS = {sec.id: sec.title for sec in PAGE}


def _section_html(sec: Section, s: dict) -> str:
    explain = sec.explain(s) if callable(sec.explain) else sec.explain
    note = _note(s["notes"][sec.id]) if sec.id in s["notes"] else ""
    return (f'<section id="{sec.id}"><h2>{_e(sec.title)}</h2><p class="explain">{explain}</p>'
            f"{note}{sec.body(s)}</section>")


def build_html(s: dict) -> str:
    """The report page for the sections of :func:`~balpoe.evaluate.run_report.sections.report_sections`."""
    parts = [_header_html(s), *(_section_html(sec, s) for sec in PAGE)]
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
