"""spark-submit entry point: test split -> evaluations table, MLflow metrics and plots.

    spark-submit jobs/evaluate.py --conf conf/local.yaml [--set KEY=VALUE]... [--model URI]
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
