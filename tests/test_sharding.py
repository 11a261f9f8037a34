"""Sharded runs on 8 simulated CPU devices give the same results as one device."""

from __future__ import annotations

from multidevice import run_on_8_devices


def test_teacher_sampling_same_tokens_on_1_and_8_devices():
    run_on_8_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from conftest import tiny_gpt_config, random_params
        from ddjax.sharding import make_mesh
        from ddjax.teacher.llamagen.gpt import init_params
        from ddjax.teacher.llamagen.sampling import SamplingSettings, sample
        jax.config.update("jax_disable_most_optimizations", True)
        cfg = tiny_gpt_config()
        params = random_params(init_params(cfg, jax.random.PRNGKey(0)))
        labels = jnp.arange(8) % cfg.num_classes
        s = SamplingSettings(cfg_scale=2.0, top_k=16, top_p=0.95)
        one = jax.device_put(params, jax.devices()[0])
        ref = np.asarray(sample(one, cfg, jax.device_put(labels, jax.devices()[0]),
                                jax.random.PRNGKey(5), s))
        mesh = make_mesh({"data": -1})
        out = sample(params, cfg, labels, jax.random.PRNGKey(5), s, mesh=mesh)
        assert len(out.sharding.device_set) == 8, out.sharding
        np.testing.assert_array_equal(np.asarray(out), ref)
        mesh = make_mesh({"data": 2, "fsdp": 4})
        out = sample(params, cfg, labels, jax.random.PRNGKey(5), s, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(out), ref)
        print("ok")
    """)


def test_mesh_errors():
    import pytest

    from ddjax.sharding import make_mesh

    with pytest.raises(ValueError, match="devices"):
        make_mesh({"data": 3})
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"data": -1, "fsdp": -1})
