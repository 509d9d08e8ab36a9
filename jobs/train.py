"""spark-submit entry point: prepared -> MLflow run, registered model version, alias.

    spark-submit jobs/train.py --conf conf/local.yaml [--set KEY=VALUE]...
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
