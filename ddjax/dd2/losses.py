"""DD2's conditional score distillation (CSD) loss for the generator (dd2.md §2, SiD form).

For generated tokens q [B, n, d], per position i with its own noise eps_i and time t_i:

    x_i = (1 - t_i) q_i + t_i eps_i
    L = sum_i w(t_i) [ (1 - alpha) |s_T - s_F|^2 + (s_T - s_F) . (s_F - grad log p(x_i | q_i)) ]

with s_T = the teacher's score and s_F = the guidance network's, both at (x_i, t_i) given the
prefix sg(q_<i), and grad log p(x_i | q_i) = -(x_i - (1 - t_i) q_i) / t_i^2. The prefix is
stop-gradient: q reaches the loss only through each position's own noised copy. The guidance
network's parameters are the caller's to block (close over stop_gradient(params)).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# (x_t [B, n, d], t [B, n], prefix [B, n, d]) -> score [B, n, d]; position i may read prefix[:, :i]
ScoreFn = Callable[[Array, Array, Array], Array]


def csd_loss(q: Array, eps: Array, t: Array, teacher_score: ScoreFn, fake_score: ScoreFn, *,
             alpha: float = 1.0, weight: Callable[[Array], Array] | None = None) -> Array:
    """The mean over rows of the summed per-position CSD terms; q, eps [B, n, d], t [B, n]."""
    prefix = jax.lax.stop_gradient(q)
    tt = t[..., None]
    x = (1.0 - tt) * q + tt * eps
    s_t = teacher_score(x, t, prefix)
    s_f = fake_score(x, t, prefix)
    cond = -(x - (1.0 - tt) * q) / (tt * tt)
    diff = s_t - s_f
    per = (1.0 - alpha) * jnp.sum(diff * diff, -1) + jnp.sum(diff * (s_f - cond), -1)  # [B, n]
    w = jnp.ones_like(t) if weight is None else weight(t)
    return jnp.mean(jnp.sum(w * per, -1))


__all__ = ["csd_loss", "ScoreFn"]
