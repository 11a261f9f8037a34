"""DD1 on VAR over 8 devices: the same pairs as on one device, and the same train step with data
parallelism and with FSDP."""

from __future__ import annotations

import jax
import numpy as np
import var

from ddjax import sharding
from ddjax.app.build import build_teacher
from ddjax.app.settings import read_settings
from ddjax.mapper.generate import PairSettings, write_pairs
from ddjax.mapper.pairs import PairDataset
from ddjax.student import train as T
from ddjax.student.families import student_family
from ddjax.utils import optim


def test_var_pairs_and_train_steps_on_8_devices_equal_one_device(tmp_path):
    config = var.get_config("tiny")
    teacher = build_teacher(config)
    s = read_settings(config)
    data = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        mesh = sharding.make_mesh({"data": -1}, devices=devices)
        write_pairs(teacher, str(tmp_path / name), PairSettings(num_pairs=32, shard_size=16, batch_size=16,
                                                                flow_check_tokens=0),
                    s.sampling, s.flow, mesh=mesh)
        data[name] = PairDataset(str(tmp_path / name)).load_all()
    for k in ("noise", "tokens", "labels"):
        np.testing.assert_array_equal(data["one"][k], data["eight"][k])

    tc = s.train
    mc = student_family("var").config_for(teacher)
    batch = {k: data["one"][k][:16] for k in ("noise", "tokens", "labels")}
    runs, host = {}, None
    for name, axes, mode in (("one", None, "data"), ("data", {"data": -1}, "data"),
                             ("fsdp", {"data": 2, "fsdp": 4}, "fsdp")):
        mesh = sharding.make_mesh(axes, jax.devices()[:1] if axes is None else None)
        tx, sched = optim.make_optimizer(tc)
        init = T.make_init_fn(mc, tx)
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0), None)
        sh = T.state_shardings(abstract, mesh, mode)
        if host is None:
            host = jax.device_get(jax.jit(init)(jax.random.PRNGKey(0), teacher.params))
        state = jax.device_put(host, sh)
        gather = sharding.replicated(mesh) if mode == "fsdp" else None
        step = T.jit_train_step(T.make_train_step(mc, tx, sched, tc, teacher.codebook, gather), sh,
                                T.batch_shardings(mesh), mesh)
        state, m = step(state, T.put_batch(batch, T.batch_shardings(mesh)), jax.random.PRNGKey(1), None)
        runs[name] = (jax.device_get(state["params"]), float(m.loss.compute()))
    for name in ("data", "fsdp"):
        np.testing.assert_allclose(runs[name][1], runs["one"][1], rtol=0, atol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                               runs[name][0], runs["one"][0])
