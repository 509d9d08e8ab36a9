"""Preprocess: `images` -> `prepared`, fixed-size uint8 tensors with a stable label vocabulary and split.

Each image's bytes go through `transform.prepare_batch` (the one transform shared with training,
scoring and the exported model) inside an Arrow iterator UDF. Rows are keyed by (`image_id`,
`preprocess_version`), where the version is `TransformSpec.version`, a hash of every transform
parameter: a rerun prepares only images missing at the current version, and a config change
prepares everything again under a new version beside the old one. Images that fail go to
`quarantine` with stage `preprocess` and the version; the job goes on, and later runs of that
version skip them (delete the quarantine row to retry one); a new version tries them again. An
image that kills the Python worker is found by bisection (`faults`), quarantined as
`worker_crash`, and the run goes on without it.

One pass over the pending images: the UDF's tensors go straight into an insert-only MERGE keyed
by (`image_id`, `preprocess_version`), like every other stage's writes, so a concurrent run, a
retry, or a run that started before another commit (relabel, maintain, another version) never
adds an image twice; the merge reads only the files that can hold the run's version. Each task's
`RunReport` file brings back the failures, the train split's channel sums and a random sample for
the grid, so nothing is read twice. Tensors are stored uncompressed by default
(`preprocess.compression`).

The stage's jobs live in their own modules: the UDF and its report files in `preprocess_udf`,
the `prepared` table store (reads for train and evaluate, the side tables `prepared_labels`,
`prepared_versions`, `prepared_stats`) in `prepared`, the summary and the sample grid in
`preprocess_report`, the shared table schemas in `tables`; this module runs them.

`split` is decided once per image and stored in `image_splits` (`splits.assign`: first assignment
wins, near-duplicate clusters share one split, otherwise a SHA-256 of the `image_id` mapped to
[0, 1) and cut at the configured fractions). Every preprocess version reads it back: changing
`preprocess.split` affects only images never prepared before, so an image once used for training
never lands in the test split, and twins found by `imageiq duplicates` never straddle splits.

Each run that prepares images also writes a PNG grid of a random sample of them with their labels
to `<storage.root>/reports/preprocess/samples_<version>.png` (and logs it to an active MLflow run).
"""

from __future__ import annotations

import datetime
import logging
import uuid

from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core import faults
from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import LABELS_TABLE
from imageiq_spark.lake import conflicts, lakehouse
from imageiq_spark.lake.session import session_conf
from imageiq_spark.ml import splits
from imageiq_spark.ml.prepared import (
    TAG_PREFIX,
    catch_up_run_stats,
    count_table,
    current_version,
    ensure_tables,
    latest_version,
    pending_images,
    prepared_rows,
    quarantine_failures,
    quarantine_rows,
    read_channel_stats,
    read_label_vocabulary,
    read_prepared,
    read_spec,
    store_run_stats,
    store_version,
    update_vocabulary,
    version_row,
)
from imageiq_spark.stages.preprocess.report import PreprocessSummary, grid_png, write_grid
from imageiq_spark.vision.preprocess_udf import (
    FAILURE_FIELDS,
    PrepareBatches,
    ReportFiles,
    ReportSink,
    RunReport,
    split_column,
    transform_images,
    transform_settings,
)
from imageiq_spark.vision.spec import TransformSpec

#: What callers and tests import from the stage; each lives in the module of its job.
__all__ = [
    "PrepareBatches", "PreprocessSummary", "RunReport", "current_version", "grid_png",
    "prepared_rows", "quarantine_rows", "read_channel_stats", "read_label_vocabulary",
    "read_prepared", "read_spec", "run", "split_column", "transform_images", "transform_settings",
]

log = logging.getLogger(__name__)

#: Runs whose MERGE loses a commit race start over (on the images still missing) this many times.
ATTEMPTS = 5
#: `prepared` is keyed by these; every row of one run has the same preprocess_version.
PREPARED_KEYS = ["image_id", "preprocess_version"]


def merge_prepared(
    spark: SparkSession,
    config: Config,
    spec: TransformSpec,
    todo: DataFrame,
    ids: DataFrame,
    report: ReportSink,
    prepared_at: datetime.datetime,
    tag: str,
) -> int:
    """Transform `todo` (whose image ids `ids` holds) and insert the tensors `prepared` lacks, in
    one pass; returns the rows inserted. What the UDF saw goes to the `report` sink.

    An insert-only MERGE on (image_id, preprocess_version) with the version as a literal, so only
    the files that can hold this version are read for the match. One attempt: a commit that loses
    to a concurrent writer raises, and `run` starts over on the images still missing rather than
    transforming all of them again. (Delta skips materialising the source of an insert-only
    MERGE, so the UDF runs once.)"""
    labels = {r["label"] for r in todo.select("label").distinct().collect() if r["label"] is not None}
    update_vocabulary(spark, config, labels)
    stored_splits = splits.assign(spark, config, ids)
    outcome = transform_images(todo, spec, config, report, stored_splits)
    rows = prepared_rows(outcome.filter(F.col("reason").isNull()),
                         lakehouse.read_table(spark, config, LABELS_TABLE), spec, F.lit(prepared_at))
    settings = {
        **transform_settings(config),
        "spark.sql.parquet.compression.codec": config.preprocess.compression,
        **lakehouse.ROW_GROUP_SETTINGS,
    }
    # The tag names the run's commit: `catch_up_run_stats` finds its rows by it.
    with session_conf(spark, {**settings, "spark.databricks.delta.commitInfo.userMetadata": tag}):
        return lakehouse.merge_new_rows(config, "prepared", rows, PREPARED_KEYS, attempts=1,
                                        pinned={"preprocess_version": spec.version})


