"""Checkpoint conversion between ddjax params and the official PyTorch checkpoints.

Five kinds of model:
  * "gpt"  LlamaGen's `Transformer` (autoregressive/models/gpt.py), config `GPTConfig`;
  * "vq"   LlamaGen's `VQModel` (tokenizer/tokenizer_image/vq_model.py), config `VQConfig`;
  * "dd"   the official DD student `DDTransformer` (LlamaGen/autoregressive/models/dd.py of
           Distilled Decoding), config `DDConfig`;
  * "var"  VAR's transformer (FoundationVision/VAR models/var.py), config `VARConfig`
           (--model d16 | d20 | d24 | d30);
  * "var_vae" VAR's multi-scale `VQVAE` (models/vqvae.py), config `VQVAEConfig`;
  * "dd2"  DD2's generator (or guidance network), `ddjax.dd2.model.DD2Transformer` in role
           "score", config `DD2Config` (on VAR: `ddjax.dd2.var_model.VARDD2Transformer`,
           `VARDD2Config`); "dd2_teacher" its adapted teacher (role "teacher").
           DD2 has no official PyTorch code: the state dict follows the generic rule of
           `ddjax.utils.state_dict` (README "DD2" lists the keys).

    params = import_torch("dd_ckpt.pt", "dd", config)           # prefers the "ema" weights
    export_torch(params, "dd", "student.pt")                     # {"model": sd, "ema": sd}
    save_jax("ckpt/dd", params, "dd", config)                    # Orbax dir + ddjax.json
    params, config = load_jax("ckpt/dd")

Exports carry exactly the keys, shapes and dtypes of the official module's `state_dict()`, so
`load_state_dict(..., strict=True)` works; for "vq" that includes the `quantize.codebook_used`
buffer (written as zeros). `.safetensors` files are flat and never need torch; `.pt` files
nest the weights where the official loaders look for them (`NEST_UNDER`); VAR's released
`.pth` files are bare state dicts, and its exports carry VAR's buffers (`lvl_1L`,
`attn_bias_for_masking`, `zero_k_bias`, `ema_vocab_hit_SV`), which imports skip.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from ddjax.dd2 import functional as dd2_functional
from ddjax.dd2 import model as dd2_model
from ddjax.dd2 import settings as dd2_settings
from ddjax.dd2 import student_generator as dd2_student
from ddjax.student import families as student_families
from ddjax.student import model as dd_model
from ddjax.student import var_loading as var_dd_loading
from ddjax.student import var_model as var_dd_model
from ddjax.student.model import DDConfig, dd_config
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.teacher.llamagen.gpt import GPTConfig, gpt_config
from ddjax.teacher.llamagen.vq import VQConfig, vq_config
from ddjax.teacher.var import loading as var_loading
from ddjax.teacher.var import model as var_model
from ddjax.teacher.var import vqvae as var_vqvae
from ddjax.teacher.var.model import VARConfig
from ddjax.teacher.var.vqvae import VQVAEConfig
from ddjax.utils.checkpoint import config_to_dict, load_params, read_meta, save_params
from ddjax.utils.state_dict import check_params, flax_to_torch, torch_to_flax
from ddjax.utils.torch_io import StateDict, read_state_dict, write_state_dict

KINDS = ("gpt", "vq", "dd", "var", "var_vae", "var_dd", "dd2", "dd2_teacher")
DD2_KINDS = ("dd2", "dd2_teacher")
VAR_KINDS = ("var", "var_vae", "var_dd")
# Where `.pt` exports put the weights: LlamaGen's samplers read checkpoint["model"]; the DD
# evaluation script reads checkpoint["ema"] with --ema and checkpoint["model"] without.
NEST_UNDER: dict[str, tuple[str, ...]] = {"gpt": ("model",), "vq": ("model",), "dd": ("model", "ema"),
                                          "var": (), "var_vae": (),
                                          # the official VAR-DD sampler reads these two
                                          "var_dd": ("trainer.ema_parameters", "trainer.var_wo_ddp"),
                                          "dd2": ("model",), "dd2_teacher": ("model",)}
# LlamaGen's VectorQuantizer registers a usage counter when codebook_show_usage (the default).
VQ_USAGE_KEY = "quantize.codebook_used"
VQ_USAGE_SIZE = 65536


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


def _as_student(kind: str, config: Any) -> tuple[str, Any]:
    """A DD2 generator of kind "student" is DD1's network: its torch side is the DD student's
    ("dd" or "var_dd", `ddjax.dd2.student_generator.student_config`), so it loads in the
    official DD code; every other (kind, config) is returned as it is."""
    if kind == "dd2" and getattr(config, "generator", "score") == "student":
        scfg = dd2_student.student_config(config)
        return ("var_dd" if isinstance(scfg, var_dd_model.VARDDConfig) else "dd"), scfg
    return kind, config


def _key_fn(kind: str):
    """The Flax path -> torch key map of `kind` (None: the generic `mapping.torch_key`)."""
    if kind in VAR_KINDS:
        return var_vqvae.var_torch_key
    return None


def _var_depth(model: str | None) -> int:
    name = (model or "d16").lower().removeprefix("var_").removeprefix("var-").removeprefix("d")
    if not name.isdigit():
        raise ValueError(f"VAR --model must be d16, d20, d24 or d30 (any depth: dN), got {model!r}")
    return int(name)


# -- configs ------------------------------------------------------------------------------------
def build_config(kind: str, model: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """The config for `kind` from a variant name and field overrides.

    gpt: `gpt_config(model or "GPT-B", **overrides)`; vq: `vq_config(model or "VQ-16", ...)`;
    dd: `dd_config(gpt_config(model or "GPT-B", **overrides), codebook_dim)`, where
    `codebook_dim` (default 8) may be one of the overrides; var: `var_config(depth of model
    "d16" (default) | "d20" | ..., **overrides)`; var_vae: `vqvae_config(**overrides)`.
    """
    _check_kind(kind)
    overrides = dict(overrides or {})
    if kind == "var":
        return var_model.var_config(_var_depth(model), **overrides)
    if kind == "var_vae":
        return var_vqvae.vqvae_config(**overrides)
    if kind == "var_dd":
        return var_dd_model.var_dd_config(var_model.var_config(_var_depth(model), **overrides))
    if kind == "vq":
        return vq_config(model or "VQ-16", **overrides)
    if kind == "gpt":
        return gpt_config(model or "GPT-B", **overrides)
    codebook_dim = int(overrides.pop("codebook_dim", 8))
    if kind in DD2_KINDS:
        own = {k: overrides.pop(k) for k in ("head_width", "head_depth") if k in overrides}
        return dd2_model.dd2_config(gpt_config(model or "GPT-B", **overrides), codebook_dim, **own)
    return dd_config(gpt_config(model or "GPT-B", **overrides), codebook_dim)


def config_to_meta(kind: str, config: Any) -> dict[str, Any]:
    """The JSON-able `model_config` stored in ddjax.json (dd: the GPTConfig fields + codebook_dim)."""
    _check_kind(kind)
    if kind == "dd":
        return {**config_to_dict(config.gpt), "codebook_dim": int(config.codebook_dim)}
    if kind == "var_dd":
        return student_families.VAR.to_json(config)
    if kind in DD2_KINDS:
        return dd2_settings.config_to_json(config)
    return config_to_dict(config)


def config_from_meta(kind: str, meta: dict[str, Any]) -> Any:
    """Inverse of `config_to_meta`; `meta` is ddjax.json's content or its `model_config`."""
    _check_kind(kind)
    cfg = dict(meta.get("model_config", meta))
    if kind == "var_dd":
        return student_families.VAR.from_json(cfg)
    if kind in DD2_KINDS:
        return dd2_settings.config_from_json(cfg)
    if isinstance(cfg.get("gpt"), dict):  # a DDConfig stored nested: {"gpt": {...}, "codebook_dim"}
        cfg = {**cfg.pop("gpt"), **cfg}
    cls = {"vq": VQConfig, "var": VARConfig, "var_vae": VQVAEConfig}.get(kind, GPTConfig)
    codebook_dim = cfg.pop("codebook_dim", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        logging.warning("ignoring unknown %s config fields in ddjax.json: %s", kind, unknown)
    config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})
    if kind == "dd":
        if codebook_dim is None:
            raise ValueError("a dd model_config needs codebook_dim")
        return DDConfig(config, int(codebook_dim))
    return config


