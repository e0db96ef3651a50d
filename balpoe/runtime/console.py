"""Rich console output: the training progress bar and result tables."""

from __future__ import annotations

import math
import sys

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table
from rich.text import Text

# Not a terminal (logs, CI): rich would assume 80 columns and truncate the result tables.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 132)


class ThroughputColumn(ProgressColumn):
    """Images per second of the running task (its progress unit is images)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:,.0f} img/s", style="cyan")


def training_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    ThroughputColumn(), TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4f}"
    return str(v)


def metrics_table(title: str, rows: dict[str, dict], columns: list[str] | None = None) -> Table:
    """A table with one row per entry of ``rows`` (name -> metrics dict)."""
    columns = columns or list(next(iter(rows.values())).keys())
    # light borders and one space between columns: the 10-column result table fits 80 columns unabridged
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
    table.add_column("", style="bold", no_wrap=True)
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    for name, metrics in rows.items():
        table.add_row(name, *[_fmt(metrics.get(c, "")) for c in columns])
    return table
