"""DD sampling: steps, pass-through, split_t, and teacher-involved sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax.student.model import dd_config, init_from_teacher, init_params, nearest_code
from ddjax.student.sampling import StudentApply, dd_step, sample_dd, sample_teacher_involved
from ddjax.teacher.llamagen.sampling import SamplingSettings, sample

D = 8


@pytest.fixture(scope="module")
def setup(tiny_gpt):
    from conftest import random_params

    tcfg, tparams = tiny_gpt
    tcfg = dataclasses.replace(tcfg)
    cfg = dd_config(tcfg, D)
    params = random_params(init_from_teacher(init_params(cfg, jax.random.PRNGKey(0)), tparams), 4, 0.2)
    code = np.array(jax.random.normal(jax.random.PRNGKey(1), (tcfg.vocab_size, D)))
    code /= np.linalg.norm(code, axis=1, keepdims=True)
    noise = jax.random.normal(jax.random.PRNGKey(2), (4, tcfg.block_size, D))
    labels = jnp.array([0, 3, 6, 9])
    return tcfg, tparams, cfg, params, jnp.asarray(code), noise, labels


def test_one_step_equals_t_list_0_and_uses_split_t(setup):
    tcfg, _, cfg, params, code, noise, labels = setup
    student = StudentApply(cfg)
    one = dd_step(student, params, noise, noise, labels, jnp.zeros(4, jnp.int32), code, 6)
    np.testing.assert_array_equal(sample_dd(student, params, noise, labels, code, (0,), 6), one)
    cont, logits = student(params, noise, labels, jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(one[:, :6], code[jnp.argmax(logits[:, :6], -1)], atol=0)
    np.testing.assert_allclose(one[:, 6:], cont[:, 6:], atol=1e-5)  # jit vs eager rounding


def test_second_step_keeps_prefix_and_puts_original_noise_back(setup):
    tcfg, _, cfg, params, code, noise, labels = setup
    student = StudentApply(cfg)
    split, t1 = tcfg.block_size, 8
    x0 = sample_dd(student, params, noise, labels, code, (0,), split)
    two = sample_dd(student, params, noise, labels, code, (0, t1), split)
    np.testing.assert_array_equal(two[:, :t1], x0[:, :t1])  # passed through
    # the second step saw X_t = (x0[:t1], noise[t1:])
    x_t = jnp.concatenate([x0[:, :t1], noise[:, t1:]], 1)
    _, logits = student(params, x_t, labels, jnp.full(4, t1))
    np.testing.assert_array_equal(two[:, t1:], code[jnp.argmax(logits[:, t1:], -1)])


class IdentityStudent:
    """Returns its input: the logits head votes for the input's nearest code."""

    def __call__(self, params, x_t, labels, t):
        return x_t, jnp.where(jax.nn.one_hot(nearest_code(x_t, params), params.shape[0]) > 0, 0.0, -1e9)

    def __hash__(self):
        return 1

    def __eq__(self, other):
        return isinstance(other, IdentityStudent)


def test_teacher_involved_with_identity_student_reproduces_teacher_tokens(setup):
    tcfg, tparams, _, _, code, noise, labels = setup
    s, t1 = 5, 12
    settings = SamplingSettings(cfg_scale=2.0, top_k=10)
    key = jax.random.PRNGKey(3)
    out = sample_teacher_involved(IdentityStudent(), code, tparams, tcfg, noise, labels, code, key,
                                  t_list=(0, t1), teacher_start=s, split_t=tcfg.block_size,
                                  settings=settings)
    prefix = nearest_code(noise, code)[:, :s]
    teacher = sample(tparams, tcfg, labels, key, settings, prefix_ids=prefix, prefix_len=s, num_tokens=t1)
    np.testing.assert_array_equal(nearest_code(out[:, :t1], code), teacher)
    np.testing.assert_array_equal(np.asarray(teacher[:, :s]), np.asarray(prefix))
    # after t1 the final (identity) step sees the original noise and snaps it
    np.testing.assert_array_equal(nearest_code(out[:, t1:], code), nearest_code(noise[:, t1:], code))


def test_bad_t_lists(setup):
    tcfg, tparams, cfg, params, code, noise, labels = setup
    with pytest.raises(ValueError, match="start at 0"):
        sample_dd(StudentApply(cfg), params, noise, labels, code, (4,), 6)
    with pytest.raises(ValueError, match="increase"):
        sample_dd(StudentApply(cfg), params, noise, labels, code, (0, 0), 6)
    with pytest.raises(ValueError, match="teacher_start"):
        sample_teacher_involved(StudentApply(cfg), params, tparams, tcfg, noise, labels, code,
                                jax.random.PRNGKey(0), t_list=(0, 4), teacher_start=4)
