"""spark-submit entry point: images without an embedding from that model version -> embeddings.

    spark-submit jobs/embed.py --conf conf/local.yaml [--set KEY=VALUE]... [--model URI]
"""

import sys

from imageiq_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
