"""Text-to-image on 8 devices: masked teacher sampling and the t2i student's train step (data
parallel and FSDP) equal one device."""

from __future__ import annotations

import jax
import llamagen_t2i
import numpy as np

from ddjax import sharding
from ddjax.app import build
from ddjax.app.settings import from_block
from ddjax.student import train as T
from ddjax.teacher.llamagen import sampling as S
from ddjax.utils import optim


def _tiny():
    config = llamagen_t2i.get_config("tiny")
    config.teacher.model.n_layer = 1
    return config


def test_masked_t2i_sampling_on_8_devices_equals_one():
    config = _tiny()
    teacher = build.build_teacher(config)
    ids = np.arange(8) % len(teacher.captions)
    assert not teacher.captions.mask[ids].all()  # some captions are padded
    settings = S.SamplingSettings(cfg_scale=2.0, top_k=0)
    key = jax.random.PRNGKey(3)
    one = teacher.sample(ids, key, settings)
    mesh = sharding.make_mesh({"data": -1})
    many = teacher.sample(ids, key, settings, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(many))


def test_t2i_train_step_on_8_devices_equals_one_device():
    config = _tiny()
    config.train.update(batch_size=16, warmup_steps=1)
    tc = from_block(T.TrainSettings, config.train, "train")
    teacher = build.build_teacher(config)
    tcfg = teacher.config
    code = np.random.default_rng(0).normal(size=(tcfg.vocab_size, 8)).astype(np.float32)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(2):
        b = {"noise": rng.normal(size=(16, 16, 8)).astype(np.float32),
             "tokens": rng.integers(0, tcfg.vocab_size, (16, 16)).astype(np.int32),
             "labels": rng.integers(0, len(teacher.captions), 16).astype(np.int32)}
        batches.append({**b, **T.caption_arrays(teacher, b["labels"])})
    runs, host = {}, None
    for name, axes, mode in [("one", None, "data"), ("data", {"data": -1}, "data"),
                             ("fsdp", {"data": 2, "fsdp": 4}, "fsdp")]:
        mesh = sharding.make_mesh(axes, jax.devices()[:1] if axes is None else None)
        mc = T.student_config(tcfg, 8, "float32")
        assert mc.is_t2i
        tx, sched = optim.make_optimizer(tc)
        init = T.make_init_fn(mc, tx)
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0), None)
        sh = T.state_shardings(abstract, mesh, mode)
        if host is None:
            host = jax.device_get(jax.jit(init, out_shardings=sh)(jax.random.PRNGKey(0), None))
        state = jax.device_put(host, sh)
        gather = sharding.replicated(mesh) if mode == "fsdp" else None
        bsh = T.batch_shardings(mesh, captions=True)
        step = T.jit_train_step(T.make_train_step(mc, tx, sched, tc, code, gather), sh, bsh, mesh)
        losses = []
        for b in batches:
            state, m = step(state, T.put_batch(b, bsh), jax.random.PRNGKey(1), None)
            losses.append((float(m.loss.compute()), float(m.l2_grads.compute())))
        runs[name] = (jax.device_get(state), losses)
    ref_state, ref_losses = runs["one"]
    assert np.isfinite(ref_losses).all()
    for name in ("data", "fsdp"):
        state, losses = runs[name]
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
            state["params"], ref_state["params"])
