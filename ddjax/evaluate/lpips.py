"""LPIPS (Zhang et al. 2018), VGG16 variant, in Flax Linen: the `lpips` package's
`LPIPS(net="vgg", version="0.1")` in eval mode, the continuous loss of the official DD recipe
(`--loss_norm lpips`).

distance(x, y) = sum over the taps l of mean_{h,w} lin_l((n(f_l(x)) - n(f_l(y)))²), where
  * x, y are NHWC images in [-1, 1], first mapped by the package's ScalingLayer
    ((x - shift) / scale, shift (-0.030, -0.088, -0.188), scale (0.458, 0.448, 0.450));
  * f_l are torchvision VGG16 `features` activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
  * n(f) = f / (‖f‖₂ over channels + 1e-10), as `lpips.normalize_tensor`;
  * lin_l are the learned 1x1 convolutions `lin0..lin4` (one output, no bias; their dropout is
    the identity at eval).

Weights are never downloaded. The VGG16 part comes from a torchvision `vgg16` state dict the user
supplies (`features.{0,2,5,...,28}.{weight,bias}`; `classifier.*` keys are ignored), the linear
heads from the `lpips` package's `weights/v0.1/vgg.pth` (`lin{i}.model.1.weight`, found in an
installed package by `installed_lin_path`). `.pth`/`.pt` files need torch (imported lazily by
`ddjax.utils.torch_io`); `.safetensors` and `.npz` files holding the same keys do not.

Minimum image size: 16x16. The four 2x2 max-pools (floor) before relu5_3 turn 16 pixels into 1;
below 16 the package's torch network fails in its last max-pool, and `LPIPS` raises a
ValueError. Images smaller than VGG's receptive field (16x16, 32x32, ...) are fine otherwise.

Parameter tree: {"vgg": {"features_<i>": {"kernel" [3, 3, Cin, Cout], "bias" [Cout]}},
"lin<l>": {"kernel" [C_l, 1]}}; `<i>` is the torchvision `features` index.
"""

from __future__ import annotations

import importlib.util
import math
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddjax.utils.torch_io import CheckpointError, read_state_dict

__all__ = [
    "LPIPS", "LPIPS_MIN_SIZE", "TAP_CHANNELS", "VGG16_STAGES", "VGG16Features",
    "check_image_pair", "expected_lin_shapes", "expected_vgg_shapes",
    "installed_lin_path", "lin_params_from_state_dict", "load_lpips", "lpips_distance",
    "lpips_loss_fn", "normalize_channels", "params_to_state_dict", "random_vgg_state_dict",
    "read_weights", "scale_images", "vgg_params_from_state_dict",
]

Params = dict[str, Any]
PrecisionLike = Any  # None | str | jax.lax.Precision, as flax's `precision` fields

# torchvision `vgg16().features` convolution indices, grouped by stage (a 2x2 max-pool before
# every stage but the first); the last ReLU of each stage is an LPIPS tap.
VGG16_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
TAP_CHANNELS = tuple(stage[-1][1] for stage in VGG16_STAGES)  # (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10
LPIPS_MIN_SIZE = 2 ** (len(VGG16_STAGES) - 1)  # 16
LIN_WEIGHTS_RELPATH = os.path.join("weights", "v0.1", "vgg.pth")


# ----------------------------------------------------------------------------- the network
def scale_images(images: jax.Array) -> jax.Array:
    """The package's ScalingLayer: [..., 3] in [-1, 1] -> (x - shift) / scale, float32."""
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    return (images.astype(jnp.float32) - shift) / scale


