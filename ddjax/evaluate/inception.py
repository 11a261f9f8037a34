"""The FID InceptionV3 of pytorch-fid, in Flax Linen.

This is the network behind pytorch-fid's default FID (`pytorch_fid.inception.fid_inception_v3`):
torchvision's Inception3 with the TensorFlow-graph quirks of `FIDInceptionA`, `FIDInceptionC`,
`FIDInceptionE_1` and `FIDInceptionE_2` (3×3 average pools that ignore padded zeros, and a max
pool in the last block), 1008 classes, and the weights ported from TensorFlow
(`pt_inception-2015-12-05-6726825d.pth`). Those weights are not downloaded here: the user passes
the file (`.pth` state dict — needs torch, imported only inside the loader — or a `.npz` /
`.safetensors` holding the same keys, which does not).

Preprocessing matches pytorch-fid: bilinear resize to 299×299 (align_corners=False, no
antialiasing, as `F.interpolate`) and inputs in [-1, 1]. Outputs: the 2048-d pool3 features (FID)
and the 1008-way logits (Inception Score).

Parameter tree: torch module names are kept (`Mixed_5b/branch1x1/conv/kernel`), so
`state_dict_to_variables` / `variables_to_state_dict` are a mechanical renaming plus transposes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.utils.torch_io import require_torch

__all__ = [
    "FID_WEIGHTS_FILENAME", "INCEPTION_FEATURE_DIM", "INCEPTION_NUM_CLASSES", "FIDInceptionV3",
    "WeightMismatchError", "bilinear_resize_matrix", "expected_state_dict_shapes",
    "inception_score", "load_inception_variables", "load_state_dict_file", "preprocess_images",
    "random_state_dict", "resize_bilinear", "state_dict_to_variables", "variables_to_state_dict",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_CLASSES = 1008
INCEPTION_INPUT_SIZE = 299
BN_EPS = 1e-3
Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


# ----------------------------------------------------------------------------- preprocessing
def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Interpolation matrix [out_size, in_size] of torch's bilinear resize (align_corners=False).

    Row i mixes the two source pixels around src = (i + 0.5)·in/out − 0.5 (clamped at 0), exactly
    as `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize [B, H, W, C] -> [B, size[0], size[1], C] like torch's bilinear F.interpolate."""
    h, w = images.shape[1], images.shape[2]
    if (h, w) == tuple(size):
        return images
    mh = jnp.asarray(bilinear_resize_matrix(h, size[0]), dtype=images.dtype)
    mw = jnp.asarray(bilinear_resize_matrix(w, size[1]), dtype=images.dtype)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=hp)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


def preprocess_images(images: jax.Array, size: int = INCEPTION_INPUT_SIZE) -> jax.Array:
    """[B, H, W, 3] uint8 (0..255) or float in [-1, 1] -> float32 [B, size, size, 3] in [-1, 1].

    Equivalent to pytorch-fid's `x/255`, bilinear resize to 299, `2x − 1` (the resize is linear,
    so it commutes with the affine rescaling).
    """
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 127.5 - 1.0
    else:
        x = images.astype(jnp.float32)
    return resize_bilinear(x, (size, size))


# ----------------------------------------------------------------------------- the network
def _pad(p: tuple[int, int]) -> list[tuple[int, int]]:
    return [(p[0], p[0]), (p[1], p[1])]


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, as torchvision's."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=_pad(self.padding),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """TF-style 3×3/1 average pool: padded zeros do not count (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=_pad((1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """`FIDInceptionE_1` (average pool, count_include_pad=False) or `_2` (max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=_pad((1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 on preprocessed inputs [B, 299, 299, 3] in [-1, 1].

    Returns {"pool3": [B, 2048], "logits": [B, 1008] (fc with bias),
    "logits_unbiased": [B, 1008] (pool3 @ fc weight, no bias: what the original Inception Score
    code of Salimans et al. uses)}.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = BasicConv2d(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(INCEPTION_NUM_CLASSES, name="fc")
        logits = fc(pool3)
        unbiased = pool3 @ fc.variables["params"]["kernel"]
        return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}


