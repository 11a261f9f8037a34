"""The DD report's pieces: PNG quantisation, per-row randomness of the baselines, clear errors."""

from __future__ import annotations

import llamagen
import numpy as np
import pytest

from ddjax.app import run
from ddjax.evaluate.methods import onestep_baseline
from ddjax.evaluate.report import paper_shape_checks
from ddjax.utils.images import save_image_uint8


def test_uint8_quantisation_is_torchvisions_save_image():
    """save_image((x + 1) / 2) writes floor(255 * v + 0.5) clamped to [0, 255]."""
    x = np.array([-1.5, -1.0, -1 + 1 / 255, 0.0, 1 / 255, 0.999, 1.0, 2.0], np.float32)
    v = (x + np.float32(1)) / np.float32(2)  # float32 throughout, as torch computes it
    want = np.clip(np.floor(v * np.float32(255) + np.float32(0.5)), 0, 255).astype(np.uint8)
    got = save_image_uint8(x.reshape(1, 2, 4, 1))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got.ravel(), want)
    assert got.ravel()[3] == 128  # 127.5 rounds up, as the PNG writer does


def test_onestep_draws_depend_on_the_row_not_the_batch():
    marg = np.full((2, 3, 5), 0.2, np.float32)
    code = np.eye(5, 4, dtype=np.float32)
    fn = onestep_baseline(marg, code, seed=3).fn
    rows, labels = np.arange(8), np.array([0, 1] * 4)
    whole = np.asarray(fn(None, labels, rows))
    halves = np.concatenate([np.asarray(fn(None, labels[:4], rows[:4])),
                             np.asarray(fn(None, labels[4:], rows[4:]))])
    np.testing.assert_array_equal(whole, halves)
    assert len({r.tobytes() for r in whole}) > 4  # rows differ


def test_paper_shape_checks():
    r = {"teacher": {"fid": 10.0}, "DD 1-step": {"fid": 25.0}, "DD 2-step": {"fid": 20.0},
         "teacher-involved": {"fid": 15.0}, "onestep*": {"fid": 40.0}}
    assert [ok for _, ok in paper_shape_checks(r)] == [True, True, True, False]


def test_evaluate_without_pairs_stops_clearly(tmp_path):
    """The onestep* baseline needs the pair dataset's tokens: no silent missing row."""
    config = llamagen.get_config("tiny,mode=evaluate")
    with pytest.raises(FileNotFoundError, match="no pair dataset"):
        run(config, str(tmp_path))
