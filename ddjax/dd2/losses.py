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



# -- the x_0 (denoiser) form used in training --------------------------------------------------
# (x_t [.., L, d], t [.., L], prefix [B, L, d]) -> E[x_0 | x_t] [.., L, d]
MeanFn = Callable[[Array, Array, Array], Array]


def csd_loss_x0(q: Array, eps: Array, t: Array, teacher_mean: MeanFn, fake_mean: MeanFn, *,
                alpha: float = 1.0) -> Array:
    """`csd_loss` in denoiser form: with s = -(x - (1 - t) m) / t^2 the score-form terms are
    (1 - t)^2 / t^4 times these, so this is `csd_loss` with weight t^4 / (1 - t)^2:

        L = mean_{B, n} [ (1 - alpha) |m_T - m_F|^2 + (m_T - m_F) . (m_F - q) ]

    It is bounded as t -> 0 (the score form grows as 1 / t^2). The mean (not the sum) over
    positions keeps the learning rate independent of L. q [B, n, d]; eps [B, n, d] and t [B, n],
    or R noise draws per sequence, eps [B, R, n, d] and t [B, R, n] (averaged; the prefix is
    shared, so the means take x_t [B, R, n, d]).
    """
    prefix = jax.lax.stop_gradient(q)
    qb = q[:, None] if eps.ndim == q.ndim + 1 else q
    tt = t[..., None]
    x = (1.0 - tt) * qb + tt * eps
    m_t = teacher_mean(x, t, prefix)
    m_f = fake_mean(x, t, prefix)
    diff = m_t - m_f
    per = (1.0 - alpha) * jnp.sum(diff * diff, -1) + jnp.sum(diff * (m_f - qb), -1)
    return jnp.mean(per)


def velocity_loss(v: Array, target: Array) -> Array:
    """mean over everything but d of |v - target|^2 (summed over d): the FCS loss with target
    eps - q (denoising score matching in velocity form) and the GTS loss with the teacher's
    closed-form velocity (x_t - m_T) / t."""
    return jnp.mean(jnp.sum(jnp.square(v - target), -1))


def code_ce(q: jax.Array, tokens: jax.Array, codebook: jax.Array, tau: jax.Array) -> jax.Array:
    """Mean cross-entropy of tokens [B, L] under logits -|q - c_k|^2 / (2 tau^2), q [B, L, d]."""
    c = codebook.astype(jnp.float32)
    d2 = (jnp.sum(q * q, -1, keepdims=True) - 2.0 * q @ c.T + jnp.sum(c * c, -1))
    logp = jax.nn.log_softmax(-d2 / (2.0 * tau * tau), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))


__all__ = ["csd_loss", "csd_loss_x0", "velocity_loss", "code_ce", "ScoreFn", "MeanFn"]
