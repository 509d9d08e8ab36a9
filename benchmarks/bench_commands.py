"""Commands as a user types them on the demo lake: a cold `imageiq status`, a cold `imageiq sql`, and
a warm no-op `imageiq run-all` (nothing new), each a process of its own, start-up included.

The demo lake is `make demo`'s: the sample digits, then `run-all` with the defaults. Each checkout
measured gets a copy of that lake, runs `run-all` once untimed (a checkout may find work another
left, such as its own evaluation), then every command `REPEATS` times; medians. "Before" is the
checkout named by `IMAGEIQ_BENCH_BEFORE` (a `git worktree` of the commit before the fixed-cost work,
2a055e6, in the published run), run in this venv; without it only this checkout is measured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import median, table

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
SQL = "SELECT count(*) AS near_duplicate_pairs FROM imageiq.near_duplicates"
COMMANDS = {
    "cold `imageiq status`": ["status"],
    "cold `imageiq sql` (one of make demo's queries)": ["sql", SQL],
    "warm no-op `imageiq run-all` (nothing new)": ["run-all"],
}


def imageiq(checkout: Path, lake: Path, sample: Path, *arguments: str) -> float:
    """Seconds of one `imageiq` process of `checkout` on `lake`; fails loudly with its stderr."""
    command = [sys.executable, "-m", "imageiq_spark", "--set", f"storage.root={lake}",
               "--set", f"ingest.source={sample}", *arguments]
    started = time.perf_counter()
    # Another checkout has no jars of its own: it uses this one's.
    env = {"IMAGEIQ_JARS_DIR": str(ROOT / "jars"), **os.environ, "PYTHONPATH": str(checkout)}
    result = subprocess.run(command, cwd=lake.parent, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} in {checkout} exited {result.returncode}: "
                           f"{result.stderr[-3000:]}")
    return seconds


def measure(checkout: Path, demo: Path, workdir: Path, sample: Path) -> dict[str, float]:
    lake = workdir / f"lake-{checkout.name}"
    shutil.copytree(demo, lake)
    imageiq(checkout, lake, sample, "run-all")
    return {name: median([imageiq(checkout, lake, sample, *arguments) for _ in range(REPEATS)])
            for name, arguments in COMMANDS.items()}


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    sample, demo = workdir / "sample", workdir / "demo-lake"
    demo_seconds = {"sample-data": imageiq(ROOT, demo, sample, "sample-data", str(sample))}
    demo_seconds["run-all (first)"] = imageiq(ROOT, demo, sample, "run-all")
    checkouts = {"after": ROOT}
    before = os.environ.get("IMAGEIQ_BENCH_BEFORE")
    if before:
        checkouts["before"] = Path(before).resolve()
    seconds = {label: measure(checkout, demo, workdir, sample) for label, checkout in checkouts.items()}
    header = ["command", *(f"{label}: s" for label in checkouts)]
    if "before" in seconds:
        header.append("after / before")
    rows = []
    for name in COMMANDS:
        row = [name, *(round(seconds[label][name], 1) for label in checkouts)]
        if "before" in seconds:
            row.append(round(seconds["after"][name] / seconds["before"][name], 2))
        rows.append(row)
    before_note = (f"before: the checkout at `{checkouts['before']}` "
                   f"({commit_of(checkouts['before'])}), in this venv" if before else
                   "no before checkout given (`IMAGEIQ_BENCH_BEFORE`)")
    demo_note = (f"`make demo`'s lake (the sample digits, `run-all` with the defaults: "
                 f"{demo_seconds['sample-data']:.0f} s and {demo_seconds['run-all (first)']:.0f} s here)")
    return (
        "## Commands on the demo lake (cold `status`, cold `sql`, warm no-op `run-all`)\n\n"
        f"{demo_note}; each command one `imageiq` process, start-up included, median of {REPEATS} "
        f"after one untimed `run-all` on a copy of the lake per checkout; {before_note}.\n\n"
        + table(header, rows)
        + "\n\nReproduce: `git worktree add --detach /tmp/before 2a055e6 && "
        "IMAGEIQ_BENCH_BEFORE=/tmp/before python -m benchmarks.run commands`.\n")


def commit_of(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)
    return result.stdout.strip() or "not a git checkout"
