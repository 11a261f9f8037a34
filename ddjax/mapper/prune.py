"""The bound behind late pruning of the flow map: when may a row drop codes without changing its flow?

`flow.integrate` tests each row with `certify` at every grid time <= prune_t until the row is
certified, then finishes the row on the codes `keep` returns. The derivation is in
`prune_bound`'s docstring.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ddjax.mapper.codes import code, column, dots, logits_from_dots, mix, sq_norms
from ddjax.teacher.base import argmax

Array = jax.Array
# Slack of the bootstrap: the posterior mean may move up to PRUNE_SLACK * (max |c| + |core mean|)
# (>= the largest distance from the core mean to a code) beyond the core's radius.
PRUNE_SLACK = 0.01
# A certified row that needs at most this many codes keeps only this many (cheaper to select).
SMALL_KEEP = 64
# The flow map tries the group core on a row only from its (GROUP_AFTER + 1)-th test on. Without
# tight groups of codes the top code alone certifies nearly every row within two tests (63 of
# 64 rows of a random 16384-code codebook under top-k), and the group's bound costs as much
# again as the single code's, for the whole chunk, whenever one row asks for it.
GROUP_AFTER = 2


class PruneBound(NamedTuple):
    """The bound for N rows over K codes."""

    log_ratio: Array  # [N, K] F_j >= log(w_j / W_core) until t_end; -inf: core and removed codes
    core: Array  # [N, K] bool, the core codes (always kept)
    distance: Array  # [N, K] |c_j - core mean|
    needed: Array  # [N] int32, the core plus the codes with F_j >= log(prune_tol / K)
    certified: Array  # [N] bool: the bound holds and needed <= prune_k


class _Core(NamedTuple):
    mask: Array  # [N, K] bool
    weights: Array | None  # [N, K] posterior restricted to the core now; None: a single code
    mean: Array  # [N, d]
    log_z: Array  # [N, 1] log of the core's (unnormalised) posterior mass now


def _growth(beta: Array, gamma: Array, big_t: Array) -> Array:
    """max over tau in [0, big_t] of tau (beta - tau gamma / 2), elementwise, in closed form."""
    inner = jnp.clip(beta / jnp.where(gamma > 0, gamma, 1.0), 0.0, big_t)
    tau = jnp.where(gamma > 0, inner, jnp.where(2.0 * beta > big_t * gamma, big_t, 0.0))
    return tau * (beta - 0.5 * tau * gamma)


def _single_core(logits: Array, codebook: Array) -> _Core:
    """The top code alone."""
    top = argmax(logits)
    mean = code(codebook, top)
    mask = jnp.arange(logits.shape[-1])[None, :] == top[:, None]
    return _Core(mask, None, mean, jnp.max(logits, axis=-1, keepdims=True))


def _group_core(logits: Array, codebook: Array, mask: Array) -> _Core:
    """The codes of `mask` (which holds the top code), weighted by their posterior now."""
    lc = jnp.where(mask, logits, -jnp.inf)
    top = jnp.max(lc, axis=-1, keepdims=True)
    e = jnp.exp(lc - top)
    z = jnp.sum(e, axis=-1, keepdims=True)
    w = e / z
    return _Core(mask, w, mix(w, codebook), top + jnp.log(z))


def _ratio_bound(
    x: Array, t: Array, t_end: float, xc: Array, logits: Array, finite: Array, codebook: Array,
    c2: Array, core: _Core, prune_k: int, prune_tol: float,
) -> PruneBound:
    """The bound for one core per row (prune_bound's docstring); t [N, 1], xc = x . c [N, K]."""
    cc = dots(core.mean, codebook)
    mean2 = jnp.sum(core.mean * core.mean, axis=-1, keepdims=True)
    e2 = jnp.maximum(c2 - 2.0 * cc + mean2, 0.0)
    e = jnp.sqrt(e2)
    if core.weights is None:
        var = radius = jnp.zeros_like(mean2)
    else:
        var = jnp.sum(core.weights * e2, axis=-1, keepdims=True)
        radius = jnp.max(jnp.where(core.mask, e, 0.0), axis=-1, keepdims=True)
    c_max = jnp.sqrt(jnp.max(c2, axis=-1, keepdims=True))
    slack = PRUNE_SLACK * (c_max + jnp.sqrt(mean2))
    rho = radius + slack
    a = 1.0 - t
    lam0 = a / t
    r = (x - a * core.mean) / t  # the noise the core mean implies
    re = (xc - a * cc) / t - jnp.sum(r * core.mean, axis=-1, keepdims=True)  # r . (c_j - mean)
    q = e2 - var
    beta = re - lam0 * (q - e * rho)
    gamma = q - 2.0 * e * rho
    growth = _growth(beta, gamma, 1.0 / t_end - 1.0 / t)
    f = jnp.where(core.mask | ~finite, -jnp.inf, logits - core.log_z + growth)
    spread = jnp.sum(jnp.where(e > 0, jnp.exp(f) * e, 0.0), axis=-1)
    needed = (jnp.sum(core.mask, axis=-1) + jnp.sum(f >= math.log(prune_tol / f.shape[-1]), axis=-1))
    ok = ((spread < slack[:, 0]) | (spread == 0.0)) & (needed <= prune_k)
    return PruneBound(f, core.mask, e, needed.astype(jnp.int32), ok)


def certify(
    x: Array, t: Array, t_end: float, xc: Array, logits: Array, log_p: Array, codebook: Array,
    c2: Array, prune_k: int, prune_tol: float, todo: Array | None = None,
) -> PruneBound:
    """`prune_bound` from pieces the integrator already has: t [N, 1], xc = x . c [N, K], the
    posterior logits [N, K] and c2 = |c|^2. The group core is only computed when a row of
    `todo` [N] bool (default: all) fails with the top code alone; rows outside `todo` keep the
    top code's bound, so a row's bound never depends on the other rows."""
    finite = log_p > -jnp.inf
    single = _ratio_bound(x, t, t_end, xc, logits, finite, codebook, c2,
                          _single_core(logits, codebook), prune_k, prune_tol)

    def with_group(_) -> PruneBound:
        # the group: every code that the top code alone could not rule out, and all codes closer
        hard = single.log_ratio >= math.log(prune_tol / logits.shape[-1])
        reach = jnp.max(jnp.where(hard, single.distance, 0.0), axis=-1, keepdims=True)
        mask = finite & (single.distance <= reach) | single.core
        group = _ratio_bound(x, t, t_end, xc, logits, finite, codebook, c2,
                             _group_core(logits, codebook, mask), prune_k, prune_tol)
        use = group.certified & ~single.certified
        if todo is not None:
            use = use & todo
        return PruneBound(*(jnp.where(use.reshape(use.shape + (1,) * (a.ndim - 1)), a, b)
                            for a, b in zip(group, single)))

    failed = ~single.certified if todo is None else ~single.certified & todo
    return jax.lax.cond(jnp.any(failed), with_group, lambda _: single, None)


def prune_bound(
    x: Array, t: float, log_p: Array, codebook: Array, t_end: float,
    prune_k: int = 512, prune_tol: float = 1e-6,
) -> PruneBound:
    """Bounds every code's posterior weight, relative to a core of codes, for all t' in [t_end, t].

    Args:
      x: [N, d] points at time t (0 < t_end <= t < 1).
      log_p: [N, K] log-probabilities (-inf: removed); codebook: [K, d].
      prune_k, prune_tol: a row is certified if its bound holds and at most prune_k codes (the
        core included) have a bound >= prune_tol / K.
    Returns:
      PruneBound (float32); `keep` turns it into the kept codes and the dropped-mass bound.

    The flow in other coordinates. With lambda = 1/t - 1 and u = x / t,
    (x - (1 - t) c_k) / t = u - lambda c_k: the posterior logits are l_k = log p_k -
    |u - lambda c_k|^2 / 2 and dx/dt = (x - m) / t (m = posterior mean of the codes the flow
    uses) is du/dlambda = m. Hence u(lambda) = u_0 + tau mbar, tau = lambda - lambda_0 =
    1/t' - 1/t >= 0, mbar = the average of m over [lambda_0, lambda]: a weighted mean of codes.

    The bound. Take a core C (weights wc = posterior restricted to C now, mean cbar, variance
    V = sum wc |c - cbar|^2, radius R = max_C |c - cbar|), e_j = c_j - cbar and
    r = (x - (1 - t) cbar) / t. By Gibbs' inequality log sum_C exp(l_k) >= sum_C wc_k l_k + H(wc)
    (equality now), and expanding the squares, for every code j and delta = mbar - cbar

        log(w_j / W_C)(t') <= A_j + tau (r.e_j - lambda_0 (|e_j|^2 - V) + (lambda_0 + tau) e_j.delta)
                              - tau^2 (|e_j|^2 - V) / 2,

    A_j = log(w_j / W_C) now. If |delta| <= rho, e_j.delta <= |e_j| rho gives A_j + tau beta_j -
    tau^2 gamma_j / 2 with beta_j = r.e_j - lambda_0 (|e_j|^2 - V - |e_j| rho) and gamma_j =
    |e_j|^2 - V - 2 |e_j| rho; F_j (`log_ratio`) is its maximum over tau in [0, 1/t_end - 1/t]
    (closed form). Bootstrap: |m - cbar| <= R + sum_{j not in C} (w_j / W_C) |e_j| <= R + B,
    B = sum_j exp(F_j) |e_j|. With rho = R + slack and B < slack (slack = PRUNE_SLACK *
    (max |c| + |cbar|)), m, hence mbar, can never leave the rho-ball (continuity from t' = t),
    so the bound holds on the whole interval, for the flow over all codes and for the flow over
    any kept set that contains C. A row integrated on a kept set S therefore gives the codes it
    drops a total weight, relative to the kept ones, of at most sum_{j not in S} exp(F_j) <
    prune_tol at every point of its remaining trajectory: the pruned velocity differs from the
    full one at the same point by less than prune_tol * (largest distance between codes) / t.
    The weight of code j relative to the core can grow by up to exp(F_j - A_j) = exp(max_tau
    tau (beta_j - tau gamma_j / 2)): a lot for codes close to the core (gamma_j <= 0), which
    must therefore be kept.

    Two cores are tried per row: the top code alone (V = R = 0; the usual case) and, if that
    fails, the group of every code the top code alone could not rule out plus all codes closer
    to it (codebooks with tight groups of near-duplicate codes, where the posterior stays spread
    over the group until very late). The bound is for the exact flow from x; the integrator
    follows it up to its integration error.
    """
    x = jnp.asarray(x, jnp.float32)
    log_p = jnp.asarray(log_p, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    if not 0.0 < t_end <= t < 1.0:
        raise ValueError(f"need 0 < t_end <= t < 1, got t={t}, t_end={t_end}")
    tc = column(t, x.shape[0])
    c2 = sq_norms(codebook)
    xc = dots(x, codebook)
    return certify(x, tc, t_end, xc, logits_from_dots(xc, tc, log_p, c2), log_p, codebook, c2,
                   prune_k, prune_tol)


def keep(bound: PruneBound, size: int) -> tuple[Array, Array]:
    """The `size` codes to keep [N, size] int32 (the core first, then by bound) and an upper
    bound [N] on the dropped codes' total posterior weight relative to the kept ones, valid at
    every t' in [t_end, t] of the flow over the kept codes (below prune_tol if certified and
    size >= needed)."""
    f = bound.log_ratio
    vals, idx = jax.lax.top_k(jnp.where(bound.core, jnp.inf, f), size)
    dropped = jnp.sum(jnp.where(~bound.core & (f <= vals[:, -1:]), jnp.exp(f), 0.0), axis=-1)
    return idx, dropped
