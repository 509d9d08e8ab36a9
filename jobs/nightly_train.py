"""spark-submit entry point for the nightly training run: ingest, duplicates, preprocess, train, evaluate.

    spark-submit [SPARK OPTIONS] jobs/nightly_train.py [--conf FILE] [--set KEY=VALUE]... [--source URI]

Each stage runs through the same `imageiq` command line code in one Spark application; the run
stops at the first stage that fails and exits with its code (2 config error, 1 other failure).
`--master` and the other cluster settings are spark-submit's.
"""

import argparse
import sys

from imageiq_spark.cli import main

STAGES = ("ingest", "duplicates", "preprocess", "train", "evaluate")


def nightly(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nightly_train.py", description=" -> ".join(STAGES))
    parser.add_argument("--conf", metavar="FILE", help="YAML config file (default conf/local.yaml)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override a config key (dotted path, YAML value); repeatable")
    parser.add_argument("--source", metavar="URI", help="overrides ingest.source")
    args = parser.parse_args(argv)
    common = (["--conf", args.conf] if args.conf else []) + [
        item for override in args.overrides for item in ("--set", override)
    ]
    for stage in STAGES:
        extra = ["--source", args.source] if stage == "ingest" and args.source else []
        code = main([*common, stage, *extra])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(nightly(sys.argv[1:]))
