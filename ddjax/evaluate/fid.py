"""Fréchet distance between Gaussians fitted to feature sets (the FID of Heusel et al. 2017).

The arithmetic follows pytorch-fid (`pytorch_fid.fid_score.calculate_frechet_distance`): the matrix
square root of Σ1·Σ2 by `scipy.linalg.sqrtm`, a retry with `eps` added to both diagonals when the
product is singular, and dropping a negligible imaginary part. Unlike some evaluation scripts, a
failure is never turned into a sentinel number: it raises `FrechetDistanceError`.

Statistics files are `.npz` archives with the keys `mu` [F] and `sigma` [F, F], the layout
pytorch-fid writes with `--save-stats` and reads back, so reference statistics move both ways. An
optional `protocol` string records which feature space produced them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from scipy import linalg

__all__ = [
    "FeatureStatistics",
    "FrechetDistanceError",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "load_statistics",
    "save_statistics",
]


class FrechetDistanceError(ValueError):
    """The Fréchet distance could not be computed reliably (no number is returned instead)."""


class FeatureStatistics(NamedTuple):
    """Mean [F] and covariance [F, F] (float64) of a feature set, plus the protocol label."""

    mu: np.ndarray
    sigma: np.ndarray
    protocol: str | None = None


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of `features` [N, F], as pytorch-fid computes them.

    Returns (mu [F], sigma [F, F]), both float64. Needs N >= 2; with N <= F the covariance is
    singular, which `frechet_distance` handles with its eps offset, but such an FID is biased.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be [F] and sigma [F, F], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FrechetDistanceError(f"{which}: statistics contain NaN or infinite values")
    return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, without the deprecated `disp` argument."""
    return np.asarray(linalg.sqrtm(a))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    imag_atol: float = 1e-3,
) -> float:
    """Fréchet distance d² between N(mu1, sigma1) and N(mu2, sigma2).

        d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½)

    Args:
      mu1, mu2: means [F]. sigma1, sigma2: covariances [F, F].
      eps: added to both diagonals when (sigma1 sigma2)^½ is not finite (singular product).
      imag_atol: largest tolerated imaginary part on the diagonal of the square root.

    Raises:
      FrechetDistanceError: non-finite statistics, a square root that stays non-finite after the
        eps offset, a significant imaginary component, or a non-finite result.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise FrechetDistanceError(
                "sqrtm(sigma1 @ sigma2) is not finite, even after adding "
                f"eps={eps:g} to the diagonals; the covariances are degenerate"
            )
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=imag_atol):
            m = float(np.max(np.abs(covmean.imag)))
            raise FrechetDistanceError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component of {m:.3g} "
                f"(tolerance {imag_atol:g}); the covariance estimates are unreliable"
            )
        covmean = covmean.real

    value = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    if not np.isfinite(value):
        raise FrechetDistanceError(f"Fréchet distance is not finite ({value})")
    return value


def fid_from_features(features1: np.ndarray, features2: np.ndarray, eps: float = 1e-6) -> float:
    """FID between two feature sets [N1, F] and [N2, F] (same feature extractor)."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps)


def save_statistics(
    path: str | os.PathLike,
    mu: np.ndarray,
    sigma: np.ndarray,
    protocol: str | None = None,
    metadata: dict[str, str | int] | None = None,
) -> None:
    """Write `mu` [F] and `sigma` [F, F] to a pytorch-fid compatible `.npz` (plus `protocol`
    and `metadata`, scalar entries such as the dataset, split and count; readers ignore them)."""
    mu, sigma = _check_stats(mu, sigma, "statistics")
    arrays: dict[str, np.ndarray] = {"mu": mu, "sigma": sigma}
    if protocol is not None:
        arrays["protocol"] = np.asarray(protocol)
    for key, value in (metadata or {}).items():
        if key in ("mu", "sigma", "protocol"):
            raise ValueError(f"metadata key {key!r} is reserved")
        arrays[key] = np.asarray(value)
    np.savez(path, **arrays)


def load_statistics(path: str | os.PathLike) -> FeatureStatistics:
    """Read a statistics `.npz` (keys `mu`, `sigma`; `protocol` if present)."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(f"{os.fspath(path)}: missing keys {missing} (has {f.files})")
        mu = np.asarray(f["mu"], dtype=np.float64)
        sigma = np.asarray(f["sigma"], dtype=np.float64)
        protocol = str(f["protocol"]) if "protocol" in f.files else None
    mu, sigma = _check_stats(mu, sigma, os.fspath(path))
    return FeatureStatistics(mu, sigma, protocol)
