"""spark-submit entry point: new images -> table images, unreadable files -> quarantine.

    spark-submit jobs/ingest.py --conf conf/local.yaml [--set KEY=VALUE]... [--source URI]
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
