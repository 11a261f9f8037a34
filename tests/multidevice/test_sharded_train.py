"""A train step with data parallelism and with FSDP over 8 devices equals one device."""

from __future__ import annotations

import jax
import llamagen
import numpy as np

from ddjax import sharding
from ddjax.app.build import gpt_config
from ddjax.app.settings import from_block
from ddjax.student import train as T
from ddjax.utils import optim


def test_data_and_fsdp_steps_on_8_devices_equal_one_device():
    config = llamagen.get_config("tiny")
    config.train.update(batch_size=16, warmup_steps=1)
    config.teacher.model.n_layer = 1
    tc = from_block(T.TrainSettings, config.train, "train")
    tcfg = gpt_config(config)
    code = np.random.default_rng(0).normal(size=(tcfg.vocab_size, 8)).astype(np.float32)
    rng = np.random.default_rng(1)
    batches = [{"noise": rng.normal(size=(16, 16, 8)).astype(np.float32),
                "tokens": rng.integers(0, tcfg.vocab_size, (16, 16)).astype(np.int32),
                "labels": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(2)]
    runs, host = {}, None
    for name, axes, mode, dtype in [("one", None, "data", "float32"),
                                    ("data", {"data": -1}, "data", "float32"),
                                    ("fsdp", {"data": 2, "fsdp": 4}, "fsdp", "float32"),
                                    ("bf16", {"data": -1}, "data", "bfloat16")]:
        mesh = sharding.make_mesh(axes, jax.devices()[:1] if axes is None else None)
        mc = T.student_config(tcfg, 8, dtype)
        tx, sched = optim.make_optimizer(tc)
        init = T.make_init_fn(mc, tx)
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0), None)
        sh = T.state_shardings(abstract, mesh, mode)
        if name in ("one", "fsdp"):  # the sharded init; the others reuse its values
            state = jax.jit(init, out_shardings=sh)(jax.random.PRNGKey(0), None)
            if name == "one":
                host = jax.device_get(state)
            else:
                jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state), host)
        else:
            state = jax.device_put(host, sh)
        gather = sharding.replicated(mesh) if mode == "fsdp" else None
        step = T.jit_train_step(T.make_train_step(mc, tx, sched, tc, code, gather), sh,
                                T.batch_shardings(mesh), mesh)
        losses = []
        for b in batches:
            state, m = step(state, T.put_batch(b, T.batch_shardings(mesh)), jax.random.PRNGKey(1), None)
            losses.append((float(m.loss.compute()), float(m.l2_grads.compute())))
        runs[name] = (state, losses)
        if name == "fsdp":
            w1 = state["params"]["layers_0"]["feed_forward"]["w1"]["kernel"]  # [64, 256]
            assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), w1.sharding
            assert w1.addressable_shards[0].data.shape == (64, w1.shape[1] // 4)
            mu = state["opt_state"][1][0].mu["layers_0"]["feed_forward"]["w1"]["kernel"]
            assert mu.sharding.spec == w1.sharding.spec
    ref_state, ref_losses = runs["one"]
    for name in ("data", "fsdp"):
        state, losses = runs[name]
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
        for key in ("params", "ema_params"):
            jax.tree_util.tree_map(
                lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5),
                state[key], ref_state[key])
    state, losses = runs["bf16"]
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state["params"]))
    np.testing.assert_allclose(losses[0][0], ref_losses[0][0], rtol=2e-2)
