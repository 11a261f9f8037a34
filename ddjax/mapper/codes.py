"""Row-wise linear algebra between points and codes, shared by the flow map and its pruning bound.

A codebook is either shared, [K, d], or one per row, [N, d, S] (the codes a row kept after
support compaction or late pruning; code-minor, so the K-wide passes of the flow's velocity
run along contiguous memory). Nothing here reduces across rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dots(x: Array, codebook: Array) -> Array:
    """x . c_k for every row: [N, d] with [K, d] or [N, d, S] -> [N, K] (or [N, S])."""
    if codebook.ndim == 2:
        return x @ codebook.T
    return jnp.einsum("nd,nds->ns", x, codebook)


def mix(w: Array, codebook: Array) -> Array:
    """sum_k w_k c_k for every row: [N, K] with [K, d] or [N, d, S] -> [N, d]."""
    if codebook.ndim == 2:
        return w @ codebook
    return jnp.einsum("ns,nds->nd", w, codebook)


def sq_norms(codebook: Array) -> Array:
    """|c_k|^2 broadcastable against [N, K]: [1, K] or [N, S]."""
    if codebook.ndim == 2:
        return jnp.sum(codebook * codebook, axis=-1)[None, :]
    return jnp.sum(codebook * codebook, axis=1)


def gather(log_p: Array, codebook: Array, idx: Array) -> tuple[Array, Array]:
    """Keeps the codes idx [N, S] of each row: log_p [N, S] and per-row codebooks [N, d, S]."""
    lp = jnp.take_along_axis(log_p, idx, axis=1)
    if codebook.ndim == 2:
        return lp, jnp.swapaxes(jnp.take(codebook, idx, axis=0), 1, 2)
    return lp, jnp.take_along_axis(codebook, idx[:, None, :], axis=2)


def code(codebook: Array, idx: Array) -> Array:
    """The code idx [N] of each row, [N, d] (shared [K, d] or per-row [N, d, S] codebook)."""
    if codebook.ndim == 2:
        return jnp.take(codebook, idx, axis=0)
    return jnp.take_along_axis(codebook, idx[:, None, None], axis=2)[:, :, 0]


def running_count(mask: Array, block: int = 128) -> Array:
    """jnp.cumsum(mask, axis=-1) for a bool [N, K] mask, int32 [N, K].

    Within blocks of `block` entries the count is a matmul with a triangular matrix of ones
    (exact: sums of 0/1 below 2^24), then the blocks' totals are added: on XLA:CPU a quarter
    cheaper than the cumsum's reduce-window.
    """
    n, k = mask.shape
    pad = -k % block
    m = jnp.pad(mask, ((0, 0), (0, pad))).astype(jnp.float32).reshape(n, -1, block)
    inner = jnp.matmul(m, jnp.triu(jnp.ones((block, block), jnp.float32)),
                       precision=jax.lax.Precision.HIGHEST)
    before = jnp.cumsum(inner[..., -1], axis=-1) - inner[..., -1]
    return (inner + before[..., None]).reshape(n, -1)[:, :k].astype(jnp.int32)


def compact(log_p: Array, codebook: Array, size: int) -> tuple[Array, Array, Array, Array]:
    """Each row's codes with a finite log p, in index order, padded with removed codes.

    Args:
      log_p: [N, K] (-inf = removed code); codebook: [K, d]; size: S, the codes kept per row.
    Returns:
      log_p [N, S] (-inf past the row's finite codes), per-row codebooks [N, d, S] (padding
      slots hold code 0), the code index of each slot [N, S] int32 and fits [N] bool: the row
      has at most S finite codes. A row that does not fit keeps only its first S finite codes
      (by index), so its result must not be used.
    """
    finite = log_p > -jnp.inf
    # The j-th finite code goes to slot j and the j-th removed one to slot K - 1 - j: a scatter
    # of the code indices by a running count. As a permutation its indices are unique and in
    # bounds, which XLA:CPU scatters in about half the time of one that drops the removed
    # codes (benchmarks/micro.py flow-support); a sort or top-k over K costs several times more.
    n, k = log_p.shape
    running = running_count(finite)
    count = running[:, -1]
    ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k))
    slot = jnp.where(finite, running - 1, k - 1 - ids + running)
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    order = jnp.zeros((n, k), jnp.int32).at[rows, slot].set(
        ids, unique_indices=True, mode="promise_in_bounds")
    used = jnp.arange(size)[None, :] < count[:, None]
    idx = jnp.where(used, order[:, :size], 0)
    lp, cb = gather(log_p, codebook, idx)
    return jnp.where(used, lp, -jnp.inf), cb, idx, count <= size


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
