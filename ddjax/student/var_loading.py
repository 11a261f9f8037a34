"""Released VAR-DD checkpoints (`VAR-DD/var-d{16,20,24}.pth`) in and out of ddjax.

    cfg = var_dd_config(var_config(16))
    params = load_var_dd("var-d16.pth", cfg)          # trainer.ema_parameters, else var_wo_ddp
    export_var_dd(params, cfg, "student.pth")         # loads strict=True into the official DD_Model

The official sampler loads `ckpt['trainer']['ema_parameters']` (its default `--ema`) or
`['trainer']['var_wo_ddp']` with strict=False; ddjax loads strictly: one CheckpointError names
every missing, unexpected or mis-shaped key. The buffers of `DD_Model` (`lvl_1L`,
`attn_bias_for_masking`, `blocks.*.attn.zero_k_bias`) are rebuilt from the config: skipped on
load, written on export.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ddjax.student.families import VAR as VAR_FAMILY
from ddjax.student.var_model import VARDDConfig
from ddjax.teacher.var.loading import VAR_BUFFERS
from ddjax.teacher.var.vqvae import var_torch_key
from ddjax.utils.state_dict import check_params, flax_to_torch, torch_to_flax
from ddjax.utils.torch_io import (
    CheckpointError,
    StateDict,
    read_state_dict,
    require_torch,
    write_state_dict,
)

# Where the official trainer stores the weights, in the order the official sampler prefers them.
OFFICIAL_KEYS = ("trainer.ema_parameters", "trainer.var_wo_ddp")


def _abstract(config: VARDDConfig) -> Any:
    return VAR_FAMILY.abstract_params(config)


def var_dd_from_state_dict(state: StateDict, config: VARDDConfig, source: str = "state dict") -> Any:
    """Student params from {torch key: array}; raises CheckpointError listing every mismatch."""
    return torch_to_flax(state, _abstract(config), source=source, ignore=VAR_BUFFERS,
                         key_fn=var_torch_key)


def var_dd_buffers(config: VARDDConfig, dtype: Any = np.float32) -> StateDict:
    """`DD_Model`'s buffers: the levels with the SOS level, its mask as an additive bias, and
    the attention's zero_k_bias."""
    lvl = config.levels
    n = len(lvl)
    out: StateDict = {"lvl_1L": lvl.astype(np.int64)[None],
                      "attn_bias_for_masking": np.where(config.mask(), 0.0, -np.inf)
                      .astype(np.float32).reshape(1, 1, n, n)}
    for i in range(config.var.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((config.var.embed_dim,), dtype)
    return out


def var_dd_state_dict(params: Any, config: VARDDConfig) -> StateDict:
    """Student params -> the full `DD_Model.state_dict()` (parameters and buffers)."""
    check_params(params, _abstract(config), "VAR-DD params", key_fn=var_torch_key)
    state = flax_to_torch(params, key_fn=var_torch_key)
    state.update(var_dd_buffers(config, state["pos_1LC"].dtype))
    return state


def load_var_dd(path: str, config: VARDDConfig, weights_key: str | None = None) -> Any:
    """Student params from a VAR-DD `.pth` (trainer.ema_parameters, else trainer.var_wo_ddp),
    a bare state dict or `.safetensors`; `weights_key` (dotted: "trainer.var_wo_ddp") picks one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAR-DD checkpoint not found: {path!r}")
    if weights_key is not None:
        return var_dd_from_state_dict(read_state_dict(path, weights_key), config, source=path)
    for key in OFFICIAL_KEYS:
        try:
            state = read_state_dict(path, key)
        except CheckpointError:
            continue
        return var_dd_from_state_dict(state, config, source=f"{path} [{key}]")
    return var_dd_from_state_dict(read_state_dict(path), config, source=path)


def export_var_dd(params: Any, config: VARDDConfig, path: str,
                  nest_under: tuple[str, ...] = ()) -> str:
    """Writes `DD_Model`'s full state dict to `.safetensors` or `.pth` (bare by default; the
    official sampler's layout is nest_under=("trainer",) with the weights under
    "ema_parameters": use `export_var_dd_official`)."""
    write_state_dict(path, var_dd_state_dict(params, config), nest_under=nest_under)
    return path


def export_var_dd_official(params: Any, config: VARDDConfig, path: str) -> str:
    """A `.pth` the official `sample.py` / `combine_sample.py` read: {"trainer": {"ema_parameters":
    state dict, "var_wo_ddp": state dict}}."""
    require_torch("writing the official VAR-DD layout")
    return export_var_dd(params, config, path, nest_under=OFFICIAL_KEYS)


__all__ = ["OFFICIAL_KEYS", "var_dd_from_state_dict", "var_dd_buffers", "var_dd_state_dict",
           "load_var_dd", "export_var_dd", "export_var_dd_official"]
