"""spark-submit entry point: images -> prepared (fixed-size tensors, labels, stable split).

    spark-submit jobs/preprocess.py --conf conf/local.yaml [--set KEY=VALUE]...
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
