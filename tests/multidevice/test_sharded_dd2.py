"""DD2's stages on 8 devices (data parallel, and FSDP over 4) equal one device, on LlamaGen and
on VAR."""

from __future__ import annotations

import dataclasses

import jax
import llamagen
import numpy as np
import pytest
import var as var_configs

from ddjax import sharding
from ddjax.app.build import build_teacher
from ddjax.app.settings import read_settings
from ddjax.dd2 import train as T


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_dd2_stages_on_8_devices_equal_one_device(tmp_path, family):
    config = (llamagen if family == "llamagen" else var_configs).get_config("tiny,method=dd2")
    teacher = build_teacher(config)
    s = read_settings(config)
    runs = {}
    # LlamaGen: FSDP over data 2 x fsdp 4 (both axes); VAR: data parallel over all 8
    fsdp, data = ("fsdp", {"data": 2, "fsdp": 4}, "fsdp"), ("data", {"data": -1}, "data")
    meshes = [("one", None, "data"), fsdp if family == "llamagen" else data]
    for name, axes, mode in meshes:
        mesh = sharding.make_mesh(axes, jax.devices()[:1] if axes is None else None)
        dd2 = dataclasses.replace(s.dd2, sharding=mode)
        out = T.train(teacher, dd2, s.sampling, workdir=str(tmp_path / name), mesh=mesh)
        runs[name] = jax.device_get({k: out["final_state"][k] for k in ("gen_ema", "guide")})
    one, eight = (np.load(tmp_path / n / "dd2" / "samples.npz")["ids"] for n in ("one", list(runs)[1]))
    np.testing.assert_array_equal(one, eight)
    for name in list(runs)[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5),
                               runs[name], runs["one"])
