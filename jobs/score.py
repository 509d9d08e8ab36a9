"""spark-submit entry point: images without a prediction from that model version -> predictions.

    spark-submit jobs/score.py --conf conf/local.yaml [--set KEY=VALUE]... [--model URI]
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
