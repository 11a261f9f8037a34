"""DD sampling: steps, pass-through, split_t, and teacher-involved sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import teacher_of

from ddjax.student.model import dd_config, init_from_teacher, init_params, nearest_code
from ddjax.student.sampling import StudentApply, dd_step, sample_dd, sample_teacher_involved
from ddjax.teacher.base import row_key_inputs, row_keyed_multinomial, row_keys
from ddjax.teacher.llamagen.gpt import GPT
from ddjax.teacher.llamagen.sampling import SamplingSettings, guide, process_logits, sample

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
    keys = row_keys(jax.random.PRNGKey(3), np.arange(4))
    teacher = teacher_of(tcfg, tparams, np.asarray(code))
    out = sample_teacher_involved(IdentityStudent(), code, teacher, noise, labels, keys,
                                  t_list=(0, t1), teacher_start=s, split_t=tcfg.block_size,
                                  settings=settings)
    prefix = nearest_code(noise, code)[:, :s]
    want = sample(tparams, tcfg, labels, jax.random.PRNGKey(0), settings, prefix_ids=prefix, prefix_len=s,
                  num_tokens=t1, rule=row_keyed_multinomial, rule_inputs=row_key_inputs(keys, t1))
    np.testing.assert_array_equal(nearest_code(out[:, :t1], code), want)
    np.testing.assert_array_equal(np.asarray(want[:, :s]), np.asarray(prefix))
    # after t1 the final (identity) step sees the original noise and snaps it
    np.testing.assert_array_equal(nearest_code(out[:, t1:], code), nearest_code(noise[:, t1:], code))


def test_teacher_involved_rows_draw_by_their_own_key_whatever_the_batch(setup):
    """Each global row's randomness depends on (key, row) alone: the same images at any
    evaluation batch size, and two batches never share draws (a batch-level key would give
    every batch the same Gumbel noise per (row, position))."""
    tcfg, tparams, _, _, code, _, _ = setup
    teacher = teacher_of(tcfg, tparams, np.asarray(code))
    settings = SamplingSettings(cfg_scale=1.0)  # keep the distributions wide
    n = 8
    noise = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(9), (1, tcfg.block_size, D)),
                             (n, tcfg.block_size, D))  # every row: the same input
    labels = jnp.full((n,), 2)
    key = jax.random.PRNGKey(4)

    def run(rows):
        return np.asarray(nearest_code(sample_teacher_involved(
            IdentityStudent(), code, teacher, noise[: len(rows)], labels[: len(rows)],
            row_keys(key, rows), t_list=(0, 12), teacher_start=3, split_t=tcfg.block_size,
            settings=settings), code))

    whole = run(np.arange(n))
    halves = np.concatenate([run(np.arange(4)), run(np.arange(4, 8))])
    np.testing.assert_array_equal(whole, halves)
    # rows 0-3 and 4-7 see identical inputs: with a key per batch they would repeat exactly
    assert not np.array_equal(halves[:4, 3:12], halves[4:, 3:12])
    assert len({r.tobytes() for r in whole[:, 3:12]}) == n


def test_cfg_interval_counts_from_the_end_of_the_prefix(setup):
    """As the official intermediate_generate: with a prefix of s tokens, guidance applies to
    positions s .. s + cfg_interval + 1 and the plain conditional after (greedy, checked
    against the teacher-forcing distributions)."""
    tcfg, tparams, _, _, _, _, labels = setup
    s_len, interval = 6, 3
    settings = SamplingSettings(cfg_scale=4.0, cfg_interval=interval, greedy=True)
    prefix = jax.random.randint(jax.random.PRNGKey(5), (4, s_len), 0, tcfg.vocab_size)
    tokens = np.asarray(sample(tparams, tcfg, labels, jax.random.PRNGKey(0), settings,
                               prefix_ids=prefix, prefix_len=s_len))
    model = GPT(tcfg)
    cond = model.apply({"params": tparams}, jnp.asarray(tokens), labels)
    uncond = model.apply({"params": tparams}, jnp.asarray(tokens), jnp.full_like(labels, tcfg.num_classes))
    guided = np.asarray(jnp.argmax(process_logits(guide(cond, uncond, 4.0), settings), -1))
    plain = np.asarray(jnp.argmax(process_logits(cond, settings), -1))
    last_guided = s_len + interval + 1
    np.testing.assert_array_equal(tokens[:, s_len:last_guided + 1], guided[:, s_len:last_guided + 1])
    np.testing.assert_array_equal(tokens[:, last_guided + 1:], plain[:, last_guided + 1:])
    # the two rules disagree somewhere on both sides, so the test can tell them apart
    assert (guided[:, s_len:last_guided + 1] != plain[:, s_len:last_guided + 1]).any()
    assert (guided[:, last_guided + 1:] != plain[:, last_guided + 1:]).any()


def test_bad_t_lists(setup):
    tcfg, tparams, cfg, params, code, noise, labels = setup
    with pytest.raises(ValueError, match="start at 0"):
        sample_dd(StudentApply(cfg), params, noise, labels, code, (4,), 6)
    with pytest.raises(ValueError, match="increase"):
        sample_dd(StudentApply(cfg), params, noise, labels, code, (0, 0), 6)
    with pytest.raises(ValueError, match="teacher_start"):
        sample_teacher_involved(StudentApply(cfg), params, teacher_of(tcfg, tparams, np.asarray(code)),
                                noise, labels, row_keys(jax.random.PRNGKey(0), np.arange(4)),
                                t_list=(0, 4), teacher_start=4)
