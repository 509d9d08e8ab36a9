"""ImageIQ: Spark-native distributed batch image recognition."""

__version__ = "0.1.0"
