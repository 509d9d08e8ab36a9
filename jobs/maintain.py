"""spark-submit entry point: OPTIMIZE and VACUUM every table (retention: maintain.retention_hours).

    spark-submit jobs/maintain.py --conf conf/local.yaml [--set KEY=VALUE]...

Run it when no other job writes the lake, e.g. weekly after the nightly jobs (docs/user_manual.md).
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
