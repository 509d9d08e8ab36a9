"""spark-submit entry point: profiles and drift of the champion's predictions -> monitor_* tables.

    spark-submit jobs/monitor.py --conf conf/local.yaml [--set KEY=VALUE]... [--fail-on-alert]

Exits 3 with `--fail-on-alert` when the newest window breached a threshold (docs/user_manual.md).
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]]))