# ----------------------------------------------------------------------------- weights
class WeightMismatchError(ValueError):
    """A state dict does not fit the FID InceptionV3: lists missing/unexpected/mis-shaped keys."""


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    *mods, leaf = path
    leaf = {
        ("params", "kernel"): "weight",
        ("params", "scale"): "weight",
        ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var",
    }[(collection, leaf)]
    return ".".join([*mods, leaf])


def _to_torch_layout(value: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Conv HWIO -> OIHW (inverse: OIHW -> HWIO); dense [in, out] <-> [out, in]."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0) if inverse else (3, 2, 0, 1))
    return value.T if value.ndim == 2 else value


def _flat_variables(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
    out = {}
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
        for keypath, leaf in flat:
            out[(collection, tuple(str(k.key) for k in keypath))] = leaf
    return out


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
    shapes = jax.eval_shape(
        FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32)
    )
    return {k: tuple(v.shape) for k, v in _flat_variables(shapes).items()}


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """torch state-dict key -> torch shape for every tensor the FID InceptionV3 needs (sorted)."""
    shapes = {}
    for (col, path), shape in _variable_shapes().items():
        shape = tuple(reversed(shape)) if len(shape) == 2 else shape
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        shapes[_torch_name(col, path)] = shape
    return dict(sorted(shapes.items()))


def state_dict_to_variables(state_dict: Mapping[str, Any]) -> Variables:
    """torch-named arrays (pytorch-fid FID Inception state dict) -> Flax variables.

    `num_batches_tracked` buffers are ignored. Raises `WeightMismatchError` listing every missing,
    unexpected and mis-shaped key.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    expected = expected_state_dict_shapes()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k}: expected {expected[k]}, got {tuple(sd[k].shape)}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        lines = ["state dict does not match pytorch-fid's FID InceptionV3:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items))
        raise WeightMismatchError("\n".join(lines))
    variables: Variables = {"params": {}, "batch_stats": {}}
    for col, path in _variable_shapes():
        node = variables[col]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        value = _to_torch_layout(sd[_torch_name(col, path)].astype(np.float32), inverse=True)
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(value))
    return variables


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> torch-named numpy arrays in torch layouts (inverse of the above)."""
    return {
        _torch_name(col, path): np.ascontiguousarray(_to_torch_layout(np.asarray(v)))
        for (col, path), v in _flat_variables(variables).items()
    }


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict from `.pth`/`.pt` (needs torch), `.npz` or `.safetensors` (no torch)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: Inception weights not found. The FID weights ({FID_WEIGHTS_FILENAME}, from "
            "pytorch-fid's releases) are not downloaded at run time; pass a local copy."
        )
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if ext in (".pth", ".pt", ".bin"):
        torch = require_torch(f"reading {path}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        return {k: v.detach().cpu().numpy() for k, v in obj.items()}
    raise ValueError(f"{path}: unknown weights format {ext!r} (expected .pth, .npz, .safetensors)")


def load_inception_variables(path: str | os.PathLike) -> Variables:
    """Load FID InceptionV3 weights from a user-supplied file into Flax variables."""
    return state_dict_to_variables(load_state_dict_file(path))


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Reproducible random FID-Inception state dict (torch names and shapes, float32).

    For parity tests without the real weights. Keys are drawn in sorted order from
    `np.random.default_rng(seed)`: conv / fc weights N(0, 2 / fan_in), BatchNorm weight U(0.8, 1.2),
    bias N(0, 0.1²), running_mean N(0, 0.1²), running_var U(0.8, 1.2), fc bias N(0, 0.1²).
    """
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in expected_state_dict_shapes().items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "weight" and len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif leaf in ("weight", "running_var"):
            v = rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
        else:  # bias, running_mean
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        sd[key] = v
    return sd


# ----------------------------------------------------------------------------- Inception Score
def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) ‖ p(y))) from logits [N, C]: (mean, std) over `splits`.

    Use the 1008-way `logits_unbiased` of `FIDInceptionV3` to follow Salimans et al.'s code.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        part = logp[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        kl = (p * (part - log_py[None, :])).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
