"""The two resamplings of VAR's quantiser as exact separable matrices.

`F.interpolate(mode='area')` (= `adaptive_avg_pool2d`) shrinks the residual to each scale and
`F.interpolate(mode='bicubic', align_corners=False)` grows each scale's code map back to the
full latent size. `jax.image.resize` differs from both (Keys' cubic with A = -0.5 and edge
renormalisation; no overlapping area windows), so the weights are built here on the host, in
float32 with torch's own operation order, and applied as `A_h @ x @ A_w^T`:

  * area: output i averages inputs [floor(i*n/m), ceil((i+1)*n/m)); the windows overlap
    when m does not divide n (16 -> 3, 5, 6, 10, 13);
  * bicubic: source coordinate (n/m)(i + 1/2) - 1/2, not clamped; four taps floor(src)-1..+2,
    each tap index clamped to [0, n-1]; cubic convolution with A = -0.75.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = np.float32(-0.75)  # torch's `get_cubic_upsample_coefficients`


@functools.cache
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32: one axis of `adaptive_avg_pool2d` from n_in to n_out."""
    _check_sizes(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil
        m[i, start:end] = np.float32(1.0) / np.float32(end - start)
    return m


def _cubic1(x: np.float32) -> np.float32:
    a = CUBIC_A
    return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + np.float32(1)


def _cubic2(x: np.float32) -> np.float32:
    a = CUBIC_A
    return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a


@functools.cache
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32: one axis of torch's bicubic interpolation (align_corners=False)."""
    _check_sizes(n_in, n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        src = scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)
        base = min(int(np.floor(src)), n_in - 1)
        t = np.float32(min(max(src - np.float32(base), np.float32(0)), np.float32(1)))
        weights = (_cubic2(t + np.float32(1)), _cubic1(t), _cubic1(np.float32(1) - t),
                   _cubic2(np.float32(1) - t + np.float32(1)))
        for j, w in enumerate(weights):
            m[i, min(max(base - 1 + j, 0), n_in - 1)] += w
    return m


def _check_sizes(n_in: int, n_out: int) -> None:
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"resize sizes must be positive, got {n_in} -> {n_out}")


def apply_separable(x: jax.Array, mat: np.ndarray) -> jax.Array:
    """x [B, h, w, C] -> [B, m, m, C] with the same [m, h] (= [m, w]) matrix on both axes."""
    a = jnp.asarray(mat, jnp.float32)
    return jnp.einsum("ph,bhwc,qw->bpqc", a, x.astype(jnp.float32), a,
                      precision=jax.lax.Precision.HIGHEST)


def area(x: jax.Array, size: int) -> jax.Array:
    """`F.interpolate(x, size=(size, size), mode='area')` on NHWC x [B, n, n, C], float32."""
    if x.shape[1] == size:
        return x.astype(jnp.float32)
    return apply_separable(x, area_matrix(x.shape[1], size))


def bicubic(x: jax.Array, size: int) -> jax.Array:
    """`F.interpolate(x, size=(size, size), mode='bicubic')` on NHWC x [B, n, n, C], float32."""
    if x.shape[1] == size:
        return x.astype(jnp.float32)
    return apply_separable(x, bicubic_matrix(x.shape[1], size))


__all__ = ["area", "area_matrix", "bicubic", "bicubic_matrix", "apply_separable"]
