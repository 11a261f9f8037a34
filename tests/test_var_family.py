"""VAR behind the Teacher interface: the same sampler, decoders and teacher-forcing
distributions as the family's own functions, and the flow map over whole scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from var_fixtures import load_case

from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.teacher.var import sampling as S
from ddjax.teacher.var.family import VARTeacher


@pytest.fixture(scope="module")
def small():
    _, _, vcfg, tcfg, vae, var, _ = load_case("sample_small")
    return VARTeacher(tcfg, var, vcfg, vae), tcfg, vcfg, var, vae


def test_shapes_and_boundaries(small):
    teacher, tcfg, vcfg, _, _ = small
    assert teacher.boundaries == tuple(b for b, _ in tcfg.begin_ends) and teacher.boundaries[0] == 0
    assert teacher.seq_len == tcfg.seq_len and teacher.codebook.shape[0] == vcfg.vocab_size
    teacher.check_timesteps(teacher.boundaries[:2], "t_list")
    with pytest.raises(ValueError, match="not step boundaries"):
        teacher.check_timesteps((teacher.boundaries[1] + 1,), "config.train.t_list")


def test_sample_is_the_family_sampler_and_log_probs_its_distributions(small):
    teacher, tcfg, vcfg, var, vae = small
    labels = jnp.arange(4) % tcfg.num_classes
    settings = S.VARSamplingSettings(cfg=1.5, top_k=50, top_p=0.9)
    key = jax.random.PRNGKey(3)
    trace = S.sample(var, tcfg, vae, vcfg, labels, key, settings, return_trace=True)
    ids = teacher.sample(labels, key, settings)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(trace.ids))
    logp = np.asarray(teacher.log_probs(ids, labels, settings))  # teacher forcing
    for si, (a, b) in enumerate(tcfg.begin_ends):
        want = np.asarray(trace.logp[si])
        np.testing.assert_array_equal(np.isfinite(logp[:, a:b]), np.isfinite(want))  # same support
        kept = np.isfinite(want)
        np.testing.assert_allclose(logp[:, a:b][kept], want[kept], atol=2e-4)


def test_decode_latents_of_codes_equals_decode_ids(small):
    teacher, tcfg, *_ = small
    ids = teacher.sample(jnp.arange(2) % tcfg.num_classes, jax.random.PRNGKey(0), S.VARSamplingSettings())
    np.testing.assert_allclose(teacher.decode_latents(teacher.codebook[np.asarray(ids)]),
                               teacher.decode_ids(ids), atol=2e-5)


def test_flow_map_draws_whole_scales_deterministically(small):
    teacher, tcfg, *_ = small
    settings = S.VARSamplingSettings(cfg=1.5, top_k=20)
    noise = jax.random.normal(jax.random.PRNGKey(1), (4, teacher.seq_len, teacher.code_dim))
    labels = jnp.arange(4) % tcfg.num_classes
    flow = FlowSettings(num_steps=8)
    ids = np.asarray(map_noise_to_tokens(teacher, noise, labels, settings, flow))
    again = map_noise_to_tokens(teacher, noise, labels, settings, flow)
    np.testing.assert_array_equal(ids, np.asarray(again))
    np.testing.assert_array_equal(ids[:2], np.asarray(map_noise_to_tokens(teacher, noise[:2], labels[:2],
                                                                          settings, flow)))
    logp = np.asarray(teacher.log_probs(ids, labels, settings))
    assert np.isfinite(np.take_along_axis(logp, ids[..., None], -1)).all()  # inside the top-k support