def normalize_channels(features: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """[..., C] -> features / (‖features‖₂ over C + eps), as `lpips.normalize_tensor`.

    Same values as the package; where a feature vector is all zero the norm's gradient is taken
    as 0 (the package's sqrt would give NaN there).
    """
    sq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return features / (norm + eps)


class VGG16Features(nn.Module):
    """torchvision VGG16 `features` up to relu5_3: [B, H, W, 3] -> the 5 taps [B, H/2^l, W/2^l, C_l].

    Spatial sizes are floored at each 2x2 max-pool, as torch's `MaxPool2d(2, 2)`.
    """

    dtype: Any = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        taps = []
        for stage, convs in enumerate(VGG16_STAGES):
            if stage:
                x = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
            for index, width in convs:
                x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            precision=self.precision, name=f"features_{index}")(x)
                x = nn.relu(x)
            taps.append(x)
        return tuple(taps)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance: images x, y [B, H, W, 3] in [-1, 1] (H, W >= 16) -> [B] float32.

    `dtype` is the VGG compute dtype (float32 matches the package); normalisation, the linear
    heads and the averages run in float32.
    """

    dtype: Any = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        check_image_pair(x, y)
        batch = x.shape[0]
        both = scale_images(jnp.concatenate([x, y], axis=0)).astype(self.dtype)
        taps = VGG16Features(self.dtype, self.precision, name="vgg")(both)
        total = jnp.zeros((batch,), jnp.float32)
        for layer, feats in enumerate(taps):
            feats = normalize_channels(feats.astype(jnp.float32))
            diff = jnp.square(feats[:batch] - feats[batch:])  # [B, h, w, C]
            weighted = nn.Dense(1, use_bias=False, precision=self.precision,
                                name=f"lin{layer}")(diff)  # [B, h, w, 1]
            total = total + jnp.mean(weighted[..., 0], axis=(1, 2))
        return total


def check_image_pair(x: jax.Array, y: jax.Array) -> None:
    """ValueError unless x, y are equal-shaped [B, H, W, 3] with H, W >= LPIPS_MIN_SIZE."""
    if x.shape != y.shape:
        raise ValueError(f"LPIPS needs images of equal shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS needs NHWC RGB images [B, H, W, 3], got shape {x.shape}")
    if min(x.shape[1], x.shape[2]) < LPIPS_MIN_SIZE:
        raise ValueError(
            f"LPIPS-VGG needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} (four 2x2 "
            f"max-pools before relu5_3), got {x.shape[1]}x{x.shape[2]}; upsample them first"
        )


def lpips_distance(params: Params, x: jax.Array, y: jax.Array, *, dtype: Any = jnp.float32,
                   precision: PrecisionLike = None) -> jax.Array:
    """LPIPS distances [B] between image batches x, y [B, H, W, 3] in [-1, 1]."""
    return LPIPS(dtype, precision).apply({"params": params}, x, y)


def lpips_loss_fn(params: Params, *, dtype: Any = jnp.float32, precision: PrecisionLike = None
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A training loss `loss(x [B, H, W, 3], y [B, H, W, 3]) -> [B]` with frozen LPIPS weights.

    Jit-friendly (shapes are checked at trace time) and differentiable in x and y; no gradient
    flows into `params`. Closed-over weights become constants of the caller's jit; to keep the
    real VGG16 (14.7M parameters) out of the compiled program, pass them as an argument and call
    `lpips_distance(jax.lax.stop_gradient(params), x, y)` instead.
    """
    frozen = jax.tree_util.tree_map(jnp.asarray, params)

    def loss(x: jax.Array, y: jax.Array) -> jax.Array:
        return lpips_distance(jax.lax.stop_gradient(frozen), x, y, dtype=dtype, precision=precision)

    return loss


# ----------------------------------------------------------------------------- weights
def expected_vgg_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision `vgg16` state-dict key -> torch shape for the 13 convolutions LPIPS uses."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 3
    for convs in VGG16_STAGES:
        for index, width in convs:
            shapes[f"features.{index}.weight"] = (width, cin, 3, 3)
            shapes[f"features.{index}.bias"] = (width,)
            cin = width
    return shapes


