"""scikit-learn's bundled digits as a tiny image dataset, and the classifier whose penultimate layer
is the FID feature space of the embedded demo (no downloads: the data ship with scikit-learn).

`digits_images(size)` turns the 1797 8×8 grey digits (0..16) into RGB images [N, size, size, 3] in
[-1, 1] (bilinear upsampling, torch's align_corners=False convention); the demo dataset reuses it.
`DigitsClassifier` is a three-conv CNN; `train_digits_classifier(seed)` trains it with optax on a
fixed stratified split (80 / 20) in a few seconds on a CPU, reaching ≥ 97% held-out accuracy.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax.evaluate.inception import bilinear_resize_matrix

__all__ = [
    "DIGITS_FEATURE_DIM",
    "DIGITS_IMAGE_SIZE",
    "DigitsClassifier",
    "classifier_accuracy",
    "digits_features",
    "digits_images",
    "digits_split",
    "init_digits_params",
    "load_params",
    "save_params",
    "train_digits_classifier",
]

DIGITS_FEATURE_DIM = 128
DIGITS_IMAGE_SIZE = 32
Params = dict[str, Any]


def digits_images(size: int = DIGITS_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All sklearn digits as (images float32 [1797, size, size, 3] in [-1, 1], labels int32 [1797]).

    Ink is bright (+1), background dark (−1); the grey value is copied to the three channels.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.images.astype(np.float64) / 16.0 * 2.0 - 1.0  # [N, 8, 8] in [-1, 1]
    m = bilinear_resize_matrix(8, size)
    x = np.einsum("oh,nhw,pw->nop", m, x, m)
    x = np.repeat(x[..., None], 3, axis=-1).astype(np.float32)
    return np.clip(x, -1.0, 1.0), data.target.astype(np.int32)


def digits_split(
    seed: int = 0, holdout: float = 0.2, size: int = DIGITS_IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (train_x, train_y, test_x, test_y) split of `digits_images(size)`."""
    from sklearn.model_selection import train_test_split

    x, y = digits_images(size)
    tr_x, te_x, tr_y, te_y = train_test_split(
        x, y, test_size=holdout, random_state=seed, stratify=y
    )
    return tr_x, tr_y, te_x, te_y


class DigitsClassifier(nn.Module):
    """CNN on [B, 32, 32, 3] in [-1, 1] -> (logits [B, 10], features [B, 128]).

    Three stride-2 3×3 convolutions (16, 32, 64 channels, ReLU), a 128-wide SiLU layer (the
    features: the penultimate layer) and a linear classifier. SiLU rather than ReLU there: with
    ReLU about half the feature units died in training, leaving a singular feature covariance.
    """

    num_classes: int = 10
    feature_dim: int = DIGITS_FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i, ch in enumerate((16, 32, 64)):
            x = nn.relu(nn.Conv(ch, (3, 3), (2, 2), padding="SAME", name=f"conv{i}")(x))
        x = x.reshape(x.shape[0], -1)
        feats = nn.silu(nn.Dense(self.feature_dim, name="hidden")(x))
        return nn.Dense(self.num_classes, name="head")(feats), feats