def prepare_pending(
    spark: SparkSession,
    config: Config,
    spec: TransformSpec,
    todo: DataFrame,
    ids: DataFrame,
    prepared_at: datetime.datetime,
    tag: str,
) -> tuple[int, RunReport]:
    """`merge_prepared` over `todo` and what its UDF saw; images that kill a Python worker are
    left out of the merge and come back among the report's failures as `worker_crash`."""

    def attempt(crashed: list[str]) -> tuple[int, RunReport]:
        reports = ReportFiles(lakehouse.lake_path(config, "staging", "preprocess_reports", uuid.uuid4().hex))
        rows = faults.restrict(todo, "image_id", crashed, keep=False) if crashed else todo
        try:
            written = merge_prepared(spark, config, spec, rows, ids, reports, prepared_at, tag)
        finally:
            report = reports.take()
        return written, report

    (written, report), crashed = faults.survive_worker_crashes(
        attempt,
        lambda: sorted(r.image_id for r in todo.select("image_id").collect()),
        lambda subset: transform_images(faults.restrict(todo, "image_id", subset, keep=True), spec,
                                        config).count(),
        "preprocess",
    )
    if crashed:
        victims = faults.restrict(todo.select(*FAILURE_FIELDS[:4]), "image_id", crashed, keep=True)
        report.failures += [(*row, faults.WORKER_CRASH, "the Python worker process died transforming it")
                            for row in victims.collect()]
    return written, report


def run(spark: SparkSession, config: Config) -> PreprocessSummary:
    """Prepare every image of `images` not yet in `prepared` at the current preprocess_version.

    One pass: the UDF's tensors go straight into an insert-only MERGE into `prepared`, and
    RunReport files bring back its failures (quarantined), the train split's channel sums and a
    random sample for the grid. Whatever else commits to `prepared` meanwhile (a concurrent run
    of any version, relabel, maintain), each image is added once per version: the MERGE skips
    rows already there, and a MERGE that loses a commit race starts over on the images still
    missing. The channel sums of the report count only when the MERGE inserted every row the UDF
    made; otherwise (a concurrent run inserted some first) they are summed from this run's rows
    in the table (`catch_up_run_stats`).
    """
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError(
            f"table images does not exist under storage.root '{config.storage.root}': "
            "run `imageiq ingest` first"
        )
    spec = TransformSpec.from_config(config)
    summary = PreprocessSummary(version=spec.version)
    ensure_tables(spark, config)
    # One timestamp names this run's rows, and its statistics row.
    prepared_at = utc_now()
    tag = f"{TAG_PREFIX}{spec.version}:{prepared_at.isoformat()}#{uuid.uuid4().hex}"
    report = RunReport()
    own_sums = True  # whether the report's channel sums are exactly those of this run's rows
    for attempt in range(1, ATTEMPTS + 1):
        start_version = latest_version(spark, config, "prepared")
        with pending_images(spark, config, spec, start_version) as pending:
            if not pending.count:
                break
            log.info("preprocess: %d images to prepare at version %s", pending.count, spec.version)
            if attempt == 1 and version_row(spark, config, spec.version) is None:
                # Before the tensors: rows of a version always have its spec (a no-op run skips this).
                store_version(spark, config, spec)
            summary.watch.work()
            try:
                written, attempt_report = prepare_pending(spark, config, spec, pending.rows, pending.ids,
                                                          prepared_at, tag)
            except PySparkException as exc:
                if not conflicts.is_conflict(exc):
                    raise
                log.warning("preprocess: a concurrent commit to prepared won (%s); attempt %d of %d",
                            type(exc).__name__, attempt, ATTEMPTS)
                continue
            made = pending.count - len({failure[0] for failure in attempt_report.failures})
        summary.watch.done()
        summary.prepared, report = written, attempt_report
        summary.quarantined.update(quarantine_failures(spark, config, report.failures, prepared_at,
                                                         spec.version))
        if written < made:
            # A concurrent run inserted some of these images first: the report's sums hold them too.
            log.info("preprocess: %d of %d images were prepared by a concurrent run first",
                     made - written, made)
            own_sums = False
        break
    else:
        raise RuntimeError(f"preprocess: {ATTEMPTS} attempts lost to concurrent runs of version "
                           f"{spec.version}; run it again")
    if summary.prepared:
        if own_sums:
            store_run_stats(spark, config, spec, {prepared_at: report})
        summary.grid = write_grid(config, spec, report.sample)
    catch_up_run_stats(spark, config, spec)
    summary.split_counts, summary.class_counts = count_table(spark, config, spec.version)
    summary.watch.stop()
    return summary
