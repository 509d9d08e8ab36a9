"""The fixed cost of each batch stage: its Spark jobs and Delta commits, not its seconds alone.

Every stage runs as its CLI command does (`register_tables`, then the stage under `record_run`),
each command in a session of its own (`spark.newSession()`: what a command learns about the lake
does not carry over to the next; the JVM, and so Delta's log cache, stays warm). On one lake of
sample digits (28x28 PNGs), for ingest, preprocess, train (one epoch), evaluate, score, embed,
duplicates and monitor in turn:
- first run: the lake's first N images;
- no-op rerun: every stage again, nothing new;
- +N images: N new files in the source, every stage again.
Spark jobs are counted by the job ids of the application's status tracker (no listener), Delta
commits by the new `NNN.json` files in every `_delta_log` under storage.root.

`python -m benchmarks.bench_fixed_cost --images 200 [--out FILE]` runs it alone at another size.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_SPARK_CONF, bench_config, table

IMAGES = 2_000
STAGES = ("ingest", "preprocess", "train", "evaluate", "score", "embed", "duplicates", "monitor")
COMMIT = re.compile(r"^\d{20}\.json$")
#: The status tracker keeps this many jobs; a stage must not run more between two readings.
RETAINED_JOBS = 100_000


@dataclass
class Cost:
    jobs: int
    commits: Counter[str]
    seconds: float


def commits(root: Path) -> Counter[str]:
    """Commit files per table (its folder's name) under `root`."""
    found: Counter[str] = Counter()
    for log in root.rglob("_delta_log"):
        found[log.parent.name] += sum(1 for f in log.iterdir() if COMMIT.match(f.name))
    return found


def last_job(spark: Any) -> int:
    """The highest job id so far: jobs are numbered in the order they start, job groups or not."""
    tracker = spark.sparkContext.statusTracker()
    return max(tracker.getJobIdsForGroup(None) or [-1])


def measure(spark: Any, lake: Path, action: Callable[[], Any]) -> Cost:
    jobs, before, started = last_job(spark), commits(lake), time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    return Cost(last_job(spark) - jobs, commits(lake) - before, seconds)


def command(spark: Any, config: Any, stage: str) -> Callable[[], Any]:
    """What `imageiq <stage>` runs once its session has started."""
    from imageiq_spark.core.quiet import import_quietly
    from imageiq_spark.lake import lakehouse
    from imageiq_spark.lake.runs import record_run

    def run() -> Any:
        session = spark.newSession()
        lakehouse.register_tables(session, config)
        module = import_quietly(f"imageiq_spark.stages.{stage}")
        return record_run(session, config, stage, lambda: module.run(session, config))

    return run


def add_images(source: Path, scratch: Path, count: int) -> None:
    """`count` more sample digits into `source` (the first `count` of the set are there already)."""
    from imageiq_spark.cli.sample_data import write_sample_data

    shutil.rmtree(scratch, ignore_errors=True)
    write_sample_data(scratch, per_class=(count + len(list(source.rglob("*.png")))) // 10)
    for path in sorted(scratch.rglob("*.png")):
        target = source / path.relative_to(scratch)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)


def measure_stages(workdir: Path, images: int) -> dict[str, dict[str, Cost]]:
    """Cost of each stage in each phase: first run, no-op rerun, +N images."""
    from imageiq_spark.cli.sample_data import write_sample_data
    from imageiq_spark.lake.session import get_spark

    shutil.rmtree(workdir, ignore_errors=True)
    source, lake = workdir / "src", workdir / "lake"
    config = bench_config(lake, ingest={"source": str(source)},
                          train={"epochs": 1, "batch_size": 16, "shuffle_buffer": 64},
                          mlflow={"registered_model": "fixed_cost"},
                          spark_conf={**BENCH_SPARK_CONF, "spark.ui.retainedJobs": str(RETAINED_JOBS)})
    spark = get_spark(config, app_name="bench-fixed-cost")
    write_sample_data(source, per_class=images // 10)
    phases: dict[str, dict[str, Cost]] = {}
    for phase in ("first run", "no-op rerun", f"+{images} images"):
        if phase.startswith("+"):
            add_images(source, workdir / "scratch", images)
        phases[phase] = {stage: measure(spark, lake, command(spark, config, stage)) for stage in STAGES}
    spark.stop()
    return phases


def report(phases: dict[str, dict[str, Cost]], images: int) -> str:
    names = list(phases)
    header = ["stage"] + [f"{p}: {what}" for p in names for what in ("jobs", "commits", "s")]
    rows = [[stage] + [v for p in names for v in (phases[p][stage].jobs,
                                                   sum(phases[p][stage].commits.values()),
                                                   round(phases[p][stage].seconds, 1))]
            for stage in STAGES]
    rows.append(["all stages"] + [v for p in names for v in (
        sum(c.jobs for c in phases[p].values()), sum(sum(c.commits.values()) for c in phases[p].values()),
        round(sum(c.seconds for c in phases[p].values()), 1))])
    detail = [f"- {stage}: " + "; ".join(
        f"{p}: " + (", ".join(f"{t} {n}" for t, n in sorted(phases[p][stage].commits.items())) or "none")
        for p in names[1:]) for stage in STAGES]
    return "\n".join([
        f"## Fixed cost: Spark jobs and Delta commits per stage ({images:,} images, +{images:,})",
        "",
        "Each stage as its CLI command runs it (`register_tables`, the stage, its `job_runs` row), "
        "each command in a session of its own on one warm local[2] JVM; sample digits (28x28 PNGs), "
        "train one epoch. Jobs: Spark jobs started; commits: new Delta commits under storage.root "
        "(`job_runs` included).",
        "",
        table(header, rows),
        "",
        "Commits per table (no-op rerun; +N images):",
        "",
        *detail,
        "",
    ])


def run(workdir: Path) -> str:
    return report(measure_stages(workdir, IMAGES), IMAGES)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "fixed_cost")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = report(measure_stages(args.workdir, args.images), args.images)
    if args.out:
        args.out.write_text(text)
    print(text)
