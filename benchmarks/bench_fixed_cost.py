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

Beside it, what those jobs and commits cost by themselves, outside our code: a trivial Spark job,
a one-row Delta append, read and insert-only MERGE with the stock APIs, each the first time in a
fresh process (cold: the JVM loads and compiles Spark's and Delta's code as it goes) and then warm
(median of 5). A stage's jobs and commits times these warm costs is the floor it pays for them
whatever its own code does.

`python -m benchmarks.bench_fixed_cost --images 200 [--out FILE]` runs it alone at another size.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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


#: The stock operations a stage's fixed cost is made of, in the order first run cold.
PRIMITIVES = ("a trivial Spark job (`spark.range(10).count()`)", "a one-row Delta append",
              "a Delta read (`count()` of the table)", "a one-row insert-only Delta MERGE")


def primitives(workdir: str, repeats: int = 5) -> dict[str, tuple[int, float, float]]:
    """{operation: (Spark jobs, cold seconds, warm median seconds)} in this process's first session.
    Run it in a fresh process (`spawn`), so cold means a JVM that has run nothing yet."""
    from delta.tables import DeltaTable

    from imageiq_spark.lake.session import get_spark

    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    spark = get_spark(bench_config(root / "lake"), app_name="bench-primitives")
    path = str(root / "table")

    def rows(i: int) -> Any:
        return spark.createDataFrame([(f"id-{i}", i)], "id string, n long")

    def merge(i: int) -> None:
        target = DeltaTable.forPath(spark, path).alias("t")
        target.merge(rows(10_000 + i).alias("s"), "t.id = s.id").whenNotMatchedInsertAll().execute()

    actions: dict[str, Callable[[int], Any]] = dict(zip(PRIMITIVES, (
        lambda i: spark.range(10).count(),
        lambda i: rows(i).write.format("delta").mode("append").save(path),
        lambda i: spark.read.format("delta").load(path).count(),
        merge,
    )))
    found = {}
    for name, action in actions.items():
        seconds, jobs = [], 0
        for i in range(repeats + 1):
            first, started = last_job(spark), time.perf_counter()
            action(i)
            seconds.append(time.perf_counter() - started)
            jobs = last_job(spark) - first
        found[name] = (jobs, seconds[0], statistics.median(seconds[1:]))
    spark.stop()
    return found


def floor_seconds(cost: Cost, measured: dict[str, tuple[int, float, float]]) -> float:
    """What a stage's jobs and commits cost by themselves, warm: each job as one job of the trivial
    action (its seconds over its jobs), each commit as a one-row append beyond its own jobs."""
    trivial_jobs, _, trivial = measured[PRIMITIVES[0]]
    job = trivial / max(trivial_jobs, 1)
    append_jobs, _, append = measured[PRIMITIVES[1]]
    return cost.jobs * job + sum(cost.commits.values()) * max(append - append_jobs * job, 0.0)


def report(phases: dict[str, dict[str, Cost]], images: int,
           measured: dict[str, tuple[int, float, float]]) -> str:
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
    stock = [[name, jobs, round(cold, 2), round(warm, 3)] for name, (jobs, cold, warm) in measured.items()]
    floors = [[stage] + [v for p in names[1:] for v in (
        round(phases[p][stage].seconds, 1), round(floor_seconds(phases[p][stage], measured), 1))]
        for stage in STAGES]
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
        "What the stock operations cost by themselves (one fresh process, local[2], the lake on local "
        "disk; cold: the first of each in that process, in this order; warm: median of 5 after it):",
        "",
        table(["operation", "Spark jobs", "cold: s", "warm: s"], stock),
        "",
        "Each stage's seconds beside the floor of its jobs and commits (jobs x the warm seconds of "
        "one job of the trivial action + commits x a one-row append's beyond its own job): what stock "
        "Spark and Delta charge for that many jobs and commits, run one after another, whatever the "
        "stage does in them.",
        "",
        table(["stage"] + [f"{p}: {what}" for p in names[1:] for what in ("s", "floor s")], floors),
        "",
    ])


def measure_all(workdir: Path, images: int) -> str:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        measured = fresh.submit(primitives, str(workdir / "primitives")).result()
    return report(measure_stages(workdir / "stages", images), images, measured)


def run(workdir: Path) -> str:
    return measure_all(workdir, IMAGES)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "fixed_cost")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = measure_all(args.workdir, args.images)
    if args.out:
        args.out.write_text(text)
    print(text)