def init_fn(kind: str):
    """`init_params(config, rng)` for `kind`."""
    _check_kind(kind)
    return {"gpt": gpt_lib.init_params, "vq": vq_lib.init_params, "dd": dd_model.init_params,
            "var": var_model.init_params, "var_vae": var_vqvae.init_params,
            "var_dd": var_dd_model.init_params,
            "dd2": lambda c, rng: dd2_functional.init_params(c, "generator", rng),
            "dd2_teacher": lambda c, rng: dd2_functional.init_params(c, "teacher", rng)}[kind]


@functools.lru_cache(maxsize=32)
def _abstract_params(kind: str, config: Any) -> Any:
    fn = init_fn(kind)
    return jax.eval_shape(lambda: fn(config, jax.random.PRNGKey(0)))


def abstract_params(kind: str, config: Any) -> Any:
    """Shapes and dtypes of the params of `kind` for `config` (nothing is allocated; cached)."""
    return jax.tree_util.tree_map(lambda s: s, _abstract_params(kind, config))


# -- PyTorch ------------------------------------------------------------------------------------
def to_state_dict(params: Any, kind: str, *, vq_codebook_used: bool = True,
                  config: Any = None) -> StateDict:
    """params -> {official key: numpy array}, dtypes kept (bfloat16 stays bfloat16).

    var / var_vae need `config`: their buffers (written too) are built from it.
    """
    _check_kind(kind)
    kind, config = _as_student(kind, config)
    if kind in VAR_KINDS:
        if config is None:
            raise ValueError(f"exporting {kind} needs its config (the buffers depend on it)")
        fn = {"var": var_loading.var_state_dict, "var_vae": var_loading.vqvae_state_dict,
              "var_dd": var_dd_loading.var_dd_state_dict}[kind]
        return fn(params, config)
    state = flax_to_torch(params)
    if kind == "vq" and vq_codebook_used:
        dtype = state["quantize.embedding.weight"].dtype
        state[VQ_USAGE_KEY] = np.zeros((VQ_USAGE_SIZE,), dtype)
    return state


