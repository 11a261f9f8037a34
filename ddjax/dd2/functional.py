"""The pure forward functions of DD2's three networks (`ddjax.dd2.model`), as the losses and
samplers use them. Shapes: continuous tokens [B, L, d], labels [B] int, times [B, L] (or
[B, R, L] for R noise draws per sequence).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddjax.dd2 import score as score_lib
from ddjax.dd2.model import DD2Config, DD2Transformer
from ddjax.teacher.llamagen import sampling as sampling_lib

Array = jax.Array


def teacher_logits(params: Any, config: DD2Config, x: Array, labels: Array,
                   drop: Array | None = None) -> Array:
    """The adapted teacher's raw logits [B, L, V] given the continuous prefixes of x."""
    return DD2Transformer(config, "teacher").apply({"params": params}, x, labels, drop=drop)


def teacher_log_probs(params: Any, config: DD2Config, x: Array, labels: Array,
                      settings: sampling_lib.SamplingSettings) -> Array:
    """The adapted teacher's processed distribution (CFG, temperature, top-k, top-p as in
    LlamaGen's sampling) of every position given the continuous prefix: [B, L, V] log-probs."""
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


def velocity(params: Any, config: DD2Config, prefix: Array, labels: Array, x_t: Array, t: Array
             ) -> Array:
    """A score network's velocity v(x_t, t | prefix_<i): prefix [B, L, d]; x_t [B, L, d] or
    [B, R, L, d] (R draws share the backbone's features), t of x_t's shape minus d."""
    model = DD2Transformer(config, "score")
    h = model.apply({"params": params}, prefix, labels, method=DD2Transformer.features)
    if x_t.ndim == 4:
        h = jnp.broadcast_to(h[:, None], (*x_t.shape[:3], h.shape[-1]))
    return model.apply({"params": params}, x_t, t, h, method=DD2Transformer.velocity)


def denoised(params: Any, config: DD2Config, prefix: Array, labels: Array, x_t: Array, t: Array
             ) -> Array:
    """The network's E[x_0 | x_t] = x_t - t v."""
    v = velocity(params, config, prefix, labels, x_t, t)
    return x_t - t[..., None] * v


def generate(params: Any, config: DD2Config, eps: Array, labels: Array) -> Array:
    """The one-step generator: q = eps - v(eps_i, t = 1 | eps_<i), [B, L, d]."""
    t = jnp.ones(eps.shape[:2], jnp.float32)
    return eps - velocity(params, config, eps, labels, eps, t)


__all__ = ["teacher_logits", "teacher_log_probs", "mixture_mean", "velocity", "denoised", "generate"]
