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


def test_rows_at_are_takes_rows_chunk_by_chunk():
    import pyarrow as pa

    from flywheel_assets.lib.arrays import rows_at

    texts = pa.chunked_array([[f"text {i}" for i in range(start, start + 7)] for start in range(0, 35, 7)] + [[]])
    table = pa.table({"text": texts, "n": pa.chunked_array([list(range(35))])})
    for positions in ([], [0], [3, 6, 7, 20, 34], list(range(35))):
        positions = np.array(positions, np.int64)
        assert rows_at(texts, positions).to_pylist() == texts.take(positions).to_pylist()
        assert rows_at(table, positions).to_pylist() == table.take(positions).to_pylist()
    assert rows_at(texts, [1, 30]).num_chunks > 1  # (the chunks were not joined)
    with pytest.raises(ValueError, match="ascending"):
        rows_at(texts, [3, 1])
