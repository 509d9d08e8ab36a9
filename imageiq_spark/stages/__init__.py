"""One module (or package) per stage, each with one `run(spark, config)`; stages never import each other."""