def expected_lin_shapes() -> dict[str, tuple[int, ...]]:
    """`lpips` package `vgg.pth` key -> torch shape of the 5 linear heads ([1, C_l, 1, 1])."""
    return {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{key: array} from `.pth`/`.pt` (needs torch), `.safetensors` or `.npz` (no torch).

    Raises FileNotFoundError naming a missing path, CheckpointError for an unknown format.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LPIPS weights file not found: {path}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    return read_state_dict(path)


def _check_keys(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str,
                source: str, ignored: Callable[[str], bool] = lambda k: False) -> None:
    """One CheckpointError naming `source` and every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not ignored(k))
    misshaped = sorted(
        f"{k}: expected {expected[k]}, got {tuple(np.shape(state[k]))}"
        for k in set(expected) & set(state) if tuple(np.shape(state[k])) != expected[k]
    )
    if missing or unexpected or misshaped:
        lines = [f"{source} does not hold {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items))
        raise CheckpointError("\n".join(lines))


def _is_lin_key(key: str) -> bool:
    return key.startswith("lin") and key.endswith(".model.1.weight")


def vgg_params_from_state_dict(state: Mapping[str, Any], source: str = "state dict") -> Params:
    """torchvision `vgg16` state dict -> {"features_<i>": {"kernel", "bias"}} (OIHW -> HWIO).

    `classifier.*` keys are ignored; any other bad key raises CheckpointError.
    """
    expected = expected_vgg_shapes()
    _check_keys(state, expected, "torchvision VGG16 `features` weights", source,
                ignored=lambda k: k.startswith("classifier."))
    out: Params = {}
    for key in expected:
        if key.endswith(".weight"):
            index = key.split(".")[1]
            kernel = np.transpose(np.asarray(state[key], np.float32), (2, 3, 1, 0))
            bias = np.asarray(state[f"features.{index}.bias"], np.float32)
            out[f"features_{index}"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    return out


def lin_params_from_state_dict(state: Mapping[str, Any], source: str = "state dict") -> Params:
    """`lpips` `vgg.pth` state dict -> {"lin<l>": {"kernel" [C_l, 1]}}; bad keys raise."""
    expected = expected_lin_shapes()
    _check_keys(state, expected, "the LPIPS-VGG linear heads (lin0..lin4)", source)
    return {
        f"lin{i}": {"kernel": jnp.asarray(np.asarray(state[f"lin{i}.model.1.weight"],
                                                     np.float32)[:, :, 0, 0].T)}
        for i in range(len(TAP_CHANNELS))
    }


def installed_lin_path() -> str:
    """Path of `weights/v0.1/vgg.pth` inside an installed `lpips` package (never downloads).

    The package is located without being imported. Raises FileNotFoundError when it is not
    installed or lacks the file.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the LPIPS linear weights were not given and the `lpips` package is not installed: "
            "pass lin_path (the package's weights/v0.1/vgg.pth, or a .safetensors/.npz copy) "
            "or `pip install lpips`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], LIN_WEIGHTS_RELPATH)
    if not os.path.exists(path):
        raise FileNotFoundError(f"the installed lpips package has no linear weights at {path}")
    return path


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike | None = None) -> Params:
    """LPIPS-VGG params from a torchvision `vgg16` state dict file and the linear heads.

    `lin_path` None: the `lin*` keys of `vgg_path` when it has them (a combined file, as written
    from `params_to_state_dict`), else the installed `lpips` package's `vgg.pth`. Each file is
    checked strictly: a CheckpointError names the file and every missing / unexpected /
    mis-shaped key.
    """
    vgg_state = read_weights(vgg_path)
    vgg_source = os.fspath(vgg_path)
    lin_keys = {k for k in vgg_state if _is_lin_key(k)}
    if lin_path is None and lin_keys:
        lin_state = {k: vgg_state[k] for k in lin_keys}
        lin_source = vgg_source
        vgg_state = {k: v for k, v in vgg_state.items() if k not in lin_keys}
    else:
        lin_path = installed_lin_path() if lin_path is None else lin_path
        lin_state = read_weights(lin_path)
        lin_source = os.fspath(lin_path)
    params = {"vgg": vgg_params_from_state_dict(vgg_state, vgg_source)}
    params.update(lin_params_from_state_dict(lin_state, lin_source))
    return params


def params_to_state_dict(params: Params) -> dict[str, np.ndarray]:
    """Inverse of `load_lpips`: one torch-layout dict (`features.*` and `lin*.model.1.weight`).

    Write it with `ddjax.utils.torch_io.write_state_dict(path.safetensors, sd, ())` to get a
    combined file that loads without torch.
    """
    out: dict[str, np.ndarray] = {}
    for name, leaves in params["vgg"].items():
        index = name.split("_")[1]
        out[f"features.{index}.weight"] = np.ascontiguousarray(
            np.transpose(np.asarray(leaves["kernel"]), (3, 2, 0, 1)))
        out[f"features.{index}.bias"] = np.asarray(leaves["bias"])
    for i in range(len(TAP_CHANNELS)):
        kernel = np.asarray(params[f"lin{i}"]["kernel"])
        out[f"lin{i}.model.1.weight"] = np.ascontiguousarray(kernel.T[:, :, None, None])
    return out


def random_vgg_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Reproducible random torchvision-VGG16 `features` state dict (float32), for parity tests.

    Each key draws from its own `np.random.default_rng([seed, crc32(key)])`: conv weights
    N(0, 2 / fan_in) (He), biases 0.1 N(0, 1); independent of key order.
    """
    out = {}
    for key, shape in expected_vgg_shapes().items():
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        noise = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith(".bias"):
            out[key] = np.float32(0.1) * noise
        else:
            out[key] = noise * np.float32(math.sqrt(2.0 / math.prod(shape[1:])))
    return out
