"""Figures the manual quotes from docs/benchmarks.md agree with it: a rerun that moves a figure
fails here until the manual says what was measured."""

from __future__ import annotations

import re

from benchmarks import run

MANUAL = (run.ROOT / "docs" / "user_manual.md").read_text()


def section(name: str) -> str:
    """A section of docs/benchmarks.md, cut by the runner's own markers."""
    found = run.sections(run.DOC.read_text())
    assert name in found, f"docs/benchmarks.md has no {name} section"
    return found[name]


def table_cell(text: str, first_cells: tuple[str, ...], column: int) -> float:
    """The number in `column` (0 = first) of the Markdown table row whose first cells are `first_cells`."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and tuple(cells[:len(first_cells)]) == first_cells:
            return float(cells[column].replace(",", ""))
    raise AssertionError(f"no table row starting {first_cells!r}")


def quoted(pattern: str) -> re.Match:
    found = re.search(pattern, MANUAL)
    assert found, f"the manual no longer says {pattern!r}: update this test with what it says now"
    return found


def test_the_manuals_monitor_time_for_a_million_predictions_is_the_benchmarks():
    measured = table_cell(section("monitor"), ("monitor computation (population, counts, statistics)",), 1)
    said = float(quoted(r"a million predictions in ([\d.]+) s on 2 cores").group(1))
    assert said == round(measured, 1)


def test_the_manuals_near_duplicate_speed_up_holds_the_benchmarks():
    measured = table_cell(section("duplicates"), ("8", "100,000"), 5)
    low, high = map(float, quoted(r"At 100,000 hashes and k = 8 that is (\d+)-(\d+)x faster").groups())
    assert low <= measured <= high
