"""Parameter checkpoints: an Orbax checkpoint of the params plus a `ddjax.json` describing them.

Layout of a converted model directory:
  DIR/params/      Orbax StandardCheckpointer tree
  DIR/ddjax.json   {"kind": "gpt" | "vq" | "dd", "model_config": {...}, "source": ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ddjax.utils.state_dict import check_params

META_FILE = "ddjax.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    try:
        return jnp.dtype(value).name if not isinstance(value, (int, float, str, bool, type(None))) \
            else value
    except TypeError:
        return str(value)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A model config dataclass -> JSON-able dict (dtypes as names)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_params(directory: str, params: Any, *, kind: str, model_config: Any,
                source: str | None = None, overwrite: bool = False) -> str:
    """Saves `params` under DIR/params and the metadata under DIR/ddjax.json; returns DIR.

    An existing directory is only replaced with `overwrite=True`; the new checkpoint is
    written beside it first so a failure leaves the old one intact.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = directory + ".tmp-ddjax"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Host arrays written by this process alone, also inside a multi-process job (orbax would
    # otherwise wait for the other processes at its barriers).
    me = jax.process_index()
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me})) if jax.process_count() > 1 else ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), jax.device_get(params))
    ckptr.wait_until_finished()
    cfg = model_config if isinstance(model_config, dict) else config_to_dict(model_config)
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump({"kind": kind, "model_config": cfg, "source": source}, f, indent=2)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read_meta(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a ddjax checkpoint: {META_FILE} is missing")
    with open(path) as f:
        return json.load(f)


def load_params(directory: str, template: Any = None, kind: str | None = None) -> tuple[Any, dict]:
    """Restores (params, metadata) from a directory written by `save_params`.

    template: a params tree (or shapes) to restore into and check against; without it the
    stored tree is returned as numpy arrays.
    """
    directory = os.path.abspath(directory)
    meta = read_meta(directory)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    ckptr = ocp.StandardCheckpointer()
    path = os.path.join(directory, "params")
    if template is None:
        params = ckptr.restore(path)
    else:
        stored = ckptr.metadata(path).item_metadata.tree
        check_params(stored, template, source=directory)
        abstract = jax.tree_util.tree_map(
            lambda t: jax.ShapeDtypeStruct(np.shape(t), t.dtype), template
        )
        params = ckptr.restore(path, abstract)
    return params, meta
