"""The student of each teacher family, behind one interface the trainer and loaders use.

    fam = student_family(teacher.family)                     # "llamagen" or "var"
    cfg = fam.config_for(teacher, compute_dtype="float32")
    params = fam.init_params(cfg, rng)
    params = fam.init_from_teacher(params, teacher.params, rng)
    cont, logits = fam.module(cfg).apply({"params": params}, x_t, labels, t)   # t in tokens
    # (ddjax.student.sampling.StudentApply(cfg) wraps that for the samplers)
    fam.to_json(cfg) / fam.from_json(d)                       # ddjax.json's model_config

Both students take X_t [B, L, d] (codes before t, noise after), labels [B] and t [B] (tokens
given, a step boundary of the teacher) and return (continuous [B, L, d], logits [B, L, V]).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddjax.student import model as llamagen_model
from ddjax.student import var_model
from ddjax.teacher.base import Teacher
from ddjax.teacher.llamagen.gpt import GPTConfig, as_dtype
from ddjax.teacher.var.model import VARConfig
from ddjax.utils.checkpoint import config_to_dict


@dataclasses.dataclass(frozen=True)
class StudentFamily:
    name: str
    config_for: Callable[..., Any]  # (teacher, compute_dtype="float32") -> model config
    module: Callable[[Any], nn.Module]
    init_params: Callable[[Any, jax.Array], Any]
    init_from_teacher: Callable[[Any, Any, jax.Array], Any]  # (student, teacher params, rng)
    to_json: Callable[[Any], dict]
    from_json: Callable[[dict], Any]

    def abstract_params(self, cfg: Any) -> Any:
        return _abstract(self, cfg)


@functools.lru_cache(maxsize=16)
def _abstract(fam: StudentFamily, cfg: Any) -> Any:
    return jax.eval_shape(functools.partial(fam.init_params, cfg), jax.random.PRNGKey(0))


def _tuples(d: dict, names: set[str]) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}


# -- LlamaGen -------------------------------------------------------------------------------------
def _llamagen_config(teacher: Teacher, compute_dtype: Any = "float32") -> llamagen_model.DDConfig:
    return llamagen_model.dd_config(teacher.config, teacher.code_dim, dtype=as_dtype(compute_dtype),
                                    param_dtype=jnp.float32)


def _llamagen_from_json(meta: dict) -> llamagen_model.DDConfig:
    """{"gpt": {...}, "codebook_dim"} or a flat dict."""
    mc = dict(meta)
    gpt = dict(mc.pop("gpt")) if isinstance(mc.get("gpt"), dict) else mc
    codebook_dim = mc.pop("codebook_dim", gpt.pop("codebook_dim", None))
    if codebook_dim is None:
        raise ValueError("a DD model_config needs codebook_dim")
    return llamagen_model.DDConfig(GPTConfig(**_tuples(gpt, set(GPTConfig.__dataclass_fields__))),
                                   int(codebook_dim))


LLAMAGEN = StudentFamily(
    name="llamagen", config_for=_llamagen_config, module=llamagen_model.DDModel,
    init_params=llamagen_model.init_params,
    init_from_teacher=lambda s, t, rng: llamagen_model.init_from_teacher(s, t),
    to_json=lambda c: {"gpt": config_to_dict(c.gpt), "codebook_dim": c.codebook_dim},
    from_json=_llamagen_from_json)


# -- VAR ------------------------------------------------------------------------------------------
def _var_config(teacher: Teacher, compute_dtype: Any = "float32") -> var_model.VARDDConfig:
    cfg = dataclasses.replace(teacher.config, dtype=as_dtype(compute_dtype), param_dtype=jnp.float32)
    return var_model.var_dd_config(cfg)


def _var_from_json(meta: dict) -> var_model.VARDDConfig:
    var = _tuples(dict(meta["var"]), set(VARConfig.__dataclass_fields__))
    return var_model.VARDDConfig(VARConfig(**var), bool(meta.get("n_d_embed", True)),
                                 bool(meta.get("layerwise_n_d_embed", True)))


VAR = StudentFamily(
    name="var", config_for=_var_config, module=var_model.VARDDModel,
    init_params=var_model.init_params, init_from_teacher=var_model.init_from_teacher,
    to_json=lambda c: {"var": config_to_dict(c.var), "n_d_embed": c.n_d_embed,
                       "layerwise_n_d_embed": c.layerwise_n_d_embed},
    from_json=_var_from_json)

FAMILIES = {"llamagen": LLAMAGEN, "var": VAR}


def student_family(name: str) -> StudentFamily:
    if name not in FAMILIES:
        raise ValueError(f"no DD student for teacher family {name!r}; available: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(cfg: Any) -> StudentFamily:
    """The family of a model config (DDConfig or VARDDConfig)."""
    return VAR if isinstance(cfg, var_model.VARDDConfig) else LLAMAGEN


def config_from_json(model_config: dict) -> Any:
    """ddjax.json's model_config -> the model config of its family."""
    return (VAR if "var" in model_config else LLAMAGEN).from_json(model_config)


__all__ = ["StudentFamily", "LLAMAGEN", "VAR", "FAMILIES", "student_family", "family_of_config",
           "config_from_json"]
