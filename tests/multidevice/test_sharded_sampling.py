"""Teacher sampling and the flow map split over 8 devices give the tokens of one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_params, teacher_of, tiny_gpt_config

from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.sharding import make_mesh
from ddjax.teacher.llamagen.gpt import init_params
from ddjax.teacher.llamagen.sampling import SamplingSettings, sample


def test_teacher_sampling_same_tokens_on_1_and_8_devices():
    cfg = tiny_gpt_config()
    params = random_params(init_params(cfg, jax.random.PRNGKey(0)))
    labels = jnp.arange(8) % cfg.num_classes
    s = SamplingSettings(cfg_scale=2.0, top_k=16, top_p=0.95)
    dev0 = jax.devices()[0]
    ref = np.asarray(sample(jax.device_put(params, dev0), cfg, jax.device_put(labels, dev0),
                            jax.random.PRNGKey(5), s))
    out = sample(params, cfg, labels, jax.random.PRNGKey(5), s, mesh=make_mesh({"data": -1}))
    assert len(out.sharding.device_set) == 8, out.sharding
    np.testing.assert_array_equal(np.asarray(out), ref)
    out = sample(params, cfg, labels, jax.random.PRNGKey(5), s, mesh=make_mesh({"data": 2, "fsdp": 4}))
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_flow_map_same_tokens_on_1_and_8_devices():
    cfg = tiny_gpt_config()
    params = random_params(init_params(cfg, jax.random.PRNGKey(0)))
    code = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (cfg.vocab_size, 8)))
    noise = jax.random.normal(jax.random.PRNGKey(2), (16, cfg.block_size, 8))
    labels = jnp.arange(16) % 10
    s = SamplingSettings(cfg_scale=2.0, top_k=20)
    dev0 = jax.devices()[0]
    one = teacher_of(cfg, jax.device_put(params, dev0), code)
    ref = map_noise_to_tokens(one, jax.device_put(noise, dev0), jax.device_put(labels, dev0), s)
    out = map_noise_to_tokens(teacher_of(cfg, params, code), noise, labels, s, mesh=make_mesh({"data": 8}))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    # support compaction (each row's top-k codes only) is the same map, sharded too
    out = map_noise_to_tokens(teacher_of(cfg, params, code), noise, labels, s, FlowSettings(support_k=20),
                              mesh=make_mesh({"data": 8}))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
