"""Row-wise linear algebra between points and codes, shared by the flow map and its pruning bound.

A codebook is either shared, [K, d], or one per row, [N, S, d] (the codes a row kept after
support or late pruning). Nothing here reduces across rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dots(x: Array, codebook: Array) -> Array:
    """x . c_k for every row: [N, d] with [K, d] or [N, S, d] -> [N, K] (or [N, S])."""
    if codebook.ndim == 2:
        return x @ codebook.T
    return jnp.einsum("nd,nsd->ns", x, codebook)


def mix(w: Array, codebook: Array) -> Array:
    """sum_k w_k c_k for every row: [N, K] with [K, d] or [N, S, d] -> [N, d]."""
    if codebook.ndim == 2:
        return w @ codebook
    return jnp.einsum("ns,nsd->nd", w, codebook)


def sq_norms(codebook: Array) -> Array:
    """|c_k|^2 broadcastable against [N, K]: [1, K] or [N, S]."""
    c2 = jnp.sum(codebook * codebook, axis=-1)
    return c2[None, :] if codebook.ndim == 2 else c2


def gather(log_p: Array, codebook: Array, idx: Array) -> tuple[Array, Array]:
    """Keeps the codes idx [N, S] of each row: log_p [N, S] and per-row codebooks [N, S, d]."""
    lp = jnp.take_along_axis(log_p, idx, axis=1)
    if codebook.ndim == 2:
        return lp, jnp.take(codebook, idx, axis=0)
    return lp, jnp.take_along_axis(codebook, idx[..., None], axis=1)


def column(t: Array | float, n: int, dtype=jnp.float32) -> Array:
    """A scalar or [N] time as an [N, 1] column."""
    return jnp.broadcast_to(jnp.asarray(t, dtype).reshape(-1, 1), (n, 1))


def logits_from_dots(xc: Array, t: Array, log_p: Array, c2: Array) -> Array:
    """Posterior logits up to a per-row constant, from xc = x . c_k [N, K] and t [N, 1].

    The |x|^2 / (2 t^2) term is dropped: the softmax does not see a per-row shift, and leaving
    |x|^2 out avoids subtracting two large numbers when t is small (the 1/t^2 factor would
    magnify their rounding error).
    """
    a = 1.0 - t
    return log_p + (2.0 * a * xc - a * a * c2) / (2.0 * t * t)
