"""The one reader of ``metrics.jsonl``: strict for a finished log (the report), lenient when resuming."""

import pytest

from balpoe.errors import BalpoeError
from balpoe.runtime.metrics_log import metrics_rows

LINES = ['{"epoch": 1, "loss": 3.0}', '{"epoch": 2, "loss": 2.0}', "", '{"epoch": 1, "loss": 2.5}',
         '{"epoch": 3, "loss": 1.5}', '{"loss": 1.0}']


def test_one_row_per_epoch_in_epoch_order_the_later_line_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    rows = metrics_rows(path)
    # epoch 1 logged twice (a resumed run): the later line; a row without an epoch counts as the next one
    assert [r["loss"] for r, _ in rows] == [2.5, 2.0, 1.5, 1.0]
    assert [line for _, line in rows] == [LINES[3], LINES[1], LINES[4], LINES[5]]
    assert [r["loss"] for r, _ in metrics_rows(path, upto=2)] == [2.5, 2.0]
    assert metrics_rows(tmp_path / "none.jsonl") == [] and metrics_rows(tmp_path / "none.jsonl", upto=3) == []


def test_a_cut_line_is_an_error_for_the_report_and_dropped_when_resuming(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(LINES[:2]) + '\n[1, 2]\n{"epoch": 3, "lo')
    with pytest.raises(BalpoeError, match=r"metrics\.jsonl, line 3: expected a JSON object, got list"):
        metrics_rows(path)
    path.write_text("\n".join(LINES[:2]) + '\n{"epoch": 3, "lo')
    with pytest.raises(BalpoeError, match=r"metrics\.jsonl, line 3: malformed JSON"):
        metrics_rows(path)
    assert [r["epoch"] for r, _ in metrics_rows(path, upto=10)] == [1, 2]
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(BalpoeError, match="symbolic link"):
        metrics_rows(link, upto=10)
