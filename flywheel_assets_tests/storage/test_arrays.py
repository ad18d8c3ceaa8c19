import numpy as np
import pytest

from flywheel_assets.lib.arrays import distinct


@pytest.mark.parametrize("values", [
    np.array([], np.int64), np.array([7], np.int64), np.array([3, 3, 3], np.uint64),
    np.random.default_rng(0).integers(-2**63, 2**63 - 1, 5_000, dtype=np.int64),
    np.random.default_rng(1).integers(0, 40, (300, 9)),  # repeats, and flattened as np.unique flattens
])
def test_distinct_is_np_unique(values):
    got = distinct(values)
    assert got.dtype == np.unique(values).dtype and got.tolist() == np.unique(values).tolist()
