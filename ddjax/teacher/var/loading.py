"""Loading and exporting VAR's released weights (`var_d{16,20,24,30}.pth`, `vae_ch160v4096z32.pth`).

    vae_cfg = vqvae_config();  var_cfg = var_config(16)
    vae = load_vqvae("vae_ch160v4096z32.pth", vae_cfg)      # .pth, .safetensors or a ddjax dir
    var = load_var("var_d16.pth", var_cfg)
    export_var(var, var_cfg, "var_d16.safetensors")          # no torch needed for safetensors

Loading is strict: one CheckpointError names every missing, unexpected and mis-shaped key.
The buffers VAR registers (`lvl_1L`, `attn_bias_for_masking`, `blocks.*.attn.zero_k_bias`,
`quantize.ema_vocab_hit_SV`) are rebuilt from the config, so they are skipped on load and
written on export: the exported state dicts load into VAR's classes with `strict=True`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from ddjax.teacher.var import model as var_model
from ddjax.teacher.var import vqvae as vqvae_model
from ddjax.teacher.var.model import VARConfig
from ddjax.teacher.var.vqvae import VQVAEConfig, var_torch_key
from ddjax.utils.checkpoint import load_params
from ddjax.utils.state_dict import check_params, flax_to_torch, torch_to_flax
from ddjax.utils.torch_io import StateDict, read_state_dict, write_state_dict

VAR_BUFFERS = (r"^lvl_1L$", r"^attn_bias_for_masking$", r"^blocks\.\d+\.attn\.zero_k_bias$")
VQVAE_BUFFERS = (r"^quantize\.ema_vocab_hit_SV$",)


@functools.lru_cache(maxsize=16)
def _abstract(kind: str, config: Any) -> Any:
    init = var_model.init_params if kind == "var" else vqvae_model.init_params
    return jax.eval_shape(lambda: init(config, jax.random.PRNGKey(0)))


def abstract_params(kind: str, config: VARConfig | VQVAEConfig) -> Any:
    """Shapes/dtypes of the "var" or "var_vae" params for `config` (nothing allocated; cached)."""
    if kind not in ("var", "var_vae"):
        raise ValueError(f"kind must be 'var' or 'var_vae', got {kind!r}")
    return jax.tree_util.tree_map(lambda s: s, _abstract(kind, config))


# -- state dicts ----------------------------------------------------------------------------------
def var_from_state_dict(state: StateDict, config: VARConfig, source: str = "state dict") -> Any:
    """VAR params from {torch key: array}; raises CheckpointError listing every mismatch."""
    return torch_to_flax(state, abstract_params("var", config), source=source, ignore=VAR_BUFFERS,
                         key_fn=var_torch_key)


def vqvae_from_state_dict(state: StateDict, config: VQVAEConfig, source: str = "state dict") -> Any:
    """VQVAE params from {torch key: array}; raises CheckpointError listing every mismatch."""
    return torch_to_flax(state, abstract_params("var_vae", config), source=source,
                         ignore=VQVAE_BUFFERS, key_fn=var_torch_key)


def var_buffers(config: VARConfig, dtype: Any = np.float32) -> StateDict:
    """The buffers of VAR's `state_dict()`: lvl_1L, attn_bias_for_masking, zero_k_bias."""
    length = config.seq_len
    bias = np.where(config.block_mask(), 0.0, -np.inf).astype(np.float32)
    out: StateDict = {
        "lvl_1L": config.levels().astype(np.int64)[None],
        "attn_bias_for_masking": bias.reshape(1, 1, length, length),
    }
    for i in range(config.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((config.embed_dim,), dtype)
    return out


def var_state_dict(params: Any, config: VARConfig | None = None) -> StateDict:
    """VAR params -> the full `state_dict()` of VAR's module (parameters + buffers).

    Without `config`, only the parameters (no buffers and no check).
    """
    state = flax_to_torch(params, key_fn=var_torch_key)
    if config is not None:
        check_params(params, abstract_params("var", config), "VAR params", key_fn=var_torch_key)
        state.update(var_buffers(config, state["pos_1LC"].dtype))
    return state


def vqvae_state_dict(params: Any, config: VQVAEConfig | None = None) -> StateDict:
    """VQVAE params -> VAR's `VQVAE.state_dict()` (with the `ema_vocab_hit_SV` buffer, zeros)."""
    state = flax_to_torch(params, key_fn=var_torch_key)
    if config is not None:
        check_params(params, abstract_params("var_vae", config), "VQVAE params",
                     key_fn=var_torch_key)
        dtype = state["quantize.embedding.weight"].dtype
        state["quantize.ema_vocab_hit_SV"] = np.zeros((config.num_scales, config.vocab_size), dtype)
    return state


# -- files ----------------------------------------------------------------------------------------
def _load(path: str, kind: str, config: Any, weights_key: str | None) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} checkpoint not found: {path!r}")
    if os.path.isdir(path):
        params, _ = load_params(path, abstract_params(kind, config), kind=kind)
        return params
    state = read_state_dict(path, weights_key)
    if kind == "var":
        return var_from_state_dict(state, config, source=path)
    return vqvae_from_state_dict(state, config, source=path)


def load_var(path: str, config: VARConfig, weights_key: str | None = None) -> Any:
    """VAR params for `config` from `.pth`/`.pt` (torch), `.safetensors` or a ddjax directory."""
    return _load(path, "var", config, weights_key)


def load_vqvae(path: str, config: VQVAEConfig, weights_key: str | None = None) -> Any:
    """VQVAE params for `config` from `.pth`/`.pt` (torch), `.safetensors` or a ddjax directory."""
    return _load(path, "var_vae", config, weights_key)


def export_var(params: Any, config: VARConfig, path: str, nest_under: tuple[str, ...] = ()) -> str:
    """Writes VAR's full state dict (buffers included) to `.safetensors` or `.pth` (bare by
    default, as the released files are); returns the path."""
    write_state_dict(path, var_state_dict(params, config), nest_under=nest_under)
    return path


def export_vqvae(params: Any, config: VQVAEConfig, path: str,
                 nest_under: tuple[str, ...] = ()) -> str:
    """Writes the VQVAE's full state dict to `.safetensors` or `.pth`; returns the path."""
    write_state_dict(path, vqvae_state_dict(params, config), nest_under=nest_under)
    return path


__all__ = ["VAR_BUFFERS", "VQVAE_BUFFERS", "abstract_params", "var_from_state_dict",
           "vqvae_from_state_dict", "var_buffers", "var_state_dict", "vqvae_state_dict",
           "load_var", "load_vqvae", "export_var", "export_vqvae"]