def export_torch(params: Any, kind: str, path: str, *, config: Any = None,
                 nest_under: Iterable[str] | None = None, vq_codebook_used: bool = True) -> str:
    """Writes `params` under the official key names to `.safetensors` (flat) or `.pt`.

    Args:
      params: ddjax params of `kind`.
      kind: "gpt", "vq" or "dd".
      path: `.safetensors` (no torch needed) or `.pt`/`.pth`.
      config: when given, every key and shape is checked against it first.
      nest_under: `.pt` top-level keys holding the weights (default `NEST_UNDER[kind]`:
        {"model": sd} for gpt/vq, {"model": sd, "ema": sd} for dd); () writes a bare state dict.
      vq_codebook_used: add LlamaGen's `quantize.codebook_used` buffer (zeros) for "vq".
    Returns the path. var / var_vae need `config` (bare state dicts with VAR's buffers). A DD2
    generator of kind "student" (needs `config`) is written as its DD student ("dd" / "var_dd").
    """
    _check_kind(kind)
    if kind == "dd2" and config is None:
        raise ValueError("exporting dd2 needs its config (a student generator is written as a DD "
                         "student)")
    kind, config = _as_student(kind, config)
    if config is not None:
        check_params(params, abstract_params(kind, config), source=f"{kind} params",
                     key_fn=_key_fn(kind))
    nest = NEST_UNDER[kind] if nest_under is None else tuple(nest_under)
    state = to_state_dict(params, kind, vq_codebook_used=vq_codebook_used, config=config)
    write_state_dict(path, state, nest_under=nest)
    return path


