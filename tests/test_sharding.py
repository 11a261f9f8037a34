"""ddjax.sharding's mesh errors (the sharded runs are in tests/multidevice)."""

from __future__ import annotations

import pytest

from ddjax.sharding import make_mesh


def test_mesh_errors():
    with pytest.raises(ValueError, match="devices"):
        make_mesh({"data": 3})
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"data": -1, "fsdp": -1})
