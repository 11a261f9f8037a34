"""The one scoring function of every FID in ddjax: `score_features` (and `evaluate_samples`,
which extracts the features first).

A reference is real-image features [M, F] (then k-NN precision / recall / density / coverage
are computed too) or FID statistics (a `FeatureStatistics`, a (mu, sigma) pair or a
pytorch-fid `.npz` path; then the k-NN metrics are None).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ddjax.evaluate.features import FeatureExtractor
from ddjax.evaluate.fid import FeatureStatistics, feature_statistics, frechet_distance, load_statistics
from ddjax.evaluate.inception import inception_score
from ddjax.evaluate.prdc import prdc

Reference = Any  # images [M, H, W, 3] | features [M, F] | FeatureStatistics | (mu, sigma) | path


def score_features(features: np.ndarray, reference: Reference, *, protocol: str | None = None,
                   k: int = 3, block_size: int = 1024) -> dict[str, Any]:
    """FID of features [N, F] against a reference (features [M, F] or statistics), and k-NN
    precision / recall / density / coverage when reference features are given.

    protocol: the features' protocol; statistics recorded under another one raise a ValueError.
    Returns {"fid", "precision", "recall", "density", "coverage", "num_samples", "num_reference"}.
    """
    feats = np.asarray(features, np.float32)
    out: dict[str, Any] = {"num_samples": int(feats.shape[0]), "num_reference": None,
                           "precision": None, "recall": None, "density": None, "coverage": None}
    ref_feats = None
    if isinstance(reference, (str, os.PathLike)):
        reference = load_statistics(reference)
    if isinstance(reference, FeatureStatistics):
        if protocol is not None and reference.protocol is not None and reference.protocol != protocol:
            raise ValueError(f"reference statistics use protocol {reference.protocol!r}, the "
                             f"features {protocol!r}")
        mu_ref, sigma_ref = reference.mu, reference.sigma
    elif isinstance(reference, tuple) and len(reference) == 2:
        mu_ref, sigma_ref = reference
    else:
        ref_feats = np.asarray(reference, np.float32)
        if ref_feats.ndim != 2 or ref_feats.shape[1] != feats.shape[1]:
            raise ValueError(f"reference features are {ref_feats.shape}, expected [M, {feats.shape[1]}]")
        mu_ref, sigma_ref = feature_statistics(ref_feats)
    mu, sigma = feature_statistics(feats)
    out["fid"] = float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
    if ref_feats is not None:
        out["num_reference"] = int(ref_feats.shape[0])
        out.update({k_: float(v) for k_, v in prdc(ref_feats, feats, k=k, block_size=block_size).items()})
    return out


def evaluate_samples(
    images: Any,
    reference: Reference,
    extractor: FeatureExtractor,
    *,
    k: int = 3,
    inception_score_splits: int | None = 10,
    block_size: int = 1024,
) -> dict[str, Any]:
    """FID (and precision / recall when reference samples are given) of generated images.

    Args:
      images: generated images [N, H, W, 3], uint8 or float in [-1, 1].
      reference: reference images [M, H, W, 3]; or their features [M, F] from the same extractor;
        or statistics (`FeatureStatistics`, a (mu, sigma) pair, or a pytorch-fid `.npz` path).
      extractor: the feature space (`get_extractor(...)`).
      k: neighbourhood size of precision / recall / density / coverage.
      inception_score_splits: splits of the Inception Score, computed when the extractor has
        logits (the Inception network); None skips it.

    Returns `score_features`' dict plus "protocol", "extractor" and, when available,
    "inception_score" / "inception_score_std".
    """
    out = extractor.extract(images)
    if not isinstance(reference, (str, os.PathLike, FeatureStatistics, tuple)):
        ref = np.asarray(reference)
        if ref.ndim == 2 and ref.shape[1] != extractor.feature_dim:
            raise ValueError(f"reference features are {ref.shape}, expected [M, "
                             f"{extractor.feature_dim}] for extractor {extractor.name!r}")
        reference = ref if ref.ndim == 2 else extractor(ref)
    result = score_features(out["features"], reference, protocol=extractor.protocol, k=k,
                            block_size=block_size)
    result.update(protocol=extractor.protocol, extractor=extractor.name)
    if inception_score_splits and "logits" in out:
        splits = min(inception_score_splits, out["features"].shape[0])
        result["inception_score"], result["inception_score_std"] = inception_score(
            out["logits"], splits=splits)
    return result
