"""DD1 on VAR: the flow map's push-forward against the exact joint of an enumerable VAR, the
whole-scale draws, the stopped sampler, and the pipeline (pairs -> student -> report) on the
tiny VAR config."""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import var as var_configs  # configs/var.py

from ddjax.app import run
from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.student.loading import load_student
from ddjax.student.var_model import VARDDConfig
from ddjax.teacher.base import row_key_inputs, row_keyed_multinomial, row_keys
from ddjax.teacher.var import model as var_model
from ddjax.teacher.var import vqvae as vqvae_lib
from ddjax.teacher.var.family import VARTeacher
from ddjax.teacher.var.sampling import VARSamplingSettings

K, PN = 3, (1, 2)  # vocabulary 3, scales 1x1 and 2x2: 3^5 = 243 sequences to enumerate
L = sum(p * p for p in PN)


@pytest.fixture(scope="module")
def micro():
    vcfg = vqvae_lib.vqvae_config(vocab_size=K, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                  patch_nums=PN)
    cfg = var_model.var_config(2, embed_dim=32, num_heads=2, num_classes=4, vocab_size=K, cvae=4,
                               patch_nums=PN, drop_path_rate=0.0)
    params = var_model.init_params(cfg, jax.random.PRNGKey(1))
    # scale the weights up so that the conditionals are far from uniform
    params = jax.tree_util.tree_map(lambda x: 3.0 * x, params)
    vparams = vqvae_lib.init_params(vcfg, jax.random.PRNGKey(2))
    return VARTeacher(cfg, params, vcfg, vparams, variant="micro")


def exact_joint(teacher, label, settings):
    seqs = np.array(list(itertools.product(range(K), repeat=L)), np.int32)
    logp = np.asarray(teacher.log_probs(seqs, np.full((len(seqs),), label), settings), np.float64)
    return np.exp(np.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(-1))


def empirical(tokens):
    codes = (tokens * K ** np.arange(L - 1, -1, -1)).sum(-1)
    return np.bincount(codes, minlength=K**L) / len(tokens)


def tv_bound(p, n, delta=1e-4, solver_slack=0.004):
    return 0.5 * np.sqrt(p * (1 - p) / n).sum() + np.sqrt(np.log(1 / delta) / (2 * n)) + solver_slack


def test_flow_map_push_forward_is_the_exact_joint(micro):
    """Whole-scale flow maps inside the compiled sampler give sequences distributed as the
    product of the teacher's processed per-scale conditionals (CFG ramp and top-k included);
    the teacher's own ancestral sampler agrees, and another class's joint is rejected."""
    settings = VARSamplingSettings(cfg=2.0, top_k=2, top_p=0.0)
    n, label = 20000, 1
    joint = exact_joint(micro, label, settings)
    assert abs(joint.sum() - 1) < 1e-5 and joint.max() < 0.5
    noise = jax.random.normal(jax.random.PRNGKey(11), (n, L, 4))
    labels = jnp.full((n,), label)
    mapped = np.asarray(map_noise_to_tokens(micro, noise, labels, settings, FlowSettings()))
    tv = 0.5 * np.abs(empirical(mapped) - joint).sum()
    assert tv < tv_bound(joint, n), (tv, tv_bound(joint, n))
    other = exact_joint(micro, 3, settings)
    assert 0.5 * np.abs(empirical(mapped) - other).sum() > tv_bound(other, n)
    keys = row_keys(jax.random.PRNGKey(5), np.arange(n))
    anc = np.asarray(micro.sample(labels, jax.random.PRNGKey(0), settings, rule=row_keyed_multinomial,
                                  rule_inputs=row_key_inputs(keys, L)))
    assert 0.5 * np.abs(empirical(mapped) - empirical(anc)).sum() < 2 * tv_bound(joint, n)


def test_row_keyed_draws_of_one_step_are_independent():
    """A step of n tokens with the same distribution: one row's tokens differ (a shared key per
    step would draw n copies of one token), and a row's draws do not depend on its batch."""
    logp = jnp.full((2, 64, 1000), -np.log(1000.0))
    keys = row_keys(jax.random.PRNGKey(0), np.array([7, 8]))
    ids = np.asarray(row_keyed_multinomial(None, logp, 3, row_key_inputs(keys, 64)))
    assert len(np.unique(ids[0])) > 50 and not np.array_equal(ids[0], ids[1])
    alone = row_keyed_multinomial(None, logp[1:], 3, row_key_inputs(keys[1:], 64))
    np.testing.assert_array_equal(ids[1:], alone)


def test_stopped_sampler_is_the_prefix_of_the_full_one(micro):
    settings = VARSamplingSettings(cfg=1.5)
    labels = jnp.array([0, 2, 3])
    full = np.asarray(micro.sample(labels, jax.random.PRNGKey(3), settings))
    part = np.asarray(micro.sample(labels, jax.random.PRNGKey(3), settings, num_tokens=1))
    np.testing.assert_array_equal(part, full[:, :1])
    with pytest.raises(ValueError, match="num_tokens"):
        micro.sample(labels, jax.random.PRNGKey(3), settings, num_tokens=3)


def test_tiny_var_pipeline_through_main(tmp_path):
    """generate -> train -> evaluate on the tiny VAR config, then a rerun that resumes (skips)."""
    config = var_configs.get_config("tiny,mode=all")
    out = run(config, str(tmp_path))
    assert os.path.exists(out["report"])
    cfg, params, meta = load_student(str(tmp_path))
    assert isinstance(cfg, VARDDConfig) and meta["family"] == "var" and meta["step"] == config.train.num_steps
    assert cfg.seq_len == 21 and params["pos_1LC"].shape == (1, 22, 32)
    text = open(out["report"]).read()
    for row in ("teacher", "DD 1-step", "DD 2-step", "teacher-involved", "onestep*"):
        assert f"| {row} |" in text
    # teacher-involved counts scales: a student step, scales 1 (teacher_start) .. 4, a student step
    assert "| teacher-involved | 3 |" in text
    again = run(config, str(tmp_path))  # pairs complete, student trained: evaluation only
    assert os.path.exists(again["report"])
