"""Pluggable feature extractors for FID / precision / recall.

Every number computed in a feature space must say which one: `FeatureExtractor.protocol` is that
label (pytorch-fid's InceptionV3 pool3 for ImageNet-style FID, or the digits classifier of the
embedded demo). FIDs from different protocols are not comparable; neither is pytorch-fid's number
with the ADM evaluator's (TF Inception, 50 images per class) used by LlamaGen / VAR papers.

An extractor maps images [N, H, W, 3] — uint8 in 0..255 or float in [-1, 1] — to features [N, F]
(float32 numpy), running a jitted network in fixed-size batches (the last one padded, so there is
one compilation per input resolution).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.evaluate import digits as digits_lib
from ddjax.evaluate import inception as inception_lib

__all__ = [
    "DIGITS_PROTOCOL",
    "INCEPTION_PROTOCOL",
    "FeatureExtractor",
    "digits_extractor",
    "get_extractor",
    "inception_extractor",
    "to_unit_range",
]

INCEPTION_PROTOCOL = (
    "pytorch-fid InceptionV3 pool3 (2048-d, FID weights pt_inception-2015-12-05), "
    "299 bilinear"
)
DIGITS_PROTOCOL = (
    f"digits-classifier penultimate layer ({digits_lib.DIGITS_FEATURE_DIM}-d, sklearn digits "
    "8x8 upsampled to 32x32)"
)

# apply(images float32 [B, H, W, 3] in [-1, 1]) -> {"features": [B, F], optional "logits": [B, C]}
ApplyFn = Callable[[jax.Array], dict[str, jax.Array]]


def to_unit_range(images: Any, tol: float = 1e-3) -> np.ndarray:
    """uint8 [N, H, W, C] or float in [-1, 1] -> float32 [N, H, W, 3] in [-1, 1].

    One-channel images are repeated to RGB. Floats outside [-1, 1] (e.g. 0..255 stored as float)
    raise instead of silently producing a wrong FID.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] (or 1 channel), got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if x.size and (x.min() < -1 - tol or x.max() > 1 + tol):
            raise ValueError(
                f"float images must lie in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]; "
                "pass uint8 for 0..255 data"
            )
    else:
        raise ValueError(f"images must be uint8 or floating point, got {x.dtype}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A named feature space: `extractor(images [N, H, W, 3]) -> features [N, F]` (float32).

    Attributes:
      name: short identifier ("inception", "digits").
      protocol: which FID protocol the numbers use; report it next to every FID.
      feature_dim: F.
      apply: jitted function on float32 [B, H, W, 3] in [-1, 1] returning {"features": [B, F]}
        and, for classifiers with an Inception-Score head, "logits": [B, C]; a classifier of
        the data's own classes (digits) adds "class_logits" [B, C] (the report's class agreement).
      batch_size: images per call of `apply`.
    """

    name: str
    protocol: str
    feature_dim: int
    apply: ApplyFn
    batch_size: int = 50

    def __call__(self, images: Any) -> np.ndarray:
        return self.extract(images)["features"]

    def extract(self, images: Any) -> dict[str, np.ndarray]:
        """All outputs of `apply` for images [N, H, W, 3], concatenated over batches -> [N, ...]."""
        n = len(images)
        if n == 0:
            raise ValueError("no images given")
        outputs: dict[str, list[np.ndarray]] = {}
        for batch, valid in self._batches(images):
            for key, value in self.apply(jnp.asarray(batch)).items():
                outputs.setdefault(key, []).append(np.asarray(value)[:valid])
        feats = {k: np.concatenate(v, axis=0) for k, v in outputs.items()}
        if feats["features"].shape != (n, self.feature_dim):
            raise ValueError(f"{self.name}: features have shape {feats['features'].shape}, "
                             f"expected {(n, self.feature_dim)}")
        return feats

    def _batches(self, images: Any) -> Iterator[tuple[np.ndarray, int]]:
        n, bs = len(images), self.batch_size
        for start in range(0, n, bs):
            batch = to_unit_range(images[start:start + bs])
            valid = batch.shape[0]
            if valid < bs and n > bs:  # pad so every call has the same shape
                pad = np.zeros((bs - valid, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad], axis=0)
            yield batch, valid


def inception_extractor(variables: dict[str, Any], batch_size: int = 50) -> FeatureExtractor:
    """pytorch-fid FID InceptionV3 from loaded Flax variables (see `inception.py`).

    "logits" are the 1008-way unbiased logits used by the Inception Score.
    """
    model = inception_lib.FIDInceptionV3()

    @jax.jit
    def _apply(v: dict[str, Any], x: jax.Array) -> dict[str, jax.Array]:
        out = model.apply(v, inception_lib.preprocess_images(x))
        return {"features": out["pool3"], "logits": out["logits_unbiased"]}

    return FeatureExtractor(
        name="inception",
        protocol=INCEPTION_PROTOCOL,
        feature_dim=inception_lib.INCEPTION_FEATURE_DIM,
        apply=lambda x: _apply(variables, x),
        batch_size=batch_size,
    )


def digits_extractor(params: dict[str, Any], batch_size: int = 256) -> FeatureExtractor:
    """Penultimate layer of the digits classifier (inputs resized to its 32×32 if needed)."""
    model = digits_lib.DigitsClassifier()
    size = digits_lib.DIGITS_IMAGE_SIZE

    @jax.jit
    def _apply(p: dict[str, Any], x: jax.Array) -> dict[str, jax.Array]:
        x = inception_lib.resize_bilinear(x, (size, size))
        logits, feats = model.apply({"params": p}, x)
        return {"features": feats, "class_logits": logits}  # the digit shown (class agreement)

    return FeatureExtractor(
        name="digits",
        protocol=DIGITS_PROTOCOL,
        feature_dim=digits_lib.DIGITS_FEATURE_DIM,
        apply=lambda x: _apply(params, x),
        batch_size=batch_size,
    )


def get_extractor(
    name: str,
    weights_path: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> FeatureExtractor:
    """Build an extractor by name.

    - "inception" (aliases "pytorch-fid", "inception-v3"): `weights_path` is required — the
      pytorch-fid FID weights as `.pth` (needs torch), `.npz` or `.safetensors`.
    - "digits": `weights_path` is a `.npz` from `digits.save_params`; when None, the classifier
      is trained here with `train_digits_classifier(seed=0)` (a few seconds on a CPU).
    """
    key = name.lower()
    if key in ("inception", "pytorch-fid", "inception-v3", "inceptionv3"):
        if weights_path is None:
            raise ValueError(
                f"the inception extractor needs weights_path (pytorch-fid's "
                f"{inception_lib.FID_WEIGHTS_FILENAME} or its .npz/.safetensors conversion); "
                "weights are never downloaded at run time"
            )
        variables = inception_lib.load_inception_variables(weights_path)
        return inception_extractor(variables, batch_size=batch_size or 50)
    if key == "digits":
        if weights_path is None:
            params = digits_lib.train_digits_classifier(seed=0)
        else:
            params = digits_lib.load_params(weights_path)
        return digits_extractor(params, batch_size=batch_size or 256)
    raise ValueError(f"unknown feature extractor {name!r} (known: 'inception', 'digits')")
