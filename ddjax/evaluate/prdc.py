"""k-NN manifold precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al.
2020), computed in blocks so that 10k × 10k feature sets never materialise a full distance matrix.

Each sample's manifold ball has the radius of its k-th nearest neighbour in its own set (itself
excluded). A point lies on a manifold when it falls inside (distance <=, as in the original code)
at least one ball of the other set:

  precision = fraction of fake samples on the real manifold,
  recall    = fraction of real samples on the fake manifold,
  density   = (1 / kM) Σ_fake Σ_real 1[fake in ball(real)],
  coverage  = fraction of real balls that contain at least one fake sample.

Distances use ‖x‖² − 2 x·y + ‖y‖² with a matmul, in float64, `block_size` rows at a time (peak
extra memory about block_size × max(N, M) × 8 bytes).
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_radii", "prdc", "precision_recall"]


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, F], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _sq_dists(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared distances [len(a), len(b)], clamped at 0 against rounding."""
    d = a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def knn_radii(features: np.ndarray, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Squared distance of each row of `features` [N, F] to its k-th nearest other row -> [N]."""
    x = _as_features(features, "features")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    x_sq = np.einsum("ij,ij->i", x, x)
    radii = np.empty(n, dtype=np.float64)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        d = _sq_dists(x[start:stop], x_sq[start:stop], x, x_sq)
        # The point itself sits at distance 0 (index 0 after sorting); index k is its k-th neighbour.
        d[np.arange(stop - start), np.arange(start, stop)] = 0.0
        radii[start:stop] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    block_size: int = 1024,
) -> dict[str, float]:
    """Precision, recall, density and coverage of fake [M, F] against real [N, F] features.

    Returns {"precision", "recall", "density", "coverage"} as Python floats. Recall uses the
    fake set's k-NN radii (needs M > k); the other three use the real set's (needs N > k).
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    r_real = knn_radii(real, k, block_size)
    r_fake = knn_radii(fake, k, block_size)
    real_sq = np.einsum("ij,ij->i", real, real)
    fake_sq = np.einsum("ij,ij->i", fake, fake)

    n, m = real.shape[0], fake.shape[0]
    fake_on_real = np.zeros(m, dtype=bool)  # precision
    real_on_fake = np.zeros(n, dtype=bool)  # recall
    real_covered = np.zeros(n, dtype=bool)  # coverage
    density_count = 0
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        d = _sq_dists(real[start:stop], real_sq[start:stop], fake, fake_sq)  # [b, M]
        in_real_ball = d <= r_real[start:stop, None]
        fake_on_real |= in_real_ball.any(axis=0)
        real_covered[start:stop] = in_real_ball.any(axis=1)
        density_count += int(in_real_ball.sum())
        real_on_fake[start:stop] = (d <= r_fake[None, :]).any(axis=1)
    return {
        "precision": float(fake_on_real.mean()),
        "recall": float(real_on_fake.mean()),
        "density": density_count / (k * m),
        "coverage": float(real_covered.mean()),
    }


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    block_size: int = 1024,
) -> tuple[float, float]:
    """Kynkäänniemi et al.'s (precision, recall) of fake [M, F] against real [N, F] features."""
    out = prdc(real_features, fake_features, k=k, block_size=block_size)
    return out["precision"], out["recall"]
