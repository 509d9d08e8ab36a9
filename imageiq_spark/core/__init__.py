"""The bottom layer: the config schema and registries, table schemas, tensors, the clock, redaction,
fault isolation, quiet logging."""
