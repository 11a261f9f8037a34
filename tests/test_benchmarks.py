"""The sampling benchmarks' smoke runs: every loop variant draws the same tokens."""

from __future__ import annotations

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import sampler_variants  # noqa: E402


def test_loop_variants_draw_identical_tokens(capsys):
    """The loop before the head-major cache and the fast draw, each change alone, and the
    current loop: the same multinomial tokens (the optimisations change no draw)."""
    names = ["windows", "seqmajor", "jaxdraw", "new", "original"]
    sampler_variants.main(["--small", "--batches", "3", "--repeats", "1",
                           "--variants", ",".join(names)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("|") and "batch" not in line
            and not line.startswith("|-")]
    assert [r.split("|")[1].strip() for r in rows] == names
    assert all(re.search(r"\|\s*3/3 \|$", r) for r in rows), rows


def test_pairs_flow_overrides_name_the_bad_field():
    from benchmarks.pairs import parse_overrides

    assert parse_overrides("early_steps=10,prune_t=None,schedule=cubic") == {
        "early_steps": 10, "prune_t": None, "schedule": "cubic"}
    assert parse_overrides("") == {}
    with pytest.raises(SystemExit, match="early_step"):
        parse_overrides("early_step=10")
