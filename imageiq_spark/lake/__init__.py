"""The embedded lakehouse: Spark session, storage, Delta tables, run records, leases, MLflow tracking."""