def _shift(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Random integer translation of each image [B, H, W, C] by up to ±max_shift pixels (edge
    padding), on the host: cheaper than compiling it into the training step."""
    b, h, w, _ = x.shape
    m = max_shift
    pad = np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    oy, ox = rng.integers(0, 2 * m + 1, size=(2, b))
    rows = oy[:, None] + np.arange(h)[None, :]  # [B, H]
    cols = ox[:, None] + np.arange(w)[None, :]  # [B, W]
    return pad[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def init_digits_params(
    rng: np.random.Generator, image_shape: tuple[int, ...] = (DIGITS_IMAGE_SIZE,) * 2 + (3,)
) -> Params:
    """LeCun-normal kernels and zero biases for `DigitsClassifier`, drawn with numpy (compiling
    Flax's truncated-normal initialisers costs seconds on a CPU; this costs nothing)."""
    shapes = jax.eval_shape(
        DigitsClassifier().init, jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32)
    )["params"]

    def draw(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if len(leaf.shape) == 1:
            return jnp.zeros(leaf.shape, jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(fan_in))

    return jax.tree_util.tree_map(draw, shapes)


def train_digits_classifier(
    seed: int = 0,
    *,
    epochs: int = 12,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    split_seed: int = 0,
    train_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> Params:
    """Train `DigitsClassifier` with AdamW (cosine schedule) and small random shifts -> params.

    Trains on the training part of `digits_split(split_seed)` (or `train_data` = (images, labels))
    only; check it with `classifier_accuracy` on the held-out part. Deterministic given `seed`
    (initialisation, batch order and shifts all come from `np.random.default_rng(seed)`). The
    step is a jitted function called from a Python loop: on XLA's CPU backend a `lax.scan` over
    conv steps runs an order of magnitude slower.
    """
    if train_data is None:
        tr_x, tr_y, _, _ = digits_split(split_seed)
    else:
        tr_x, tr_y = train_data
    tr_x = np.asarray(tr_x, np.float32)
    tr_y = np.asarray(tr_y, np.int32)
    n = tr_x.shape[0]
    steps_per_epoch = n // batch_size
    model = DigitsClassifier()
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
    tx = optax.adamw(schedule, weight_decay=weight_decay)

    def loss_fn(p: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        logits, _ = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p: Params, s: Any, x: jax.Array, y: jax.Array) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    params = init_digits_params(rng, tr_x.shape[1:])
    opt_state = jax.jit(tx.init)(params)
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = _shift(tr_x[idx], rng, max_shift) if max_shift > 0 else tr_x[idx]
            params, opt_state, _ = step(params, opt_state, x, tr_y[idx])
    return jax.device_get(params)


def _forward(params: Params, images: np.ndarray, batch_size: int = 512):
    model = DigitsClassifier()
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    logits, feats = [], []
    for s in range(0, len(images), batch_size):
        lo, fe = fn(params, jnp.asarray(images[s:s + batch_size], jnp.float32))
        logits.append(np.asarray(lo))
        feats.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(feats)


def classifier_accuracy(params: Params, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy on images [N, 32, 32, 3] in [-1, 1] with labels [N]."""
    logits, _ = _forward(params, images)
    return float((logits.argmax(axis=1) == np.asarray(labels)).mean())


def digits_features(params: Params, images: np.ndarray) -> np.ndarray:
    """Penultimate-layer features [N, 128] (float32) of images [N, 32, 32, 3] in [-1, 1]."""
    return _forward(params, images)[1]


def save_params(path: str | os.PathLike, params: Params) -> None:
    """Save a params tree to `.npz`, keys joined with '/' (e.g. `conv0/kernel`)."""
    flat = {
        "/".join(str(k.key) for k in kp): np.asarray(v)
        for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(path, **flat)


def load_params(path: str | os.PathLike) -> Params:
    """Inverse of `save_params`; checks the tree against `DigitsClassifier`'s shapes."""
    with np.load(path, allow_pickle=False) as f:
        flat = {k: f[k] for k in f.files}
    params: Params = {}
    for key, value in flat.items():
        node = params
        *mods, leaf = key.split("/")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = jnp.asarray(value)
    expected = jax.eval_shape(
        DigitsClassifier().init, jax.random.PRNGKey(0),
        jnp.zeros((1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 3), jnp.float32),
    )["params"]
    got = jax.tree_util.tree_map(lambda v: tuple(v.shape), params)
    want = jax.tree_util.tree_map(lambda v: tuple(v.shape), expected)
    if got != want:
        raise ValueError(f"{os.fspath(path)}: params do not match DigitsClassifier: {got} != {want}")
    return params
