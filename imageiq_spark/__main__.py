import sys

from imageiq_spark.cli import main

sys.exit(main())
