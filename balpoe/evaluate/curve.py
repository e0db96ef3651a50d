"""The per-epoch test curve (``train.eval_every``) and its best epoch, from ``metrics.jsonl`` rows.

The headline of a run is always its last epoch.  The official BalPoE and MiSLAS logs also print the
best epoch on the test set ("Best Prec@1"): an optimistic figure, selected on the very images it is
reported on.  :func:`summarize_test_curve` computes it, labelled as such, so runs can be compared with those
logs; it is never the headline.  Pure Python: the run report reads it without torch.
"""

from __future__ import annotations

from balpoe.runtime.metrics_log import finite_number

#: how every output names the best-epoch figure
BEST_LABEL = "best epoch on the test set (as the official logs report; optimistic)"
#: the per-epoch test metrics a metrics.jsonl row may hold
CURVE_KEYS = ("test_acc", "test_many", "test_medium", "test_few", "test_ece")


def summarize_test_curve(rows: list[dict], every: int | None = None) -> dict | None:
    """The test curve of ``metrics.jsonl`` rows holding ``test_acc`` (None when none does):
    ``epochs``, ``acc``, the ``best_epoch`` (the first epoch with the highest accuracy, as the
    official ``is_best = acc1 > best_acc1``) with its ``best_acc`` and its other test metrics
    (``best``), and the ``last_epoch`` / ``last_acc`` of the curve; ``label`` says what the best
    figure is."""
    points = []
    for r in rows:
        epoch, acc = r.get("epoch"), finite_number(r.get("test_acc"))
        if isinstance(epoch, int) and not isinstance(epoch, bool) and acc is not None:
            points.append((epoch, acc, r))
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    best_epoch, best_acc, best_row = points[0]
    for epoch, acc, row in points[1:]:
        if acc > best_acc:
            best_epoch, best_acc, best_row = epoch, acc, row
    best = {k[len("test_"):]: finite_number(best_row.get(k)) for k in CURVE_KEYS if finite_number(best_row.get(k)) is not None}
    return {"label": BEST_LABEL, "every": every, "epochs": [p[0] for p in points], "acc": [p[1] for p in points],
            "best_epoch": best_epoch, "best_acc": best_acc, "best": best,
            "last_epoch": points[-1][0], "last_acc": points[-1][1]}
