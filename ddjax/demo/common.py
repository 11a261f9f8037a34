"""Shared pieces of the digits demo teacher's training (configs/digits.py): configs, data,
progress logging, the optimiser, exports and the 8x8 digits classifier."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from sklearn.svm import SVC

from ddjax.evaluate.digits import digits_images, digits_split
from ddjax.evaluate.features import get_extractor
from ddjax.evaluate.fid import fid_from_features
from ddjax.teacher.llamagen import gpt as gpt_lib
from ddjax.teacher.llamagen import vq as vq_lib
from ddjax.utils import optim
from ddjax.utils.state_dict import flax_to_torch
from ddjax.utils.torch_io import write_state_dict

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits")
Params = Any


def digits_teacher_paths() -> dict[str, str]:
    """The shipped digits teacher: {"vq", "gpt", "meta"} absolute paths in ddjax/assets/digits/."""
    return {
        "vq": os.path.join(ASSET_DIR, "vq.safetensors"),
        "gpt": os.path.join(ASSET_DIR, "gpt.safetensors"),
        "meta": os.path.join(ASSET_DIR, "meta.json"),
    }


# -- configs ------------------------------------------------------------------------------------
def fields(block: Any) -> dict[str, Any]:
    """Config block -> dict without None values (None keeps the variant's default)."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(block).items() if v is not None}


def vq_config_from(config: Any) -> vq_lib.VQConfig:
    """VQConfig from `config.vq` (variant + model overrides + dtype)."""
    return vq_lib.vq_config(config.vq.variant, dtype=config.vq.get("dtype", "float32"),
                            **fields(config.vq.model))


def gpt_config_from(config: Any) -> gpt_lib.GPTConfig:
    """GPTConfig from `config.teacher` (variant + model overrides + dtypes)."""
    t = config.teacher
    return gpt_lib.gpt_config(t.variant, dtype=t.get("dtype", "float32"),
                              param_dtype=t.get("param_dtype", "float32"), **fields(t.model))


def overrides_json(block: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields(block).items()}


def tokenizer_checkpoint(explicit: str, workdir: str, filename: str, shipped: str,
                         what: str, train_mode: str) -> str:
    """The tokenizer a teacher's training tokenizes with: `explicit` when set, else
    WORKDIR/filename (what `train_mode` wrote), else the shipped checkpoint `shipped`."""
    if explicit:
        return explicit
    local = os.path.join(workdir, filename)
    if os.path.exists(local):
        return local
    if shipped and os.path.exists(shipped):
        return shipped
    raise FileNotFoundError(
        f"no {what} to tokenize with: {local} does not exist (run mode={train_mode} with this "
        f"workdir first) and config.{'vq' if what == 'VQ' else 'vae'}.checkpoint is unset or missing")


def code_usage(ids: np.ndarray, k: int) -> dict[str, float]:
    """Codes used, their fraction and the perplexity of the code histogram of `ids`."""
    counts = np.bincount(np.asarray(ids).ravel(), minlength=k)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


# -- data ---------------------------------------------------------------------------------------
def digits_data(config: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, val_x, val_y): the stratified split of the RGB digits in [-1, 1]
    (config.digits: image_size, val_fraction, split_seed, max_images: 0 = all)."""
    d = config.digits
    tr_x, tr_y, va_x, va_y = digits_split(seed=d.split_seed, holdout=d.val_fraction, size=d.image_size)
    limit = d.get("max_images", 0)
    if limit:  # smoke runs: a few images only
        tr_x, tr_y, va_x, va_y = tr_x[:limit], tr_y[:limit], va_x[:limit], va_y[:limit]
    return tr_x, tr_y, va_x, va_y


def shift_images(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Random integer translation of each image by up to +-max_shift pixels (background fill -1)."""
    if max_shift <= 0:
        return images
    b, h, w, c = images.shape
    pad = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
    offs = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(pad, offs)


def shift_fixed(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate all images by (dy, dx) pixels, filling with background (-1)."""
    out = np.full_like(images, -1.0)
    h, w = images.shape[1:3]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = images[:, ys, xs]
    return out


def pool_to_8x8(images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] in [-1, 1] -> [N, 64] grey 8x8 (average pooling), the classifier's input."""
    x = np.asarray(images, np.float32).mean(axis=-1)
    n, s = x.shape[:2]
    f = s // 8
    return x.reshape(n, 8, f, 8, f).mean(axis=(2, 4)).reshape(n, 64)


def digits_classifier(seed: int = 0, images: np.ndarray | None = None,
                      labels: np.ndarray | None = None, image_size: int = 32):
    """An RBF-SVC on 8x8-pooled digits (the pooled 32x32 images of all 1797 digits by default).

    Used to check that teacher samples show the requested class: `classify_digits(clf, images)`.
    """
    if images is None:
        images, labels = digits_images(image_size)
    clf = SVC(C=10.0, gamma="scale", random_state=seed)
    clf.fit(pool_to_8x8(images), np.asarray(labels))
    return clf


def classify_digits(clf: Any, images: np.ndarray) -> np.ndarray:
    """Predicted classes [N] of images [N, S, S, 3] in [-1, 1]."""
    return np.asarray(clf.predict(pool_to_8x8(images)), np.int32)


def digits_fid(image_size: int) -> tuple[Callable[[np.ndarray], float], str]:
    """(fid, protocol): fid(images [N, H, W, 3] in [-1, 1]) is the FID against all 1797 digits on
    the digits classifier's features, the demo's FID protocol."""
    extractor = get_extractor("digits")
    ref = extractor(digits_images(size=image_size)[0])

    def fid(images: np.ndarray) -> float:
        # clamped as LlamaGen clamps decoded samples (and as the demo's report does)
        return float(fid_from_features(extractor(np.clip(images, -1.0, 1.0)), ref))

    return fid, extractor.protocol


# -- logging ------------------------------------------------------------------------------------
class Progress:
    """Logs step, losses, steps/s and ETA every `every` steps."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, max(1, every)
        self.t0 = time.time()
        self.t_first: float | None = None  # after the first (compiling) step

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if step == 1:
            self.t_first = time.time()
        if step % self.every and step != self.total:
            return
        now = time.time()
        if self.t_first is not None and step > 1:
            rate = (step - 1) / max(now - self.t_first, 1e-9)
        else:
            rate = step / max(now - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        vals = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
        logging.info("%s step %d/%d %s | %.2f steps/s, elapsed %.0fs, ETA %.0fs", self.name, step,
                     self.total, vals, rate, now - self.t0, eta)


def optimizer(tc: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip + AdamW chain, lr schedule) from a train_vq / train_teacher block: the shared
    builder with optax's warmup-cosine schedule and decay on every >= 2-D leaf (the settings
    the shipped digits weights were trained with)."""
    return optim.make_optimizer(tc, schedule="optax_warmup_cosine", decay="matrices")


def export_dtype(config: Any) -> str:
    return config.get("export_dtype", "float32")


def save_state_dict(path: str, params: Params, dtype: str = "float32") -> str:
    """LlamaGen-named `.safetensors`, floating leaves stored as `dtype` (loaders cast back)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = flax_to_torch(params)
    sd = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in sd.items()}
    write_state_dict(path, sd)
    return path


def write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int) -> np.ndarray:
    """fn over x in chunks of `batch` (the last chunk padded to full size: one compilation)."""
    out = []
    for s in range(0, len(x), batch):
        chunk = x[s:s + batch]
        n = len(chunk)
        if n < batch:  # repeat the last row: the padding rows are real inputs, then dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(out)
