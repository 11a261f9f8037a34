"""`init_from_teacher` against the official `DDTransformer.init_with_teacher`.

The fixture (`tests/fixtures/dd_init.*`, from `make_dd_init_fixture.py`) records, for seeded
student and teacher weights, the official student's state dict after the official init: which
tensors it took from the teacher and which it left alone, with the exact bytes of each. Here
the same seeded weights go through ddjax's converter and `init_from_teacher`; no torch needed.
"""

from __future__ import annotations

import importlib.util
import json
import os

import chex
import numpy as np
import pytest

from ddjax.convert.api import abstract_params, to_state_dict
from ddjax.student.model import init_from_teacher
from ddjax.teacher.llamagen.layers import rope_table_2d
from ddjax.utils.state_dict import torch_to_flax

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ROPE_ATOL = 1e-6  # numpy's float32 cos/sin against torch.polar's


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location(
        "make_dd_init_fixture", os.path.join(FIXTURES, "make_dd_init_fixture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_fixture_module()
with open(os.path.join(FIXTURES, "dd_init.json")) as _f:
    META = json.load(_f)


@pytest.fixture(scope="module")
def weights():
    """The seeded official-layout state dicts and their ddjax conversions."""
    s_cfg, t_cfg = fx.student_config(), fx.teacher_config()
    s_sd = fx.seeded_state_dict("dd", s_cfg, META["student_seed"], META["std"])
    t_sd = fx.seeded_state_dict("gpt", t_cfg, META["teacher_seed"], META["std"])
    for key, rec in META["tensors"].items():  # the generator still draws the fixture's inputs
        assert fx.sha256(s_sd[key]) == rec["student_sha256"], f"student {key}: regenerate dd_init"
        if rec["teacher_sha256"] is not None:
            assert fx.sha256(t_sd[key]) == rec["teacher_sha256"], f"teacher {key}: regenerate dd_init"
    student = torch_to_flax(s_sd, abstract_params("dd", s_cfg), source="seeded student")
    teacher = torch_to_flax(t_sd, abstract_params("gpt", t_cfg), source="seeded teacher")
    return s_sd, t_sd, student, teacher


def test_init_from_teacher_matches_the_official_init(weights):
    s_sd, t_sd, student, teacher = weights
    out = init_from_teacher(student, teacher)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, student)
    got = to_state_dict(out, "dd")
    assert set(got) == set(META["tensors"])
    copied = sorted(k for k, r in META["tensors"].items() if r["source"] == "teacher")
    kept = sorted(k for k, r in META["tensors"].items() if r["source"] == "student")
    # What the official init leaves at the student's own values: the continuous input and
    # output layers and the noise/data embedding.
    assert kept == ["final_layer_conti.linear.bias", "final_layer_conti.linear.weight",
                    "final_layer_conti.scale_shift_table", "n_d_embed.weight",
                    "tok_embeddings.bias", "tok_embeddings.weight"]
    assert "output.weight" in copied and "cls_embedding.embedding_table.weight" in copied
    for key in copied:
        np.testing.assert_array_equal(got[key], t_sd[key], err_msg=f"{key} not the teacher's")
    for key in kept:
        np.testing.assert_array_equal(got[key], s_sd[key], err_msg=f"{key} changed")
    bad = [k for k, r in META["tensors"].items() if fx.sha256(got[k]) != r["sha256"]]
    assert not bad, f"differ from the official init's result: {bad}"


def test_student_rope_is_the_teachers(weights):
    # The official init also hands the student the teacher's `freqs_cis`; ddjax's student
    # builds its table from the same config, which must give the same values.
    official = np.load(os.path.join(FIXTURES, "dd_init.npz"))["freqs_cis"]
    c = fx.student_config().gpt
    ours = rope_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num)
    chex.assert_shape(ours, official.shape)
    np.testing.assert_allclose(ours, official, rtol=0, atol=ROPE_ATOL)


def test_teacher_without_null_row_is_refused(weights):
    *_, student, _ = weights
    assert META["no_null_row"].startswith("raises")  # the official copy_ fails too
    cfg = fx.teacher_config(class_dropout_prob=0.0)
    teacher = torch_to_flax(fx.seeded_state_dict("gpt", cfg, 0), abstract_params("gpt", cfg))
    with pytest.raises(ValueError, match="null-class row"):
        init_from_teacher(student, teacher)
