"""The one printer of stage summaries: `label: value` rows with their values in one column, and the
stopwatch whose `elapsed` row says where a stage's time went."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

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


@dataclass
class Stopwatch:
    """Where a stage's time went, as its summary shows it: the fixed part before the first image is
    worked on (start-up of the stage, finding what is pending, tables), then the rate of the work.

    Wall-clock seconds (`time.time`), so a mark made in another process (a micro-batch of a
    streaming query) counts too.
    """

    started: float = field(default_factory=time.time)
    #: When the first image was worked on; None while (or when) there was nothing to work on.
    working: float | None = None
    #: When the last image was done, where the stage has work after it (statistics, reports).
    finished: float | None = None
    stopped: float | None = None

    def work(self, at: float | None = None) -> None:
        """Mark the start of the work (now, or at the earliest of the times marked)."""
        at = time.time() if at is None else at
        self.working = at if self.working is None else min(self.working, at)

    def done(self) -> None:
        """Mark the end of the work: what follows (statistics, reports, records) is shown apart."""
        self.finished = time.time()

    def stop(self) -> float:
        """Stop the watch; the seconds since it started."""
        self.stopped = time.time()
        return self.elapsed_s

    @property
    def elapsed_s(self) -> float:
        return (self.stopped or time.time()) - self.started

    def row(self, count: int, unit: str = "images") -> Row:
        """The summary's `elapsed` row: the total, split into the fixed part before the first of
        `count` items (images, predictions) was worked on, their pace and, where marked `done`, the
        part after the last."""
        total = f"{self.elapsed_s:.1f} s"
        if self.working is None or not count:
            return ("elapsed", f"{total}, nothing to work on")
        one = unit.removesuffix("s")
        fixed = self.working - self.started
        end = self.finished or self.stopped or time.time()
        work = max(end - self.working, 1e-9)
        # Under one a second (one moved file, a loaded machine) a rate would print as 0.0.
        pace = f"{count / work:.1f} {unit}/s" if work <= count else f"{work / count:.1f} s per {one}"
        text = f"{total}: {fixed:.1f} s before the first {one}, then {pace}"
        if self.finished is not None:
            text += f", {(self.stopped or time.time()) - end:.1f} s after the last"
        return ("elapsed", text)
