"""The `imageiq` command line; `jobs/*.py` call the same `main` under spark-submit.

Exit codes: 0 done, 2 usage or config error (the message names the key or argument), 1 any
other failure. Standard output carries only results; logs and Spark's progress go to stderr.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import decimal
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imageiq_spark.core.config import DEFAULT_CONF_PATH, Config, ConfigError, load_config
from imageiq_spark.core.redact import RedactingFormatter, redact

log = logging.getLogger("imageiq_spark")

#: `run-all`, in order: duplicates before preprocess, so near-duplicates get one split.
STAGES = ("ingest", "duplicates", "preprocess", "train", "evaluate", "score")
#: Exit code of `monitor --fail-on-alert` (and jobs/nightly_score.py) when drift raised an alert.
ALERT_EXIT_CODE = 3


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--conf", metavar="FILE", default=default,
                        help="YAML config file (default conf/local.yaml)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", dest="overrides",
                        default=default if suppress else [],
                        help="override a config key (dotted path, YAML value); repeatable")
    parser.add_argument("--verbose", action="store_true", default=default if suppress else False,
                        help="keep the libraries' start-up logs (TensorFlow, CUDA probing, "
                        "warnings) in the driver and the Python workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageiq", description="Spark-native batch image recognition: ingest, preprocess, "
        "train, evaluate and score images into Delta tables tracked in MLflow."
    )
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    sample = command("sample-data", "write the bundled sample data set as DEST/<label>/*.png")
    sample.add_argument("dest", metavar="DEST")
    sample.add_argument("--per-class", type=int, default=None,
                        help="at most this many images per label (default: all 5,000 digits)")
    for name, text in (("ingest", "new images -> table images; unreadable ones -> quarantine"),
                       ("run-all", "ingest, duplicates, preprocess, train, evaluate, score")):
        sub = command(name, text)
        sub.add_argument("--source", metavar="URI", help="overrides ingest.source")
    command("preprocess", "images -> prepared")
    train = command("train", "prepared -> MLflow run and registered model version; skipped when "
                    "neither prepared's training rows nor the train config changed")
    train.add_argument("--force", action="store_true",
                       help="train even when nothing changed since the last registered version")
    for name, text in (("evaluate", "test split -> evaluations table, MLflow metrics and plots"),
                       ("score", "images without a prediction from that model -> predictions")):
        sub = command(name, text)
        sub.add_argument("--model", metavar="URI",
                         help="MLflow model URI (default models:/<mlflow.registered_model>@champion)")
    embed = command("embed", "images without an embedding from that model version -> embeddings")
    embed.add_argument("--model", metavar="URI",
                       help="MLflow model URI (default models:/<mlflow.registered_model>@champion)")
    command("duplicates", "exact / perceptual-hash / embedding near-duplicates -> near_duplicates")
    similar = command("similar", "nearest images to a file or an image_id, and a contact sheet PNG")
    similar.add_argument("image", metavar="IMAGE", help="a file path or URI, or an image_id")
    similar.add_argument("--k", type=int, default=10, help="how many neighbours (default 10)")
    command("status", "latest run of each stage, and what is pending")
    monitor = command("monitor", "profiles and drift of images and predictions per window -> "
                      "monitor_profiles, monitor_drift; breaches -> alerts")
    monitor.add_argument("--fail-on-alert", action="store_true",
                         help=f"exit {ALERT_EXIT_CODE} when the newest window breaches a threshold")
    serve = command("serve", "HTTP recognition of single images: /predict, the Open Inference "
                    "Protocol v2, an upload page at /, /metrics")
    serve.add_argument("--model", metavar="URI",
                       help="MLflow model URI (default models:/<mlflow.registered_model>@champion, "
                       "followed when the alias moves)")
    serve.add_argument("--host", help="address to listen on (overrides serve.host)")
    serve.add_argument("--port", type=int, help="TCP port (overrides serve.port)")
    promote = command("promote", "give the champion alias (registry and model_aliases) to VERSION")
    promote.add_argument("version", metavar="VERSION", help="a registered version of mlflow.registered_model")
    promote.add_argument("--reason", metavar="TEXT", required=True,
                         help="why; kept in alias_history and on the version")
    rollback = command("rollback", "give the champion alias back to the previous champion")
    rollback.add_argument("--reason", metavar="TEXT", required=True,
                          help="why; kept in alias_history and on the version")
    command("maintain", "OPTIMIZE and VACUUM every table (retention: maintain.retention_hours)")
    sql = command("sql", "run Spark SQL against the project's catalog and print the rows")
    sql.add_argument("query", metavar="QUERY")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return parser


def configure_logging(verbose: bool = False) -> None:
    from imageiq_spark.core import quiet

    if verbose:
        os.environ[quiet.VERBOSE_ENV] = "1"
    quiet.quiet_driver()
    level = os.environ.get("IMAGEIQ_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error, naming the argument
    configure_logging(args.verbose)
    try:
        config = load_config(args.conf, args.overrides)
        if getattr(args, "source", None):
            config = config.with_overrides({"ingest.source": args.source})
        log_where(args.conf, config)
        return run_command(args, config)
    except ConfigError as exc:
        print(f"imageiq: error: {redact(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imageiq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI's contract: any other failure exits 1 with its cause
        log.debug("failure", exc_info=True)
        print(f"imageiq: {args.command} failed: {type(exc).__name__}: {redact(exc)}", file=sys.stderr)
        return 1


def log_where(conf: str | None, config: Config) -> None:
    """Say which config file and which lake a command works on: a relative storage.root depends
    on the working directory."""
    from imageiq_spark.lake.session import storage_uri

    path = conf or (DEFAULT_CONF_PATH if Path(DEFAULT_CONF_PATH).is_file() else None)
    source = str(Path(path).resolve()) if path else "none (built-in defaults)"
    log.info("config file: %s; storage.root: %s", source, redact(storage_uri(config.storage.root)))


def run_command(args: argparse.Namespace, config: Config) -> int:
    if args.command == "sample-data":
        from imageiq_spark.cli.sample_data import write_sample_data

        counts = write_sample_data(args.dest, args.per_class)
        print(f"wrote {sum(counts.values())} images in {len(counts)} labels to {args.dest}")
        return 0

    if args.command == "serve":  # no Spark: the server holds only the model
        from imageiq_spark.serving import app

        app.run(config, args.model, args.host, args.port)
        return 0

    from imageiq_spark.lake.session import get_spark, platform_managed

    # A session this command starts, it stops: a local-cluster's executors then end with the
    # application instead of being killed (and restarted) by the JVM's shutdown hooks.
    owned = not platform_managed()
    spark = get_spark(config, app_name=f"imageiq {args.command}")
    try:
        return run_spark_command(args, config, spark)
    finally:
        if owned:
            spark.stop()


def run_spark_command(args: argparse.Namespace, config: Config, spark: Any) -> int:
    from imageiq_spark.lake import lakehouse

    lakehouse.register_tables(spark, config)
    if args.command == "sql":
        print_rows(spark.sql(args.query), args.format)
        return 0
    if args.command == "similar":
        from imageiq_spark.serving.similar import print_similar

        print_similar(spark, config, args.image, args.k)
        return 0
    if args.command == "status":
        from imageiq_spark.cli.status import status

        for line in status(spark, config).lines():
            print(line)
        return 0
    if args.command == "monitor":
        def exit_code(summary: Any) -> int:
            return ALERT_EXIT_CODE if args.fail_on_alert and summary.latest_alerts() else 0

        return exit_code(run_stage(spark, config, "monitor", exit_code=exit_code))
    if args.command in ("promote", "rollback"):
        from imageiq_spark.ml import aliases

        if args.command == "promote":
            run_stage(spark, config, "promote",
                      action=lambda: aliases.promote(spark, config, args.version, args.reason))
        else:
            run_stage(spark, config, "rollback", action=lambda: aliases.rollback(spark, config, args.reason))
        return 0
    stages = STAGES if args.command == "run-all" else (args.command,)
    for stage in stages:
        options = {"model_uri": args.model} if getattr(args, "model", None) else {}
        if stage == "train" and getattr(args, "force", False):
            options["force"] = True
        run_stage(spark, config, stage, **options)
    return 0


def run_stage(spark: Any, config: Config, stage: str, exit_code: Callable[[Any], int] = lambda _: 0,
              action: Callable[[], Any] | None = None, **options: Any) -> Any:
    """Run one stage's `run(spark, config)` (or `action`, for a command that is no module's `run`),
    record it in `job_runs`, print its summary to stdout."""
    from imageiq_spark.core.quiet import import_quietly
    from imageiq_spark.lake.runs import record_run

    if action is None:
        module = import_quietly(f"imageiq_spark.stages.{stage}")
        action = functools.partial(module.run, spark, config, **options)
    log.info("%s: starting", stage)
    started = time.monotonic()
    summary = record_run(spark, config, stage, action, exit_code)
    log.info("%s: done in %.1f s", stage, time.monotonic() - started)
    print(f"== {stage}")
    for line in summary.lines():  # a report may name a source or store URI
        print(redact(line))
    sys.stdout.flush()
    return summary


def _json_value(value: Any) -> Any:
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_json_value, ensure_ascii=False)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)


def print_rows(df: Any, fmt: str) -> None:
    from pyspark.sql.types import TimestampType

    from imageiq_spark.core.clock import as_utc

    columns = df.columns
    # Spark gives a TIMESTAMP as naive local time: shown in UTC, with its offset, on any machine.
    instants = [f.name for f in df.schema.fields if isinstance(f.dataType, TimestampType)]
    rows = [row.asDict(recursive=True) for row in df.toLocalIterator()]
    for row in rows:
        row.update({c: as_utc(row[c]) for c in instants if row[c] is not None})
    out = sys.stdout
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(row, default=_json_value, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_text(row[c]) for c in columns])
    else:
        cells = [[_text(row[c]) for c in columns] for row in rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")
    out.flush()
