"""spark-submit entry point: exact / perceptual-hash / embedding near-duplicates -> near_duplicates.

    spark-submit jobs/duplicates.py --conf conf/local.yaml [--set KEY=VALUE]...
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["duplicates", *sys.argv[1:]]))
