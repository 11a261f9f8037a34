"""VAR's next-scale sampler split over 8 devices gives the ids of one device."""

from __future__ import annotations

import jax
import numpy as np
from var_fixtures import load_case

from ddjax.sharding import make_mesh
from ddjax.teacher.var import sampling as S


def test_mesh_sharded_sampling_equals_unsharded():
    _, _, vcfg, tcfg, vae, var, _ = load_case("sample_small")
    labels = np.arange(8) % tcfg.num_classes
    settings = S.VARSamplingSettings(cfg=1.5, top_k=100, top_p=0.9)
    key = jax.random.PRNGKey(5)
    plain = S.sample(var, tcfg, vae, vcfg, labels, key, settings)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    sharded = S.sample(var, tcfg, vae, vcfg, labels, key, settings, mesh=mesh)
    assert sharded.sharding.spec[0] == ("data", "fsdp"), sharded.sharding
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(plain))
