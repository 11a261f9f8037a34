"""Sample-quality metrics: FID, k-NN precision / recall (+ density / coverage), Inception Score;
the LPIPS distance.

  fid.py        Fréchet distance (pytorch-fid arithmetic; raises instead of returning a sentinel),
                statistics `.npz` files compatible with pytorch-fid
  prdc.py       blocked k-NN precision / recall / density / coverage
  inception.py  pytorch-fid's FID InceptionV3 in Flax (weights from a user-supplied file)
  lpips.py      LPIPS-VGG v0.1 distance / training loss (torchvision VGG16 + `lpips` heads)
  digits.py     sklearn digits images and the small classifier used as the demo's feature space
  features.py   `FeatureExtractor` (name, protocol label, batched jitted features) and
                `get_extractor(name, weights_path)`

Every FID is tied to a feature space: `evaluate_samples` reports the extractor's `protocol`
alongside the numbers. Nothing here imports torch (only the `.pth` loader does, when called).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ddjax.evaluate.features import FeatureExtractor, get_extractor
from ddjax.evaluate.fid import (
    FeatureStatistics,
    FrechetDistanceError,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from ddjax.evaluate.inception import inception_score
from ddjax.evaluate.prdc import prdc, precision_recall

__all__ = [
    "FeatureExtractor",
    "FeatureStatistics",
    "FrechetDistanceError",
    "evaluate_samples",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "get_extractor",
    "inception_score",
    "load_statistics",
    "precision_recall",
    "prdc",
    "save_statistics",
]

Reference = Any  # images [M, H, W, 3] | features [M, F] | FeatureStatistics | (mu, sigma) | path


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

    Returns:
      {"fid", "precision", "recall", "density", "coverage", "protocol", "extractor",
       "num_samples", "num_reference"} plus "inception_score" / "inception_score_std" when
      available. With statistics as reference, the k-NN metrics cannot be computed and are None
      (as is "num_reference").

    Raises:
      FrechetDistanceError: when the FID cannot be computed (never a sentinel value).
      ValueError: statistics recorded under a different protocol, or mismatched dimensions.
    """
    out = extractor.extract(images)
    feats = out["features"]
    result: dict[str, Any] = {
        "protocol": extractor.protocol,
        "extractor": extractor.name,
        "num_samples": int(feats.shape[0]),
        "num_reference": None,
        "precision": None,
        "recall": None,
        "density": None,
        "coverage": None,
    }

    ref_feats = None
    if isinstance(reference, (str, os.PathLike)):
        reference = load_statistics(reference)
    if isinstance(reference, FeatureStatistics):
        if reference.protocol is not None and reference.protocol != extractor.protocol:
            raise ValueError(
                f"reference statistics use protocol {reference.protocol!r}, "
                f"the extractor {extractor.protocol!r}"
            )
        mu_ref, sigma_ref = reference.mu, reference.sigma
    elif isinstance(reference, tuple) and len(reference) == 2:
        mu_ref, sigma_ref = reference
    else:
        ref = np.asarray(reference) if not hasattr(reference, "shape") else reference
        if ref.ndim == 2:
            if ref.shape[1] != extractor.feature_dim:
                raise ValueError(f"reference features are {ref.shape}, expected [M, "
                                 f"{extractor.feature_dim}] for extractor {extractor.name!r}")
            ref_feats = np.asarray(ref, dtype=np.float32)
        else:
            ref_feats = extractor(ref)
        mu_ref, sigma_ref = feature_statistics(ref_feats)

    mu, sigma = feature_statistics(feats)
    result["fid"] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if ref_feats is not None:
        result["num_reference"] = int(ref_feats.shape[0])
        result.update(prdc(ref_feats, feats, k=k, block_size=block_size))
    if inception_score_splits and "logits" in out:
        splits = min(inception_score_splits, feats.shape[0])
        result["inception_score"], result["inception_score_std"] = inception_score(
            out["logits"], splits=splits
        )
    return result
