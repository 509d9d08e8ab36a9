"""Arrow binary columns <-> numpy: values, shapes, nulls, slices, and no copies where promised."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from imageiq_spark.core.tensors import binary_from_tensors, binary_views, tensors_from_binary

X = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)


def test_tensors_are_read_from_arrow_as_one_array_without_a_copy():
    column = pa.array([X[0].tobytes(), X[1].tobytes()], pa.binary())
    got = tensors_from_binary(column, (4, 4, 3))
    np.testing.assert_array_equal(got, X)
    assert not got.flags.owndata  # a view of the Arrow buffer
    np.testing.assert_array_equal(tensors_from_binary(column.slice(1), (4, 4, 3)), X[1:])


def test_tensors_of_the_wrong_size_are_refused_with_the_expected_size():
    with pytest.raises(ValueError, match="must all be 48 bytes"):
        tensors_from_binary(pa.array([b"\x00" * 47], pa.binary()), (4, 4, 3))


def test_tensors_become_a_binary_column_over_the_same_memory():
    column = binary_from_tensors(X)
    assert column.type == pa.binary() and column.to_pylist() == [X[0].tobytes(), X[1].tobytes()]
    assert column.buffers()[2].address == X.ctypes.data  # wrapped, not copied
    assert binary_from_tensors(np.zeros((0, 4, 4, 3), np.uint8)).to_pylist() == []


def test_binary_values_are_viewed_in_place_and_nulls_stay_none():
    column = pa.array([b"ab", None, b"", b"xyz"], pa.binary()).slice(1)
    views = binary_views(column)
    assert views[0] is None
    assert [bytes(v) for v in views[1:]] == [b"", b"xyz"]
    assert binary_views(pa.array([], pa.binary())) == []
