"""Datasets and models: labels, splits, the prepared store, readers, the model zoo, the classifier,
inference, metrics, drift, the champion gate and aliases."""
