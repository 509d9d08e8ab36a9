"""Arrow binary columns <-> numpy, without a per-row Python object or copy.

Image bytes and prepared tensors cross the JVM/Python boundary as Arrow binary columns. Building
a Python `bytes` per row (what `to_pylist()` and pandas conversion do) copies every image once
more and costs a Python object per row; these views read and write the Arrow buffers directly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def _offsets_and_data(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type != pa.binary():
        raise TypeError(f"expected an Arrow binary column, got {column.type}")
    _, offsets_buffer, data = column.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32)[column.offset : column.offset + len(column) + 1]
    values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, values


def binary_views(column: pa.Array) -> list[np.ndarray | None]:
    """Each value of a binary column as a uint8 view into the Arrow buffer (None for a null)."""
    if len(column) == 0:
        return []
    offsets, values = _offsets_and_data(column)
    valid = np.asarray(column.is_valid()) if column.null_count else None
    return [
        values[offsets[i] : offsets[i + 1]] if valid is None or valid[i] else None
        for i in range(len(offsets) - 1)
    ]


def tensors_from_binary(column: pa.Array, shape: tuple[int, int, int]) -> np.ndarray:
    """A binary column of same-size uint8 tensors as one [n, h, w, c] array, without copying."""
    n = len(column)
    size = int(np.prod(shape))
    if n == 0:
        return np.zeros((0, *shape), np.uint8)
    if column.null_count:
        raise ValueError("tensor column holds nulls; every prepared row must have a tensor")
    offsets, values = _offsets_and_data(column)
    if not np.all(np.diff(offsets) == size):
        raise ValueError(
            f"tensors must all be {size} bytes (shape {list(shape)}); prepare the images with "
            "the model's preprocessing version"
        )
    return values[offsets[0] : offsets[0] + n * size].reshape(n, *shape)


def binary_from_tensors(tensors: np.ndarray) -> pa.Array:
    """[n, ...] uint8 tensors -> a binary column of n values over the same memory, without copying."""
    data = np.ascontiguousarray(tensors, dtype=np.uint8)
    n = len(data)
    size = data[0].nbytes if n else 0
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32) if n else np.zeros(1, np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
