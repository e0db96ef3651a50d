"""The self-contained HTML report of a run directory (balpoe/evaluate/run_report/).

Fake run directories (recipe.yaml, metrics.jsonl, eval.json, shift_eval.json written here, no
training) are rendered; the page is checked for its sections, numbers, escaping and
self-containedness, and then opened in headless Chromium as a person would see it.
"""

import base64
import io
import json
import re

import numpy as np
import pytest
import yaml

from balpoe.errors import BalpoeError
from balpoe.evaluate.run_report import SECTIONS, chromium, find_chromium, report_sections, screenshot, write_html_report

CLASS_NAMES = ["T-shirt/top", "<b>Bag</b> & co", "Sneaker $5", "Ankle boot"]
CLASS_COUNTS = [120, 500, 8, 40]  # training-count order: 1, 0, 3, 2; many: 0, 1; medium: 3; few: 2
ENS_GROUPS = {"many": 84.98765, "medium": 63.456, "few": 87.6}
EXPERT_GROUPS = [{"many": 90.004, "medium": 50.0, "few": 20.126}, {"many": 71.111, "medium": 66.666, "few": None}]
DISTS = ["forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
         "backward2", "backward5", "backward10", "backward25", "backward50"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _recipe(name: str, stage: int = 1, init_checkpoint: str | None = None) -> dict:
    return {"name": name, "seed": 0, "stage": stage,
            "data": {"dataset": "fashion_mnist", "imb_factor": 100, "many_threshold": 100, "few_threshold": 20},
            "model": {"backbone": "small_cnn", "num_experts": 2, "split": "layer1"},
            "loss": {"tau": [0.0, 2.0]},
            "optim": {"lr": 0.1, "epochs": 3, "schedule": "cosine"},
            "train": {"mixup_alpha": 0.4},
            "stage2": {"init_checkpoint": init_checkpoint, "classifier": "mislas"}}


def _metrics(n: int, lr0: float = 0.1, test: bool = False) -> str:
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "loss": 2.0 / e, "lr": lr0 * 0.1 ** (e - 1), "epoch_time_s": 5.0, "img_per_s": 2900.0 + e}
        if test:
            row.update({"test_acc": 50.0 + 5 * e, "test_ece": 10.0 - e})
        rows.append(json.dumps(row))
    return "\n".join(rows) + "\n"


def _reliability(ece: float, temperature: float | None = None) -> dict:
    edges = [b / 15 for b in range(16)]
    count = [0] * 8 + [10, 20, 0, 40, 80, 150, 300]
    acc = [None if c == 0 else 0.4 + 0.04 * b for b, c in enumerate(count)]
    conf = [None if c == 0 else (edges[b] + edges[b + 1]) / 2 for b, c in enumerate(count)]
    out = {"edges": edges, "count": count, "accuracy": acc, "confidence": conf, "ece": ece, "mce": 2 * ece}
    if temperature is not None:
        out["temperature"] = temperature
    return out


def _eval() -> dict:
    return {"n": 400, "acc": 79.04567, "many": ENS_GROUPS["many"], "medium": ENS_GROUPS["medium"],
            "few": ENS_GROUPS["few"], "ece": 9.4249, "mce": 19.6, "nll": 0.65432, "brier": 0.31,
            "expert_acc": [69.2, 79.3], "epoch": 3, "checkpoint": "runs/s1/last.pt",
            "analysis": {
                "class_names": CLASS_NAMES, "class_counts": CLASS_COUNTS, "many_threshold": 100,
                "few_threshold": 20, "taus": [0.0, 2.0],
                "per_class_acc": {"ensemble": [80.0, 90.0, 40.0, 60.0],
                                  "experts": [[85.0, 95.0, 20.0, 50.0], [75.0, 70.0, None, 65.0]]},
                "group_acc": {"ensemble": ENS_GROUPS, "experts": EXPERT_GROUPS},
                "confusion": [[80, 10, 5, 5], [5, 90, 0, 5], [20, 20, 40, 20], [10, 20, 10, 60]],
                "reliability": {"none": _reliability(9.42), "ts": _reliability(3.1, 0.75),
                                "bcts": _reliability(2.5, 0.68)},
                "calibration_note": "TS/BCTS fitted on 40 held-out source images <not the test set>",
                "environment": {"balpoe": "0.1.0", "torch": "2.14.1", "python": "3.11.7", "device": "cpu",
                                "dtype": "bfloat16 autocast"},
            }}


