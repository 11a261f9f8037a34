"""The teacher's conditional score in closed form (DD2 §3.2.1; method.md §2's posterior).

At one position the teacher's processed distribution p over the codebook C [K, d] is the
data x_0 ~ sum_k p_k delta(c_k); with the RectFlow path x_t = (1 - t) x_0 + t eps the noised
density is the Gaussian mixture

    p_t(x) = sum_k p_k N(x; (1 - t) c_k, t^2 I).

Its score is

    s(x, t) = grad_x log p_t(x) = -(x - (1 - t) m(x, t)) / t^2,    m = sum_k w_k c_k = E[x_0 | x_t],

with the flow map's posterior weights w = softmax(log p - |x - (1 - t) c|^2 / (2 t^2))
(`ddjax.mapper.flow.posterior_logits`), so the score and the flow map's velocity
v = (x - m) / t are two views of one posterior mean. In DD2 p is the teacher's distribution
given the clean prefix q_<i (CFG, top-k and top-p applied as in sampling).

All functions take rows: x [N, d], t scalar or [N] in (0, 1], log_p [N, K] (-inf = removed
code), codebook [K, d]; they are pure and jit-friendly, and form no [N, K, d] tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddjax.mapper.codes import column, mix
from ddjax.mapper.flow import posterior_logits

Array = jax.Array


def posterior_mean(x: Array, t: Array | float, log_p: Array, codebook: Array) -> Array:
    """E[x_0 | x_t = x] = w @ C, [N, d] float32."""
    logits = posterior_logits(x, t, log_p, codebook)
    w = jax.nn.softmax(logits, axis=-1)
    return mix(w, jnp.asarray(codebook, jnp.float32))


def conditional_score(x: Array, t: Array | float, log_p: Array, codebook: Array) -> Array:
    """grad_x log p_t(x) = -(x - (1 - t) E[x_0 | x]) / t^2, [N, d] float32."""
    x = jnp.asarray(x, jnp.float32)
    t = column(t, x.shape[0])
    return -(x - (1.0 - t) * posterior_mean(x, t, log_p, codebook)) / (t * t)


def log_density(x: Array, t: Array | float, log_p: Array, codebook: Array) -> Array:
    """log p_t(x) of the Gaussian-smoothed mixture, [N] float32 (log-sum-exp over codes)."""
    x = jnp.asarray(x, jnp.float32)
    t = column(t, x.shape[0])
    d = x.shape[-1]
    logits = posterior_logits(x, t, log_p, codebook)  # log p_k - |x - (1-t) c_k|^2 / (2 t^2)
    norm = -0.5 * d * jnp.log(2.0 * jnp.pi) - d * jnp.log(t[:, 0])
    return jax.scipy.special.logsumexp(logits, axis=-1) + norm


def score_from_velocity(v: Array, x: Array, t: Array | float) -> Array:
    """The score of a velocity prediction v = (x - m) / t (m = x - t v), [N, d]."""
    x = jnp.asarray(x, jnp.float32)
    t = column(t, x.shape[0])
    return -(x - (1.0 - t) * (x - t * v)) / (t * t)


def velocity_from_score(s: Array, x: Array, t: Array | float) -> Array:
    """The inverse of `score_from_velocity`: v = (x - m) / t with m = (x + t^2 s) / (1 - t);
    t must be < 1 (at t = 1 the score carries no information about m)."""
    x = jnp.asarray(x, jnp.float32)
    t = column(t, x.shape[0])
    m = (x + t * t * s) / (1.0 - t)
    return (x - m) / t


__all__ = ["posterior_mean", "conditional_score", "log_density", "score_from_velocity",
           "velocity_from_score"]
