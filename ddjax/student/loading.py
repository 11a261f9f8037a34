"""Loading a DD student, whatever holds it: one function, `load_student`.

    cfg, params, meta = load_student(path, teacher)

`path` may be
  * a training workdir (or its `student/` folder): the EMA (default) or raw params of the
    latest (or given) Orbax checkpoint;
  * a ddjax DD directory (`python -m ddjax.convert to-jax --kind dd`, or `save_jax`);
  * a released Distilled Decoding checkpoint, `.pt` or `.safetensors` (weights under "ema",
    else "model"); its shapes come from the teacher.
Every missing, unexpected or mis-shaped key raises one CheckpointError naming them all.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ddjax.student import model as model_lib
from ddjax.student.families import config_from_json, family_of_config, student_family
from ddjax.student.var_loading import load_var_dd
from ddjax.teacher.base import Teacher
from ddjax.teacher.llamagen.loading import abstract_params, load_weights
from ddjax.utils.checkpoint import META_FILE, load_params, read_meta

STUDENT_DIR = "student"
CKPT_DIR = "checkpoints"


def model_config_from_meta(meta: dict) -> Any:
    """The model config from ddjax.json's model_config: a LlamaGen student's DDConfig
    ({"gpt": {...}, "codebook_dim"} or flat) or a VAR student's VARDDConfig ({"var": {...}})."""
    return config_from_json(dict(meta.get("model_config", meta)))


def _abstract(cfg: Any) -> Any:
    return family_of_config(cfg).abstract_params(cfg)


def load_training_run(path: str, step: int | None = None,
                      ema: bool = True) -> tuple[model_lib.DDConfig, Any, dict]:
    """(DDConfig, params, meta with "step") from WORKDIR or WORKDIR/student; the params are
    restored onto this process's first device (a sampler's placement), whatever mesh, device
    count or process count trained them."""
    student_dir = path if os.path.exists(os.path.join(path, META_FILE)) else os.path.join(path, STUDENT_DIR)
    meta_path = os.path.join(student_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no trained student in {path}: {meta_path} is missing (train one "
                                "with --config.mode=train, or set --config.student.checkpoint)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("kind") != "dd":
        raise ValueError(f"{student_dir} holds a {meta.get('kind')!r} checkpoint, not a DD student")
    cfg = model_config_from_meta(meta)
    mngr = ocp.CheckpointManager(os.path.join(student_dir, meta.get("checkpoints", CKPT_DIR)),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"{student_dir} has no training checkpoint yet")
    item = "ema_params" if ema else "params"
    # Onto this process's first device, whatever mesh and process count saved the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                    _abstract(cfg))
    got = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    mngr.close()
    return cfg, got[item], {**meta, "step": int(step)}


def load_dd(path: str, config: model_lib.DDConfig, weights_key: str | None = None) -> Any:
    """DD student params for `config` from `.pt`, `.safetensors` or a ddjax directory.

    Released checkpoints hold the weights under "ema" and "model"; the EMA weights are taken
    unless `weights_key` says otherwise.
    """
    return load_weights(path, abstract_params(model_lib.init_params, config), "dd", weights_key)


def load_student(path: str, teacher: Teacher | None = None, *, step: int | None = None,
                 ema: bool = True, weights_key: str | None = None
                 ) -> tuple[model_lib.DDConfig, Any, dict]:
    """(DDConfig, params, meta) from a training run, a ddjax DD directory or a released file
    (see the module docstring); `teacher` gives the shapes of a released file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"student checkpoint not found: {path}")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "params")):
            meta = read_meta(path)
            if meta.get("kind") != "dd":
                raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a DD student")
            cfg = model_config_from_meta(meta)
            params, _ = load_params(path, _abstract(cfg), kind="dd")
            return cfg, params, meta
        return load_training_run(path, step, ema)
    if teacher is None:
        raise ValueError(f"{path}: a released DD file needs the teacher for its shapes")
    cfg = student_family(teacher.family).config_for(teacher)
    if teacher.family == "var":  # VAR-DD's trainer layout (trainer.ema_parameters, ...)
        return cfg, load_var_dd(path, cfg, weights_key), {"kind": "dd", "source": path}
    return cfg, load_dd(path, cfg, weights_key), {"kind": "dd", "source": path}