def _shift() -> dict:
    modes = {"none": [60.0 + i for i in range(11)], "known": [70.0 + 0.5 * i for i in range(11)],
             "unlabelled": [68.0] * 5 + [None] + [69.0] * 5}
    return {"distributions": {d: {"acc": modes["none"][i]} for i, d in enumerate(DISTS)},
            "curves": {"distributions": DISTS, "modes": modes,
                       "labels": {"none": "no adaptation", "known": "oracle prior",
                                  "unlabelled": "unlabelled (tau selector)"}}}


def _write_run(path, recipe: dict, metrics: str | None = None, ev: dict | None = None, shift: dict | None = None):
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if metrics is not None:
        (path / "metrics.jsonl").write_text(metrics)
    if ev is not None:
        (path / "eval.json").write_text(json.dumps(ev, indent=2))
    if shift is not None:
        (path / "shift_eval.json").write_text(json.dumps(shift, indent=2))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full stage-1 run (runs/s1) and a MiSLAS stage-2 run (runs/s2) started from it."""
    root = tmp_path_factory.mktemp("report")
    s1 = _write_run(root / "runs" / "s1", _recipe("demo <stage1>"), _metrics(3, test=True), _eval(), _shift())
    # relative to the directory the stage-2 run was started from (root), as `balpoe train` writes it
    s2 = _write_run(root / "runs" / "s2", _recipe("demo_stage2", 2, "runs/s1/last.pt"), _metrics(2, lr0=0.05),
                    _eval())
    return {"s1": s1, "s2": s2, "html1": write_html_report(s1), "html2": write_html_report(s2)}


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def _n_colours(rgb: np.ndarray) -> int:
    rgb = rgb.astype(np.uint32)
    return len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(s) for s in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_sections_and_numbers(runs):
    page = runs["html1"].read_text()
    assert runs["html1"] == runs["s1"] / "report.html"
    for title in SECTIONS.values():
        assert f"<h2>{title}</h2>" in page
    header = page[:page.index("<section")]
    assert "79.05%" in header and "9.42%" in header and "0.65" in header and "fashion_mnist" in header
    assert "demo &lt;stage1&gt;" in header and "0, 2" in header  # run name (escaped), taus
    groups = _section(page, "groups")
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", groups.split("<tbody>")[1], re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    assert cells[0] == ["ensemble", "", "84.99", "63.46", "87.60", "79.05"]
    assert cells[1] == ["expert 1", "0", "90.00", "50.00", "20.13", "69.20"]
    assert cells[2] == ["expert 2", "2", "71.11", "66.67", "–", "79.30"]
    assert "100 images, 2 classes" in groups and "&lt; 20 images, 1 class<" in groups  # many 2, medium 1, few 1
    shift = _section(page, "shift")
    assert "oracle prior" in shift and "<td>backward50</td>" in shift and "<td class=\"num\">70.00</td>" in shift
    rel = _section(page, "reliability")
    assert "0.75" in rel and "3.10" in rel and "&lt;not the test set&gt;" in rel
    assert "bfloat16 autocast" in _section(page, "environment")
    assert "many_threshold: 100" in _section(page, "recipe")

    s = report_sections(runs["s1"])
    assert s["per_class"]["order"] == [1, 0, 3, 2]
    assert s["per_class"]["counts"] == [500, 120, 40, 8]
    assert (s["per_class"]["n_many"], s["per_class"]["n_few"]) == (2, 1)
    assert s["per_class"]["ensemble"] == [90.0, 80.0, 60.0, 40.0]
    assert np.allclose(np.array(s["confusion"]["normalised"]).sum(1), 1.0)
    assert s["confusion"]["normalised"][0][0] == pytest.approx(0.9)  # class 1 (500 images) first
    assert s["groups"]["rows"][0]["many"] == ENS_GROUPS["many"]
    assert s["training"]["test_acc"] == [55.0, 60.0, 65.0]
    assert list(s["reliability"]) == ["none", "ts", "bcts"]
    assert s["notes"] == {}


def test_escaped(runs):
    page = runs["html1"].read_text()
    per_class = _section(page, "per_class")
    assert "<td>&lt;b&gt;Bag&lt;/b&gt; &amp; co</td>" in per_class and "<td>Sneaker $5</td>" in per_class
    assert "<b>Bag</b>" not in page
    assert "<stage1>" not in page and "<not the test set>" not in page
    # the tags the page uses, nothing else (no tag smuggled in from a file)
    tags = set(re.findall(r"</?([a-zA-Z0-9]+)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2", "p", "code",
                    "div", "nav", "a", "section", "figure", "img", "figcaption", "table", "thead", "tbody", "tr",
                    "th", "td", "br", "small", "pre", "details", "summary"}


def test_self_contained(runs):
    for key in ("html1", "html2"):
        page = runs[key].read_text()
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        assert "http://" not in page and "https://" not in page and "<script" not in page
        assert "<link" not in page and "url(" not in page
        srcs = re.findall(r'src="([^"]*)"', page)
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        hrefs = re.findall(r'href="([^"]*)"', page)
        assert all(h.startswith("#") for h in hrefs)
        pngs = _pngs(page)
        assert len(pngs) == len(srcs)
        for png in pngs:
            assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
            width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
            assert 300 <= width <= 1200 and height >= 250
    # training, per-class, groups, confusion, reliability, shift
    assert len(_pngs(runs["html1"].read_text())) == 6


def test_embedded_pngs_decode(runs):
    image = pytest.importorskip("PIL.Image")
    for png in _pngs(runs["html1"].read_text()):
        img = image.open(io.BytesIO(png))
        img.load()
        assert _n_colours(np.asarray(img.convert("RGB"))) > 20  # drawn, not blank


def test_stage2_shows_stage1_epochs(runs):
    s = report_sections(runs["s2"])
    tr = s["training"]
    assert (tr["n_stage1"], tr["n_stage2"]) == (3, 2)
    assert len(tr["loss"]) == 5 and tr["boundary"] == 3.5
    assert tr["loss"] == pytest.approx([2.0, 1.0, 2 / 3, 2.0, 1.0])
    assert tr["stage1_source"].endswith("s1/metrics.jsonl")
    page = runs["html2"].read_text()
    assert "3 stage-1 + 2 stage-2 epochs" in _section(page, "training")


def test_stage2_without_stage1_metrics(tmp_path):
    run = _write_run(tmp_path / "s2", _recipe("lonely", 2, "elsewhere/s1/last.pt"), _metrics(2))
    tr = report_sections(run)["training"]
    assert (tr["n_stage1"], tr["n_stage2"], tr["boundary"]) == (0, 2, None)
    assert "stage-1 metrics.jsonl next to elsewhere/s1/last.pt was not found" in tr["caption"]


def test_missing_optional_files(tmp_path):
    run = _write_run(tmp_path / "bare", _recipe("bare"))
    page = write_html_report(run, tmp_path / "out" / "bare.html").read_text()
    assert (tmp_path / "out" / "bare.html").is_file()
    for title in SECTIONS.values():
        assert f"<h2>{title}</h2>" in page
    assert "No metrics.jsonl in" in _section(page, "training")
    assert f"<code>balpoe eval {run}/last.pt</code> to write" in _section(page, "groups")
    assert f"<code>balpoe eval {run}/last.pt --test-dists all --adapt unlabelled</code> for label-shift results" \
        in _section(page, "shift")
    assert "<img" not in page

    # an eval.json without the analysis block (older balpoe): groups table from the top-level keys
    ev = {k: v for k, v in _eval().items() if k != "analysis"}
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "shift_eval.json").write_text(json.dumps({"distributions": {"uniform": {"acc": 79.046, "ece": 9.4}}}))
    page = write_html_report(run).read_text()
    assert "84.99" in _section(page, "groups") and "has no per-class analysis" in _section(page, "per_class")
    assert "79.05" in _section(page, "shift") and "has no accuracy curves" in _section(page, "shift")


def test_errors(tmp_path):
    with pytest.raises(BalpoeError, match=r"has no recipe.yaml: not a balpoe run directory"):
        write_html_report(tmp_path)
    run = _write_run(tmp_path / "bad", _recipe("bad"), _metrics(2) + "{\"epoch\": 3, \"loss\":\n")
    with pytest.raises(BalpoeError, match=r"metrics\.jsonl, line 3: malformed JSON"):
        write_html_report(run)
    (run / "metrics.jsonl").write_text(_metrics(2))
    (run / "eval.json").write_text("{\n  \"acc\": 1,\n  oops\n}")
    with pytest.raises(BalpoeError, match=r"eval\.json: malformed JSON at line 3"):
        write_html_report(run)
    ev = _eval()
    ev["analysis"]["per_class_acc"]["ensemble"] = [1.0, 2.0]
    (run / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(BalpoeError, match=r"per_class_acc\.ensemble must be a list of 4 values"):
        write_html_report(run)


def test_many_classes(tmp_path):
    """1000-class layout: smoothed per-class lines, no tick labels, square-root colour scale."""
    c = 1000
    counts = np.round(1280 * 0.01 ** (np.arange(c) / (c - 1))).astype(int)[::-1].tolist()  # rarest first
    rng = np.random.default_rng(0)
    acc = rng.uniform(0, 100, size=(3, c)).round(1).tolist()
    conf = (np.eye(c, dtype=int) * 30 + rng.integers(0, 2, size=(c, c))).tolist()
    ev = _eval()
    ev["analysis"].update({"class_names": [f"n{i:05d}" for i in range(c)], "class_counts": counts,
                           "taus": [0, 1, 2], "per_class_acc": {"ensemble": acc[0], "experts": acc[1:]},
                           "confusion": conf})
    run = _write_run(tmp_path / "big", _recipe("big"), _metrics(3), ev)
    page = write_html_report(run).read_text()
    s = report_sections(run)
    assert s["per_class"]["counts"][0] == 1280 and s["per_class"]["order"][0] == c - 1
    assert s["confusion"]["block"] == 5 and np.array(s["confusion"]["cells"]).shape == (200, 200)
    assert np.allclose(np.array(s["confusion"]["cells"]).sum(1), 1.0)
    assert _section(page, "per_class").count("<td>n0") == c  # the folded per-class table
    assert len(_pngs(page)) == 5  # no shift curves


def _chromium():
    if find_chromium() is None:
        pytest.skip("headless Chromium not found: apt-get install -y chromium")


def test_as_seen_in_a_browser(runs, tmp_path):
    """Chromium renders the page (screenshot not blank) and decodes every image (naturalWidth > 0)."""
    _chromium()
    image = pytest.importorskip("PIL.Image")
    shot = screenshot(runs["html1"], tmp_path / "report.png", width=1200, height=3000)
    a = np.asarray(image.open(shot).convert("RGB"))
    assert a.shape[1] == 1200 and 1000 < a.shape[0] <= 3000
    non_white = (a.min(axis=2) < 235).mean()
    colours = _n_colours(a)
    assert non_white > 0.08 and colours > 500, (non_white, colours)

    # a copy of the page with a probe that writes the number of undecoded images into the DOM
    probe = ("<script>addEventListener('load', () => { const imgs = [...document.images]; "
             "const d = document.createElement('div'); d.id = 'img-probe'; "
             "d.textContent = 'broken=' + imgs.filter(i => !i.complete || i.naturalWidth === 0).length + "
             "' total=' + imgs.length; document.body.appendChild(d); });</script>")
    pages = {"report": runs["html1"].read_text(), "stage2": runs["html2"].read_text()}
    pages["control"] = pages["stage2"].replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1)
    for name, page in pages.items():
        copy = tmp_path / f"{name}-probe.html"
        copy.write_text(page.replace("</body>", probe + "</body>"))
        r = chromium(["--dump-dom", copy.as_uri()], tmp_path / "profile")
        m = re.search(r'<div id="img-probe">broken=(\d+) total=(\d+)</div>', r.stdout)
        assert m, r.stderr[-2000:]
        broken, total = int(m.group(1)), int(m.group(2))
        assert total == page.count("<img ")
        assert broken == (1 if name == "control" else 0), name  # the control shows the probe sees a bad image
