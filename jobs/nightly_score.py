"""spark-submit entry point for the nightly scoring run: ingest new images, score them, monitor.

    spark-submit [SPARK OPTIONS] jobs/nightly_score.py [--conf FILE] [--set KEY=VALUE]...
        [--source URI] [--model URI]

`--model` defaults to `models:/<mlflow.registered_model>@champion`. The stages run in one Spark
application; the run stops at the first stage that fails and exits with its code (2 config error,
1 other failure), or exits 3 when monitoring raised an alert for the newest window, so that the
scheduler pages someone. `--master` and the other cluster settings are spark-submit's.
"""

import argparse
import sys

from imageiq_spark.cli import main

STAGES = ("ingest", "score", "monitor")


def nightly(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nightly_score.py", description=" -> ".join(STAGES))
    parser.add_argument("--conf", metavar="FILE", help="YAML config file (default conf/local.yaml)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a config key (dotted path, YAML value); repeatable")
    parser.add_argument("--source", metavar="URI", help="overrides ingest.source")
    parser.add_argument("--model", metavar="URI",
                        help="MLflow model URI (default models:/<mlflow.registered_model>@champion)")
    args = parser.parse_args(argv)
    common = (["--conf", args.conf] if args.conf else []) + [
        item for override in args.overrides for item in ("--set", override)
    ]
    stage_options = {
        "ingest": ["--source", args.source] if args.source else [],
        "score": ["--model", args.model] if args.model else [],
        "monitor": ["--fail-on-alert"],
    }
    for stage in STAGES:
        code = main([*common, stage, *stage_options[stage]])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(nightly(sys.argv[1:]))
