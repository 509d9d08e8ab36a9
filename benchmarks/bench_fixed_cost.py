"""The fixed cost of each batch stage: its Spark jobs and Delta commits, not its seconds alone.

Every stage runs as its CLI command does (`register_tables`, then the stage under `record_run`),
each command in a session of its own (`spark.newSession()`: what a command learns about the lake
does not carry over to the next; the JVM, and so Delta's log cache, stays warm). On one lake of
sample digits (28x28 PNGs), for ingest, preprocess, train (one epoch), evaluate, score, embed,
duplicates and monitor in turn:
- first run: the lake's first N images;
- no-op rerun: every stage again, nothing new;
- +N images: N new files in the source, every stage again;
- +N images, profiled: N more, every stage again under cProfile, to show where its seconds go: the
  calls its `run` makes, and its Delta MERGE statements beside what a stock one-row MERGE costs.
Spark jobs are counted by the job ids of the application's status tracker (no listener), Delta
commits by the new `NNN.json` files in every `_delta_log` under storage.root.

Beside it, what those jobs and commits cost by themselves, outside our code: a trivial Spark job,
a one-row Delta append, read and insert-only MERGE with the stock APIs, each the first time in a
fresh process (cold: the JVM loads and compiles Spark's and Delta's code as it goes) and then warm
(median of 5). A stage's MERGE statements beside as many stock MERGEs show what of its seconds
Delta charges whatever our code does.

`python -m benchmarks.bench_fixed_cost --images 200 [--out FILE]` runs it alone at another size.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import pstats
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


def measure_stages(workdir: Path, images: int) -> tuple[dict[str, dict[str, Cost]], dict[str, Profile]]:
    """Cost of each stage in each phase (first run, no-op rerun, +N images), then where the
    seconds of +N more go."""
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
    add_images(source, workdir / "scratch", images)
    profiles = {stage: profile(command(spark, config, stage), stage) for stage in STAGES}
    spark.stop()
    return phases, profiles


@dataclass
class Profile:
    seconds: float
    steps: list[tuple[str, float]]  # the calls the stage's `run` makes, seconds in each
    merges: int  # Delta MERGE statements run
    merge_seconds: float


def profile(action: Callable[[], Any], stage: str) -> Profile:
    """Where `action`'s seconds go: the calls of the stage's `run` (0.1 s or more), and its MERGEs."""
    from imageiq_spark.core.quiet import import_quietly
    from imageiq_spark.lake import lakehouse

    run_code = import_quietly(f"imageiq_spark.stages.{stage}").run.__code__
    merge_code = lakehouse.merge.__code__
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(action)
    seconds = time.perf_counter() - started
    found = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    run_key = (run_code.co_filename, run_code.co_firstlineno, run_code.co_name)
    steps = sorted(((name, callers[run_key][3]) for (_, _, name), (*_, callers) in found.items()
                    if run_key in callers and callers[run_key][3] >= 0.1), key=lambda step: -step[1])
    merge = found.get((merge_code.co_filename, merge_code.co_firstlineno, merge_code.co_name))
    return Profile(seconds, steps, merge[1] if merge else 0, merge[3] if merge else 0.0)


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


def report(phases: dict[str, dict[str, Cost]], profiles: dict[str, Profile], images: int,
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
    stock_merge = measured[PRIMITIVES[3]][2]
    where = [[stage, round(p.seconds, 1), "; ".join(f"`{name}` {s:.2f}" for name, s in p.steps),
              f"{p.merges} in {p.merge_seconds:.1f} s ({p.merges * stock_merge:.1f} s)" if p.merges
              else "none seen"]
             for stage, p in profiles.items()]
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
        f"Where the seconds go: +{images:,} images more, every stage again under cProfile (which adds "
        "a little to the Python side). Steps: the calls each stage's `run` makes that took 0.1 s or "
        "more, with their seconds (a step's seconds include everything it calls). MERGEs: the "
        "stage's Delta MERGE statements (the image tables' included, with the work of their source "
        "query) and, in brackets, what as many stock one-row insert-only MERGEs cost warm (the "
        "table above). cProfile sees the calling thread only: ingest writes in its stream's "
        "`foreachBatch`, on a thread of py4j's (inside `awaitTermination` here), and monitor reads "
        "one side on a thread of its own (inside `run_together`).",
        "",
        table(["stage", "s", "steps of its run: s", "MERGEs: s (stock)"], where),
        "",
    ])


def measure_all(workdir: Path, images: int) -> str:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        measured = fresh.submit(primitives, str(workdir / "primitives")).result()
    phases, profiles = measure_stages(workdir / "stages", images)
    return report(phases, profiles, images, measured)


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
