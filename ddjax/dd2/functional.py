"""The pure forward functions of DD2's three networks, as the losses and samplers use them,
for both teacher families: `ddjax.dd2.model` (LlamaGen, `DD2Config`) and `ddjax.dd2.var_model`
(VAR, `VARDD2Config`). Shapes: continuous tokens [B, L, d], labels [B] int, times [B, L] (or
[B, R, L] for R noise draws per sequence).

`aux` is what a family's networks read besides their own weights: the codebook ("codebook",
read by the generator "student"), and for VAR the VQVAE's `quantize` params (its backbones
read tokens through VAR's input map, `var_model.var_input`); `family_aux(teacher)` builds it.
LlamaGen's score networks read nothing of it (aux may be None there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddjax.dd2 import model as model_lib
from ddjax.dd2 import score as score_lib
from ddjax.dd2 import student_generator, var_model
from ddjax.dd2.model import DD2Transformer
from ddjax.teacher.llamagen import sampling as sampling_lib
from ddjax.teacher.var import family as var_family

Array = jax.Array


def is_var(config: Any) -> bool:
    return isinstance(config, var_model.VARDD2Config)


def family_aux(teacher: Any) -> Any:
    """The aux input of a teacher's DD2 networks (module docstring)."""
    out = {"codebook": jnp.asarray(teacher.codebook, jnp.float32)}
    if teacher.family == "var":
        out["quantize"] = teacher.tokenizer_params["quantize"]
    return out


def _var_aux(aux: Any) -> Any:
    if aux is None or "quantize" not in aux:
        raise ValueError("VAR's DD2 networks need aux = family_aux(teacher) (the VQVAE's quantize "
                         "params)")
    return aux["quantize"]


def teacher_logits(params: Any, config: Any, x: Array, labels: Array,
                   drop: Array | None = None, aux: Any = None) -> Array:
    """The adapted teacher's raw logits [B, L, V] given the continuous prefixes of x."""
    if is_var(config):
        inp = var_model.var_input(config, _var_aux(aux), x)
        return var_model.module(config, "teacher").apply({"params": params}, inp, labels, drop=drop)
    return DD2Transformer(config, "teacher").apply({"params": params}, x, labels, drop=drop)


def teacher_log_probs(params: Any, config: Any, x: Array, labels: Array, settings: Any,
                      aux: Any = None) -> Array:
    """The adapted teacher's processed distribution (CFG, temperature, top-k, top-p as in the
    family's sampling) of every position given the continuous prefix: [B, L, V] log-probs."""
    if is_var(config):
        inp = var_model.var_input(config, _var_aux(aux), x)
        return var_family.processed_log_probs(params, config.var, inp, labels, settings)
    if settings.use_cfg:
        b = x.shape[0]
        drop = jnp.concatenate([jnp.zeros(b, bool), jnp.ones(b, bool)])
        both = teacher_logits(params, config, jnp.concatenate([x, x]), jnp.concatenate([labels, labels]),
                              drop)
        pos = jnp.arange(x.shape[1])
        use = (settings.cfg_interval < 0) | (pos <= settings.cfg_interval + 1)
        logits = sampling_lib.guide(both[:b], both[b:], settings.cfg_scale, use[None, :, None])
    else:
        logits = teacher_logits(params, config, x, labels)
    return sampling_lib.process_logits(logits, settings)


def mixture_mean(x_t: Array, t: Array, log_p: Array, codebook: Array) -> Array:
    """E[x_0 | x_t] under the per-position mixtures: x_t [B, ..., L, d], t [B, ..., L], log_p
    [B, L, V] (broadcast over the middle axes) -> [B, ..., L, d]."""
    shape = x_t.shape
    lp = jnp.broadcast_to(log_p.reshape(log_p.shape[0], *([1] * (x_t.ndim - 3)), *log_p.shape[1:]),
                          (*shape[:-1], log_p.shape[-1]))
    m = score_lib.posterior_mean(x_t.reshape(-1, shape[-1]), t.reshape(-1),
                                 lp.reshape(-1, lp.shape[-1]), codebook)
    return m.reshape(shape)


def features(params: Any, config: Any, prefix: Array, labels: Array, aux: Any = None) -> Array:
    """A score network's backbone features [B, L, dim]; row i reads the prefix before token i
    (LlamaGen: tokens < i; VAR: the scales before i's)."""
    if is_var(config):
        inp = var_model.var_input(config, _var_aux(aux), prefix)
        return var_model.module(config, "score").apply(
            {"params": params}, inp, labels, method=var_model.VARDD2Transformer.features)
    return DD2Transformer(config, "score").apply({"params": params}, prefix, labels,
                                                 method=DD2Transformer.features)


def velocity(params: Any, config: Any, prefix: Array, labels: Array, x_t: Array, t: Array,
             aux: Any = None) -> Array:
    """A score network's velocity v(x_t, t | prefix_<i): prefix [B, L, d]; x_t [B, L, d] or
    [B, R, L, d] (R draws share the backbone's features), t of x_t's shape minus d."""
    model = var_model.module(config, "score") if is_var(config) else DD2Transformer(config, "score")
    h = features(params, config, prefix, labels, aux)
    if x_t.ndim == 4:
        h = jnp.broadcast_to(h[:, None], (*x_t.shape[:3], h.shape[-1]))
    return model.apply({"params": params}, x_t, t, h, method=type(model).velocity)


def denoised(params: Any, config: Any, prefix: Array, labels: Array, x_t: Array, t: Array,
             aux: Any = None) -> Array:
    """The network's E[x_0 | x_t] = x_t - t v."""
    v = velocity(params, config, prefix, labels, x_t, t, aux)
    return x_t - t[..., None] * v


def generate(params: Any, config: Any, eps: Array, labels: Array, aux: Any = None) -> Array:
    """The one-step generator, [B, L, d]. config.generator "score": q = eps - v(eps_i, t = 1 |
    eps before i) (LlamaGen: eps_<i; VAR: the noise of the earlier scales, through VAR's input
    map); "student": DD1's student with its code choice passed straight through
    (`ddjax.dd2.student_generator`; reads aux["codebook"])."""
    if config.generator == "student":
        if aux is None or "codebook" not in aux:
            raise ValueError("DD2's student generator needs aux = family_aux(teacher) (the codebook)")
        return student_generator.generate(params, config, eps, labels, aux["codebook"])
    t = jnp.ones(eps.shape[:2], jnp.float32)
    return eps - velocity(params, config, eps, labels, eps, t, aux)


# -- parameters, per family ---------------------------------------------------------------------
def score_head_name(config: Any) -> str:
    """The MLP head's top-level parameter name (VAR's `head` is its logits head)."""
    return "score_head" if is_var(config) else "head"


def init_params(config: Any, role: str, rng: Array) -> Any:
    """Fresh params of a DD2 network of either family: role "teacher", "score" (the guidance
    network and the tuned network), or "generator" (config.generator's network)."""
    if role == "generator":
        if config.generator == "student":
            return student_generator.init_params(config, rng)
        role = "score"
    if is_var(config):
        return var_model.init_params(config, role, rng)
    return model_lib.init_params(config, role, rng)


def score_from_teacher(config: Any, adapted: Any, rng: Array) -> Any:
    """A score network with the adapted teacher's backbone and a fresh MLP head."""
    if is_var(config):
        return var_model.score_from_teacher(config, adapted, rng)
    return model_lib.score_from_teacher(config, adapted, rng)


__all__ = ["teacher_logits", "teacher_log_probs", "mixture_mean", "features", "velocity", "denoised",
           "generate", "family_aux", "is_var", "init_params", "score_from_teacher", "score_head_name"]
