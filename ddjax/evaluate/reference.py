r"""FID reference statistics of a TFDS dataset (`config.eval.reference=tfds:NAME/SPLIT`).

    stats = tfds_reference("imagenet2012/validation", extractor, image_size=256,
                           cache="out/reference/imagenet2012_validation.npz", data_dir=DIR)

The images are read with `tfds.data_source(..., download=False)` from the user's prepared data
(`config.eval.tfds_data_dir`; nothing is downloaded; the array_record format reads without
TensorFlow), brought to the generator's resolution with ADM's `center_crop_arr` (box-halving
while the short side is >= 2x the size, a bicubic resize of the short side, the centre crop:
the preprocessing of guided-diffusion's and LlamaGen's ImageNet data), kept as uint8 like the
samples' PNGs, and featurised. With several processes each takes its block of the images and
the features are gathered. The statistics are cached as a `.npz` (`ddjax.evaluate.fid`
layout: mu, sigma, protocol) with the dataset, split, count and preprocessing inside; a cache
made another way is recomputed, not used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from ddjax import sharding
from ddjax.evaluate.features import FeatureExtractor
from ddjax.evaluate.fid import FeatureStatistics, feature_statistics, save_statistics

TFDS_PREFIX = "tfds:"


def preprocessing(image_size: int) -> str:
    """The label of what `center_crop_arr` does, recorded with the statistics."""
    return (f"ADM center_crop_arr to {image_size}x{image_size} (box halving, bicubic resize of "
            "the short side, centre crop), uint8")


def parse_tfds(reference: str) -> tuple[str, str] | None:
    """"tfds:NAME/SPLIT" -> (NAME, SPLIT) (NAME may hold a config, "celeb_a_hq/256"); else None."""
    if not reference.startswith(TFDS_PREFIX):
        return None
    name, sep, split = reference[len(TFDS_PREFIX):].rpartition("/")
    if not sep or not name or not split:
        raise ValueError(f"config.eval.reference={reference!r}: write tfds:NAME/SPLIT "
                         "(e.g. tfds:imagenet2012/validation)")
    return name, split


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
    """ADM's (guided-diffusion) center_crop_arr: uint8 [H, W, 3] -> uint8 [S, S, 3]."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def dataset_features(source: Sequence[Any], extractor: FeatureExtractor, image_size: int, *,
                     batch_size: int = 256, image_key: str = "image", log_every_s: float = 30.0,
                     what: str = "reference") -> np.ndarray:
    """Features [N, F] of every image of `source` (rows of dicts with `image_key`, uint8
    [H, W, 3]), preprocessed by `center_crop_arr`; the rows are split over the processes
    (`sharding.process_rows`) and gathered. Logs progress and an ETA."""
    n = len(source)
    lo, hi = sharding.process_rows(n)
    feats, t0, last = [], time.time(), 0.0
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        images = np.stack([center_crop_arr(source[i][image_key], image_size) for i in range(start, stop)])
        feats.append(extractor(images))
        now, done = time.time(), stop - lo
        if now - last > log_every_s or stop == hi:
            rate = done / max(now - t0, 1e-9)
            logging.info("%s statistics: %d/%d images here (%d in all), %.1f images/s, ETA %.0f s",
                         what, done, hi - lo, n, rate, (hi - lo - done) / max(rate, 1e-9))
            last = now
    local = np.concatenate(feats) if feats else np.zeros((0, extractor.feature_dim), np.float32)
    return sharding.gather_rows(local, -(-n // jax.process_count()))


def read_cache(path: str, want: dict[str, str | int]) -> FeatureStatistics | None:
    """The cached statistics when `path` exists and records exactly `want`; else None."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        have = {k: f[k].item() for k in want if k in f.files}
        if have != want:
            logging.warning("%s was made for %s, not %s: recomputing", path, have, want)
            return None
        return FeatureStatistics(np.asarray(f["mu"]), np.asarray(f["sigma"]), str(f["protocol"]))


def open_tfds(name: str, split: str, data_dir: str | None) -> Sequence[Any]:
    """tfds.data_source(name, split) from data_dir, never downloading."""
    import tensorflow_datasets as tfds  # heavy and only needed here: imported on first use

    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)


def tfds_reference(reference: str, extractor: FeatureExtractor, image_size: int, cache: str, *,
                   data_dir: str | None = None, batch_size: int = 256,
                   source: Sequence[Any] | None = None) -> FeatureStatistics:
    """The FID statistics of tfds:NAME/SPLIT at `image_size`, from `cache` or computed and
    cached there (process 0 writes); a cache recording another dataset, split, count, protocol
    or preprocessing is recomputed. `source` replaces the TFDS read (rows with "image")."""
    name, split = parse_tfds(reference) or (None, None)
    if name is None:
        raise ValueError(f"{reference!r} is not tfds:NAME/SPLIT")
    source = open_tfds(name, split, data_dir) if source is None else source
    want = {"dataset": name, "split": split, "count": len(source), "protocol": extractor.protocol,
            "preprocessing": preprocessing(image_size)}
    cached = read_cache(cache, want)
    if cached is not None:
        logging.info("reference statistics of %s from %s", reference, cache)
        return cached
    logging.info("reference statistics of %s: %d images, %s", reference, len(source), want["preprocessing"])
    feats = dataset_features(source, extractor, image_size, batch_size=batch_size, what=reference)
    mu, sigma = feature_statistics(feats)
    if sharding.is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        save_statistics(cache, mu, sigma, protocol=extractor.protocol,
                        metadata={k: v for k, v in want.items() if k != "protocol"})
    sharding.barrier("ddjax reference statistics written")
    return FeatureStatistics(mu, sigma, extractor.protocol)
