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
  boundaries come from ``analysis.class_group`` (each class's group as evaluated).
* **Many / medium / few**: ``analysis.group_acc`` (else the ``many``/``medium``/``few`` keys of
  ``eval.json``), overall accuracy ``acc`` and ``expert_acc``.  Groups by training count as in
  Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019: many-shot
  (> many_threshold images), few-shot (< few_threshold), medium-shot otherwise; or the recipe's
  class-index ranges (``analysis.group_ranges``).
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

Modules: :mod:`~balpoe.evaluate.run_report.sections` (run folder -> the numbers of each section),
:mod:`~balpoe.evaluate.run_report.figures` (matplotlib), :mod:`~balpoe.evaluate.run_report.page`
(HTML and CSS, the file) and :mod:`~balpoe.evaluate.run_report.browser` (a screenshot in headless Chromium).
"""

from balpoe.evaluate.run_report.browser import chromium, find_chromium, screenshot
from balpoe.evaluate.run_report.page import SECTIONS, build_html, write_html_report
from balpoe.evaluate.run_report.sections import report_inputs, report_sections, stage1_metrics_path

__all__ = ["SECTIONS", "build_html", "chromium", "find_chromium", "report_inputs", "report_sections", "screenshot",
           "stage1_metrics_path", "write_html_report"]
