"""ddjax.sharding's mesh errors and process blocks (the sharded runs are in tests/multidevice,
the multi-process ones in tests/test_multihost.py)."""

from __future__ import annotations

import pytest

from ddjax.sharding import make_mesh, process_rows


def test_mesh_errors():
    with pytest.raises(ValueError, match="devices"):
        make_mesh({"data": 3})
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"data": -1, "fsdp": -1})


def test_process_rows_cover_every_row_once_in_order():
    for num, count in [(32, 2), (33, 2), (5, 4), (3, 4), (1000, 3)]:
        blocks = [process_rows(num, p, count) for p in range(count)]
        assert [i for lo, hi in blocks for i in range(lo, hi)] == list(range(num))
        assert max(hi - lo for lo, hi in blocks) == -(-num // count)
