"""The one printer of stage summaries: `label: value` rows with their values in one column."""

from __future__ import annotations

from collections.abc import Iterable

#: A `(label, value)` row, or a line of its own (a table row, an alert under its count) kept as written.
Row = tuple[str, object] | str

#: The narrowest label column (colon included): summaries printed one after another by `run-all`
#: keep their values in the same column.
NARROWEST = 13
#: The widest label column: a longer label (one naming a date or a version) overflows by itself
#: rather than pushing every other value right.
WIDEST = 24


def text(value: object) -> str:
    """A plain value as every summary shows it: floats (accuracies, losses) with 4 decimals."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def aligned(rows: Iterable[Row]) -> list[str]:
    """`label: value` lines, each label padded to one width; an empty value leaves a heading."""
    rows = list(rows)
    labels = [len(row[0]) + 1 for row in rows if not isinstance(row, str)]
    width = max([NARROWEST, *(n for n in labels if n <= WIDEST)])
    return [row if isinstance(row, str) else f"{row[0] + ':':<{width}} {text(row[1])}".rstrip()
            for row in rows]
