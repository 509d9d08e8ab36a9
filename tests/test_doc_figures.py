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


def row_cells(line: str) -> list[str]:
    """The cells of one Markdown table row."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_cell(text: str, first_cells: tuple[str, ...], column: int) -> float:
    """The number in `column` (0 = first) of the Markdown table row whose first cells are `first_cells`."""
    for line in text.splitlines():
        cells = row_cells(line)
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


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `text` whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {header_start}")), None)
    assert start is not None, f"no table whose header starts {header_start!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(row_cells(line))
    return rows


def test_the_platform_pages_sizing_table_and_worked_example_are_the_benchmarks():
    measured = section("sizing")
    platforms = (run.ROOT / "docs" / "platforms.md").read_text()
    header = "stage | fixed cost per run, s"
    assert table_rows(platforms, header) == table_rows(measured, header)
    example = re.search(r"Worked example: [^\n]+", measured)
    assert example and example.group(0) in platforms


def test_the_platform_pages_storage_and_executor_factors_are_the_cluster_sections():
    measured = section("cluster")
    platforms = (run.ROOT / "docs" / "platforms.md").read_text()
    s3 = table_cell(measured, ("whole command",), 4)
    separate = table_cell(measured, ("whole command",), 5)
    said = re.search(r"took ([\d.]+)x as long with the lake on\s+S3", platforms)
    assert said and float(said.group(1)) == round(s3, 2)
    said = re.search(r"and ([\d.]+)x with executors in JVMs of their own", platforms)
    assert said and float(said.group(1)) == round(separate, 2)
