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

  scoring.py    the one scoring function (`score_features`, `evaluate_samples`)
  methods.py    the DD report's methods (teacher, flow map, DD 1/2-step, teacher-involved, onestep*)
  report.py     the DD evaluation stage and its report (table, grids, plot, paper-shape checks)

Every FID is tied to a feature space: the extractor's `protocol` is reported alongside the
numbers. Nothing here imports torch (only the `.pth` loader does, when called).
"""

from __future__ import annotations

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
from ddjax.evaluate.scoring import evaluate_samples, score_features

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
    "score_features",
]