def import_torch(path: str, kind: str, config: Any, weights_key: str | None = None, *,
                 ignore: Iterable[str] = ()) -> Any:
    """Params for `config` from a `.pt`/`.safetensors` checkpoint with the official key names.

    Weights may sit under "ema", "model", "module", "state_dict" (searched in that order, so
    EMA weights win) or at the top level; `weights_key` picks one. Buffers (RoPE tables, KV
    caches, `codebook_used`) and the regexes in `ignore` are skipped. Leaves get the dtype of
    `config.param_dtype`. Raises CheckpointError listing every missing, unexpected and
    mis-shaped key. A DD2 generator of kind "student" reads a DD student's checkpoint.
    """
    kind, config = _as_student(kind, config)
    if kind == "var_dd" and weights_key is None:  # trainer.ema_parameters, else var_wo_ddp
        return var_dd_loading.load_var_dd(path, config)
    if kind in VAR_KINDS:
        ignore = (*ignore, *(var_loading.VQVAE_BUFFERS if kind == "var_vae" else var_loading.VAR_BUFFERS))
    return torch_to_flax(read_state_dict(path, weights_key), abstract_params(kind, config),
                         source=path, ignore=ignore, key_fn=_key_fn(kind))


# -- ddjax (Orbax) directories ------------------------------------------------------------------
def save_jax(directory: str, params: Any, kind: str, config: Any, *, source: str | None = None,
             overwrite: bool = False) -> str:
    """Orbax directory DIR/params + DIR/ddjax.json ({kind, model_config, source}); returns DIR.

    The params are checked against `config` first.
    """
    check_params(params, abstract_params(kind, config), source=f"{kind} params", key_fn=_key_fn(kind))
    return save_params(directory, params, kind=kind, model_config=config_to_meta(kind, config),
                       source=source, overwrite=overwrite)


def load_jax(directory: str, kind: str | None = None) -> tuple[Any, Any]:
    """(params, config) from a directory written by `save_jax` (or `to-jax`, or training).

    The config comes from ddjax.json and every key and shape is checked against it; the params
    keep the dtypes they were stored with. `kind`, when given, must match the stored one.
    """
    meta = read_meta(directory)
    stored_kind = meta.get("kind")
    if kind is not None and stored_kind != kind:
        raise ValueError(f"{directory} holds a {stored_kind!r} checkpoint, expected {kind!r}")
    if stored_kind not in KINDS:
        raise ValueError(f"{directory}: unknown kind {stored_kind!r} in ddjax.json")
    config = config_from_meta(stored_kind, meta)
    params, _ = load_params(directory, kind=stored_kind)
    check_params(params, abstract_params(stored_kind, config), source=directory,
                 key_fn=_key_fn(stored_kind))
    return params, config


def torch_to_jax(src: str, dst: str, kind: str, config: Any, weights_key: str | None = None, *,
                 ignore: Iterable[str] = (), overwrite: bool = False) -> str:
    """PyTorch checkpoint -> ddjax directory (`import_torch` then `save_jax`); returns DIR."""
    params = import_torch(src, kind, config, weights_key, ignore=ignore)
    leaves = jax.tree_util.tree_leaves(params)
    logging.info("converted %s: %d tensors, %.1fM parameters", src, len(leaves),
                 sum(x.size for x in leaves) / 1e6)
    return save_jax(dst, params, kind, config, source=src, overwrite=overwrite)


def jax_to_torch(src: str, dst: str, kind: str | None = None, *,
                 nest_under: Iterable[str] | None = None, vq_codebook_used: bool = True) -> str:
    """ddjax directory -> `.safetensors`/`.pt` with the official key names; returns `dst`."""
    params, config = load_jax(src, kind)
    stored_kind = read_meta(src)["kind"]
    return export_torch(params, stored_kind, dst, nest_under=nest_under,
                        vq_codebook_used=vq_codebook_used,
                        config=config if stored_kind in (*VAR_KINDS, "dd2") else None)


__all__ = [
    "KINDS",
    "NEST_UNDER",
    "VAR_KINDS",
    "abstract_params",
    "build_config",
    "config_from_meta",
    "config_to_meta",
    "export_torch",
    "import_torch",
    "jax_to_torch",
    "load_jax",
    "save_jax",
    "to_state_dict",
    "torch_to_jax",
]
